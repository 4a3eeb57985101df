"""KV cache blocks: one pool of fixed-size blocks, a block table per sequence, and prefix
caching keyed by adapter identity. Plain Python, no torch: it decides which blocks a
sequence's positions live in; the cache tensors themselves belong to the model side.

Semantics:
- A block holds `block_size` consecutive positions of one sequence. A sequence's block
  table lists its blocks in order; position p lives in table[p // block_size] at offset
  p % block_size.
- A full block may be *sealed*: it gets a hash of everything that determines its KV,
  namely the hash of the block before it (so the whole prefix), the adapter identity
  (`adapter_key`: a content hash of the adapter's weights, or of a mix's sorted
  (hash, weight) pairs; "" for the base model), and its own token ids. Sealed blocks are
  found again by that hash: a new sequence whose leading full blocks hash the same reuses
  them (their reference count grows) and prefills only the rest. The block's token ids
  are compared too, so a hash collision can never serve wrong KV.
- Because the key is the adapter's content, never its name, a name registered again with
  other files hashes differently and cannot meet its old blocks.
- Every block is in exactly one state: free (never sealed, or its seal dropped),
  referenced (ref_count > 0), or cached (sealed, ref_count 0: evictable, least recently
  released first). Allocation takes free blocks first, then evicts cached ones.
- The last prompt token is never served from the cache: the step that computes it makes
  the logits of the first new token. A caller may cap the positions served from the cache
  further (`max_cached_tokens`: a request scoring its prompt needs the logits of every
  position it has not scored yet, so the cache may serve only those it has).
- A block whose positions all run on the base model (those before an aLoRA adapter's
  invocation: `base_positions`) is keyed as the base model's (adapter identity ""), so
  the base and every aLoRA adapter share it; the blocks after it chain from its hash.
- A table may be forked (several choices of one prompt): the copy references the same full
  blocks and gets a block of its own for the one its next position falls in, into which
  the caller copies that block's written positions (copy-on-write, done at the fork since
  every choice writes its own tokens there next).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from loraquilt.server.engine_config import EngineConfig


class NoFreeBlocks(RuntimeError):
    """The pool cannot give the blocks asked for (the scheduler checks first)."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set when sealed
    token_ids: tuple[int, ...] = ()  # the tokens a sealed block holds (checked on every hit)


@dataclass
class BlockTable:
    """The blocks of one sequence, and how many leading prompt positions came from the cache."""

    block_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # positions whose KV was already there (multiple of block_size)
    sealed: int = 0  # leading blocks sealed so far
    last_hash: bytes = b""  # hash of the last sealed block ("" before the first)
    adapter_key: str = ""
    base_positions: int = 0  # leading positions computed on the base model alone (keyed "")

    def key_of(self, index: int, block_size: int) -> str:
        """The adapter identity block `index`'s KV depends on."""
        return "" if (index + 1) * block_size <= self.base_positions else self.adapter_key


def block_hash(previous: bytes, adapter_key: str, token_ids: tuple[int, ...]) -> bytes:
    """The identity of a full block's KV: its prefix (through `previous`), the adapter, its tokens."""
    digest = hashlib.sha256(previous)
    digest.update(adapter_key.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(",".join(map(str, token_ids)).encode("ascii"))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = EngineConfig.kv_block_size,
                 prefix_cache: bool = EngineConfig.prefix_cache):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self.blocks = [Block(index) for index in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id
        self._cached: OrderedDict[int, None] = OrderedDict()  # sealed with no reference: LRU first
        self._by_hash: dict[bytes, int] = {}  # sealed block per hash
        self.queries_tokens = 0  # prompt positions looked up in the cache
        self.hit_tokens = 0  # of which found

    # -- capacity -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def available(self) -> int:
        """Blocks a new allocation may take: free ones and cached (evictable) ones."""
        return len(self._free) + len(self._cached)

    def usage(self) -> float:
        """Fraction of the pool held by running sequences."""
        return 1.0 - self.available() / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        """Whether allocate() of `num_tokens` positions succeeds whatever the cache holds,
        leaving `reserve` blocks for the running sequences to grow into."""
        return self.blocks_for(num_tokens) + reserve <= self.available()

    # -- sequences ------------------------------------------------------------------------------

    def allocate(self, prompt_ids: list[int] | tuple[int, ...], adapter_key: str = "",
                 max_cached_tokens: int | None = None, base_positions: int = 0) -> BlockTable:
        """Blocks for a new sequence's prompt: leading full blocks from the cache where their
        hash (and tokens) are resident, new blocks for the rest. Raises NoFreeBlocks, and
        then takes nothing, when the pool cannot hold the prompt. max_cached_tokens: at most
        this many leading positions come from the cache (None: no cap); base_positions:
        leading positions the sequence computes on the base model alone."""
        size = self.block_size
        table = BlockTable(adapter_key=adapter_key, base_positions=base_positions)
        needed = self.blocks_for(len(prompt_ids))
        reused: list[int] = []
        previous = b""
        if self.prefix_cache:
            cacheable = (len(prompt_ids) - 1) // size  # full blocks before the last prompt token
            if max_cached_tokens is not None:
                cacheable = min(cacheable, max_cached_tokens // size)
            self.queries_tokens += cacheable * size
            for index in range(cacheable):
                tokens = tuple(prompt_ids[index * size:(index + 1) * size])
                digest = block_hash(previous, table.key_of(index, size), tokens)
                block_id = self._by_hash.get(digest)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                reused.append(block_id)
                previous = digest
        fresh = needed - len(reused)
        reusable_cached = sum(1 for block_id in reused if self.blocks[block_id].ref_count == 0)
        if fresh > self.available() - reusable_cached:
            raise NoFreeBlocks(f"{needed} blocks needed, {self.available()} available")
        for block_id in reused:
            self._reference(block_id)
        table.block_ids = reused + [self._take() for _ in range(fresh)]
        table.cached_tokens = len(reused) * size
        table.sealed, table.last_hash = len(reused), previous
        self.hit_tokens += table.cached_tokens
        return table

    def can_append(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether the sequence can grow to `num_tokens` positions."""
        return self.blocks_for(num_tokens) - len(table.block_ids) <= self.available()

    def append(self, table: BlockTable, num_tokens: int) -> None:
        """Grow the table to hold `num_tokens` positions (a new block when one fills)."""
        missing = self.blocks_for(num_tokens) - len(table.block_ids)
        if missing > self.available():
            raise NoFreeBlocks(f"{missing} more blocks needed, {self.available()} available")
        for _ in range(missing):
            table.block_ids.append(self._take())

    def fork(self, table: BlockTable, num_written: int) -> tuple[BlockTable, tuple[int, int] | None]:
        """A copy of `table`, whose first `num_written` positions hold KV and whose next
        position (num_written) is its last one: the full blocks before that position are
        shared, the block it falls in is a fresh one. Returns the copy and (source block,
        fresh block) when the source holds written positions the caller must copy (None when
        the position starts a block). Raises NoFreeBlocks, taking nothing, when no block is left."""
        size = self.block_size
        shared = num_written // size
        if len(table.block_ids) != shared + 1:
            raise ValueError(f"a fork needs the table to end at position {num_written}; it has "
                             f"{len(table.block_ids)} blocks of {size}")
        if not self.available():
            raise NoFreeBlocks("no block left for a forked table")
        for block_id in table.block_ids[:shared]:
            self._reference(block_id)
        fresh = self._take()
        # only full written blocks are sealed, so the seals are all among the shared blocks
        copy = BlockTable(block_ids=[*table.block_ids[:shared], fresh], cached_tokens=table.cached_tokens,
                          sealed=table.sealed, last_hash=table.last_hash, adapter_key=table.adapter_key,
                          base_positions=table.base_positions)
        source = (table.block_ids[shared], fresh) if num_written % size else None
        return copy, source

    def seal_full_blocks(self, table: BlockTable, token_ids: list[int] | tuple[int, ...],
                         num_written: int | None = None) -> None:
        """Seal every block of the table that the first `num_written` of `token_ids` (the
        sequence's tokens whose KV is written; all of them by default) fill, so later
        sequences can find them."""
        if not self.prefix_cache:
            return
        size = self.block_size
        written = len(token_ids) if num_written is None else num_written
        while (table.sealed + 1) * size <= written and table.sealed < len(table.block_ids):
            index = table.sealed
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            digest = block_hash(table.last_hash, table.key_of(index, size), tokens)
            block = self.blocks[table.block_ids[index]]
            if block.hash is None and digest not in self._by_hash:
                block.hash, block.token_ids = digest, tokens
                self._by_hash[digest] = block.block_id
            table.sealed, table.last_hash = index + 1, digest

    def free(self, table: BlockTable, scrub: bool = False) -> list[int]:
        """Release a finished (or preempted) sequence's blocks; sealed ones stay cached.

        scrub: its KV may hold non-finite values, so none of its blocks that it alone held
        stays cached; returns those, for the caller to zero before they are handed out again."""
        dirty = []
        for block_id in reversed(table.block_ids):  # the tail first: it is the least likely to be shared
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise AssertionError(f"block {block_id} released more often than taken")
            if block.ref_count == 0:
                if scrub:
                    self._unseal(block_id)
                    dirty.append(block_id)
                if block.hash is not None:
                    self._cached[block_id] = None
                else:
                    self._free.append(block_id)
        table.block_ids = []
        return dirty

    # -- internals ------------------------------------------------------------------------------

    def _reference(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._cached.pop(block_id, None)
        block.ref_count += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.pop()
        elif self._cached:
            block_id, _ = self._cached.popitem(last=False)  # the least recently released
            self._unseal(block_id)
        else:
            raise NoFreeBlocks("no free or cached block left")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _unseal(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids = None, ()

    def check(self) -> None:
        """Every block is in exactly one state (free, cached, referenced); raises otherwise."""
        free, cached = set(self._free), set(self._cached)
        if len(free) != len(self._free) or free & cached:
            raise AssertionError("a block is listed twice")
        for block in self.blocks:
            states = [block.block_id in free, block.block_id in cached, block.ref_count > 0]
            if sum(states) != 1:
                raise AssertionError(f"block {block.block_id} is in {sum(states)} states: {block}")
            if block.block_id in cached and block.hash is None:
                raise AssertionError(f"cached block {block.block_id} has no hash")
        for digest, block_id in self._by_hash.items():
            if self.blocks[block_id].hash != digest:
                raise AssertionError(f"hash index points at block {block_id}, which holds another hash")
