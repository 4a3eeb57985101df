"""The KV block manager: allocation, prefix reuse keyed by adapter identity, LRU eviction
of cached blocks, and block accounting under random traffic."""

from __future__ import annotations

import random

import pytest

from loraquilt.server.block_manager import BlockManager, NoFreeBlocks, block_hash

SIZE = 16


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(length)]


def prefilled(manager: BlockManager, tokens: list[int], adapter_key: str = ""):
    table = manager.allocate(tokens, adapter_key)
    manager.seal_full_blocks(table, tokens)  # the prefill wrote every prompt position
    return table


def test_a_prompt_gets_the_blocks_its_positions_need():
    manager = BlockManager(num_blocks=8, block_size=SIZE)
    table = manager.allocate(prompt(0, 40))
    assert len(table.block_ids) == 3 and table.cached_tokens == 0
    assert len(set(table.block_ids)) == 3 and manager.available() == 5
    manager.append(table, 48)  # fills the third block: no new one
    assert len(table.block_ids) == 3
    manager.append(table, 49)
    assert len(table.block_ids) == 4
    manager.free(table)
    assert manager.available() == 8
    manager.check()


def test_leading_blocks_are_reused_only_for_the_same_adapter_identity():
    manager = BlockManager(num_blocks=32, block_size=SIZE)
    shared = prompt(1, 40)
    first = prefilled(manager, shared, adapter_key="sha-of-A")
    manager.free(first)
    again = manager.allocate(shared[:32] + prompt(2, 20), "sha-of-A")
    assert again.cached_tokens == 32 and again.block_ids[:2] == first_blocks(manager, shared, "sha-of-A")
    for other in ("sha-of-B", "", "mix:sha-of-A*0.5"):  # another adapter, the base, a mix of A
        assert manager.allocate(shared, other).cached_tokens == 0, other
    manager.check()


def first_blocks(manager: BlockManager, tokens: list[int], key: str) -> list[int]:
    previous, found = b"", []
    for index in range(len(tokens) // SIZE):
        previous = block_hash(previous, key, tuple(tokens[index * SIZE:(index + 1) * SIZE]))
        found.append(manager._by_hash[previous])
    return found


def test_the_last_prompt_token_is_always_computed():
    manager = BlockManager(num_blocks=16, block_size=SIZE)
    tokens = prompt(3, 32)  # exactly two full blocks
    manager.free(prefilled(manager, tokens))
    again = manager.allocate(tokens)
    assert again.cached_tokens == 16  # the second block holds the last token: computed again
    manager.check()


def test_a_shared_block_is_referenced_by_every_sequence_on_it():
    manager = BlockManager(num_blocks=16, block_size=SIZE)
    tokens = prompt(4, 33)
    first = prefilled(manager, tokens)
    second = manager.allocate(tokens)
    shared = first.block_ids[:2]
    assert second.block_ids[:2] == shared and all(manager.blocks[b].ref_count == 2 for b in shared)
    manager.free(first)
    assert all(manager.blocks[b].ref_count == 1 for b in shared)
    manager.free(second)
    assert manager.available() == 16
    manager.check()


def test_a_hash_collision_never_serves_other_tokens():
    manager = BlockManager(num_blocks=16, block_size=SIZE)
    tokens = prompt(5, 40)
    manager.free(prefilled(manager, tokens))
    block_id = manager._by_hash[block_hash(b"", "", tuple(tokens[:SIZE]))]
    manager.blocks[block_id].token_ids = tuple(prompt(6, SIZE))  # as if another block had the same hash
    assert manager.allocate(tokens).cached_tokens == 0


def test_cached_blocks_are_evicted_least_recently_released_first():
    manager = BlockManager(num_blocks=6, block_size=SIZE)
    old, new = prompt(7, 33), prompt(8, 33)  # three blocks each, two of them sealed
    manager.free(prefilled(manager, old))
    manager.free(prefilled(manager, new))
    assert manager.available() == 6
    first = manager.allocate(prompt(9, 20))  # two blocks: the free ones (unsealed tails) first
    manager.allocate(prompt(10, 20))  # two more: evicts `old`'s blocks, released before `new`'s
    assert not set(first_blocks(manager, new, "")) & set(first.block_ids)
    with pytest.raises(KeyError):
        first_blocks(manager, old, "")
    manager.free(first)
    assert manager.allocate(new[:32] + [1]).cached_tokens == 32  # `new`'s blocks are still there
    manager.check()


def test_a_refused_allocation_takes_nothing():
    manager = BlockManager(num_blocks=4, block_size=SIZE)
    held = manager.allocate(prompt(11, 40))  # 3 of 4 blocks
    before = (manager.available(), list(manager._free), dict(manager._cached))
    with pytest.raises(NoFreeBlocks):
        manager.allocate(prompt(12, 40))
    assert (manager.available(), list(manager._free), dict(manager._cached)) == before
    assert not manager.can_append(held, 80)
    manager.check()


def test_prefix_cache_off_never_reuses():
    manager = BlockManager(num_blocks=16, block_size=SIZE, prefix_cache=False)
    tokens = prompt(13, 40)
    manager.free(prefilled(manager, tokens))
    assert manager.allocate(tokens).cached_tokens == 0 and not manager._by_hash


def test_block_accounting_after_1000_random_requests_with_aborts():
    rng = random.Random(14)
    manager = BlockManager(num_blocks=64, block_size=SIZE)  # small: refusals and preemptions happen
    prefixes = [prompt(100 + i, 48) for i in range(4)]
    running: list[tuple[object, list[int], int]] = []  # (table, tokens, remaining new tokens)
    served = hits = refused = preempted = 0
    for step in range(1000):
        if rng.random() < 0.5:
            tokens = rng.choice(prefixes)[:rng.randrange(16, 49)] + prompt(step, rng.randrange(1, 30))
            key = rng.choice(["", "A", "B", "mix:A*0.5+B*0.5"])
            try:
                table = manager.allocate(tokens, key)
            except NoFreeBlocks:
                refused += 1
                continue
            served += 1
            hits += table.cached_tokens
            manager.seal_full_blocks(table, tokens)
            running.append((table, tokens, rng.randrange(1, 40)))
        elif running:
            index = rng.randrange(len(running))
            table, tokens, remaining = running[index]
            if rng.random() < 0.1 or remaining == 0:  # finished, or aborted
                manager.free(table)
                running.pop(index)
            elif manager.can_append(table, len(tokens) + 1):
                tokens = tokens + [rng.randrange(1000)]
                manager.append(table, len(tokens))
                manager.seal_full_blocks(table, tokens)
                running[index] = (table, tokens, remaining - 1)
            else:  # preempted: its blocks go back, it would be recomputed later
                preempted += 1
                manager.free(table)
                running.pop(index)
        manager.check()
        referenced = sum(1 for block in manager.blocks if block.ref_count > 0)
        assert referenced + manager.available() == manager.num_blocks
    assert served > 80 and refused > 0 and preempted > 0 and hits > 0 and manager.hit_tokens == hits
    for table, _, _ in running:
        manager.free(table)
    manager.check()
    assert manager.available() == manager.num_blocks and manager.usage() == 0.0
