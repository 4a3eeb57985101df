"""Continuous batching policy: who runs in the next step, and where its KV lives (no torch).

Every decoding running sequence decodes one token per step; it first gets room for that
token in the KV block pool. When the pool has none left (after evicting cached prefix
blocks), the newest running sequence is preempted: its blocks go back to the pool and it
returns to the front of the queue, to recompute its tokens when readmitted (its generated
tokens are kept; recomputation gives the same KV). A request is never failed for memory.

Prompts are prefilled in chunks, beside those decodes: a step feeds at most
`max_prefill_tokens` prompt tokens in all, first the next chunks of sequences already
admitted (in admission order), then the first chunks of waiting sequences. Those are
admitted first come first served while the batch has room, the budget has tokens left, the
pool holds blocks for all of their tokens (keeping one block per running sequence in
reserve, so that admissions do not immediately preempt) and the engine can give them
adapter slots (`try_admit`). At admission the prompt's leading full blocks that are in the
prefix cache under the same adapter identity are reused, and only the rest is prefilled
(a request scoring its prompt reuses only blocks of positions it has scored already:
none at its first admission, Sequence.max_cached_tokens).

Head of line: a waiting sequence whose adapters are still being read from disk
(Admission.DEFER) keeps its place in line, but the ones behind it may be admitted
meanwhile, so a disk read never holds up requests whose adapters are in memory; among
everything else the order stays first come first served (WAIT, resources busy, stops
admission for the step; a prompt never overtakes an earlier one for budget reasons).

Several choices of one prompt (n > 1): the request's sequence is admitted with room for
all of them (`Sequence.width` rows of the batch, and a block per choice beyond its
prompt's), prefills its prompt but the last token, and is then forked here: every other
choice gets a copy of its block table (sharing the full blocks; the partly written one
is copied, `StepPlan.kv_copies`) and from then on runs as a sequence of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from loraquilt.server.block_manager import BlockManager
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine's batching limits (defaults: EngineConfig's, where they are declared)."""

    max_batch_size: int = EngineConfig.max_batch_size  # sequences running at once (prefilling or decoding)
    max_prefill_tokens: int = EngineConfig.max_prefill_tokens  # prompt tokens fed per step over every sequence
    max_waiting: int = EngineConfig.max_waiting  # queue bound; past it the engine refuses new requests

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_prefill_tokens, self.max_waiting) < 1:
            raise ValueError("max_batch_size, max_prefill_tokens and max_waiting must be >= 1")

    @classmethod
    def from_engine(cls, config: EngineConfig) -> SchedulerConfig:
        return cls(config.max_batch_size, config.max_prefill_tokens, config.max_waiting)


class Admission(Enum):
    ADMIT = "admit"  # resources granted: its first prompt chunk runs this step
    WAIT = "wait"  # resources busy: stay first in line, admit nobody else this step
    DEFER = "defer"  # its adapters are being read from disk: keep its place, consider the next ones
    REJECT = "reject"  # can never run (e.g. its adapter cannot be loaded): drop it


@dataclass(frozen=True)
class StepPlan:
    decodes: tuple[Sequence, ...]
    prefills: tuple[Sequence, ...]  # each with num_scheduled_tokens set: this step's chunk
    rejected: tuple[Sequence, ...] = ()
    forked: tuple[Sequence, ...] = ()  # choices forked this step (the engine gives them their adapter leases)
    kv_copies: tuple[tuple[int, int], ...] = ()  # (source, destination) KV blocks to copy before the forward

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return self.decodes + self.prefills

    @property
    def prefill_tokens(self) -> int:
        return sum(seq.num_scheduled_tokens for seq in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class QueueFull(RuntimeError):
    pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager | None = None):
        """blocks: the KV block pool (default: one that never runs out for this batch size)."""
        self.config = config
        self.blocks = blocks or BlockManager(num_blocks=config.max_batch_size * 4096)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; prefilling ones included
        self.num_preemptions = 0

    def add(self, sequence: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, try_admit: Callable[[Sequence], Admission]) -> StepPlan:
        """The next step's decodes and chunks. try_admit grabs engine resources, so it is
        asked only about sequences that would run this step if admitted (a preempted
        sequence keeps what it got, only its blocks go back)."""
        preempted: list[Sequence] = []
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.finished or not seq.prefilled or seq in preempted:
                continue
            while not self.blocks.can_append(seq.block_table, seq.num_tokens):
                victim = next(s for s in reversed(self.running) if not s.finished)  # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.block_table, seq.num_tokens)
                decodes.append(seq)
        forked: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        for seq in list(self.running):
            if seq.forks and not seq.finished and seq.num_computed_tokens >= seq.fork_at:
                self._fork(seq, forked, copies)  # when the pool has no block for them, next step
        budget = self.config.max_prefill_tokens
        prefills: list[Sequence] = []
        for seq in self.running:  # chunks of sequences already admitted continue first
            if budget == 0:
                break
            if not seq.prefilled and not seq.finished and seq.schedulable_tokens:
                budget -= self._schedule_chunk(seq, budget)
                prefills.append(seq)
        rejected: list[Sequence] = []
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and self.width + self.waiting[0].width <= self.config.max_batch_size:
            candidate = self.waiting[0]
            if not self.blocks.can_allocate(candidate.num_tokens, reserve=len(self.running) + candidate.width - 1):
                break  # the pool is full: wait for blocks to free (never for a lone sequence)
            self.waiting.popleft()
            verdict = try_admit(candidate)
            if verdict is Admission.WAIT:
                self.waiting.appendleft(candidate)  # resources are busy: retry next step
                break
            if verdict is Admission.DEFER:
                deferred.append(candidate)
                continue
            if verdict is Admission.REJECT:
                rejected.append(candidate)
                continue
            candidate.block_table = self.blocks.allocate(candidate.token_ids, candidate.adapter_key,
                                                         candidate.max_cached_tokens, candidate.lora_start)
            candidate.num_computed_tokens = candidate.num_cached_tokens = candidate.block_table.cached_tokens
            self.running.append(candidate)
            admitted = [candidate]
            if candidate.forks and candidate.num_computed_tokens >= candidate.fork_at:  # nothing left to share
                admitted += self._fork(candidate, forked, copies)
            for seq in admitted:
                if budget > 0 and seq.schedulable_tokens:
                    budget -= self._schedule_chunk(seq, budget)
                    prefills.append(seq)
        self.waiting.extendleft(reversed(deferred))  # back at the front, in arrival order
        return StepPlan(decodes=tuple(decodes), prefills=tuple(prefills), rejected=tuple(rejected),
                        forked=tuple(forked), kv_copies=tuple(copies))

    @property
    def width(self) -> int:
        """Rows of the batch the running sequences stand for (with choices still to fork)."""
        return sum(seq.width for seq in self.running)

    def _fork(self, parent: Sequence, forked: list[Sequence], copies: list[tuple[int, int]]) -> list[Sequence]:
        """Start the choices waiting on `parent`, whose prompt but the last token is in the
        cache: each gets a fork of its block table and goes right after it in the running
        order. Returns them ([] when the pool lacks a block each: it tries again next step)."""
        children = parent.forks
        if self.blocks.available() < len(children):
            return []
        for child in children:
            child.block_table, copy = self.blocks.fork(parent.block_table, parent.num_computed_tokens)
            if copy is not None:
                copies.append(copy)
            child.num_computed_tokens, child.num_cached_tokens = parent.num_computed_tokens, parent.num_cached_tokens
            child.adapter_key, child.admitted_time = parent.adapter_key, parent.admitted_time
            child.prompt_logprobs = list(parent.prompt_logprobs)  # it scored every prompt token
        at = self.running.index(parent) + 1
        self.running[at:at] = children
        parent.forks = []
        forked.extend(children)
        return children

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)  # it was admitted before everything that waits
        self.num_preemptions += 1

    def after_step(self, sequences) -> None:
        """Seal the blocks the step's chunks filled (they become findable prefixes)."""
        for seq in sequences:
            if seq.block_table is not None:
                self.blocks.seal_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens)

    def free_blocks(self, seq: Sequence) -> list[int]:
        """Release a finished sequence's blocks; returns those to zero (see BlockManager.free)."""
        if seq.block_table is None:
            return []
        dirty = self.blocks.free(seq.block_table, scrub=seq.scrub_cache)
        seq.block_table = None
        return dirty

    @staticmethod
    def _schedule_chunk(seq: Sequence, budget: int) -> int:
        seq.num_scheduled_tokens = min(seq.schedulable_tokens, budget)
        return seq.num_scheduled_tokens

    def remove_finished(self) -> list[Sequence]:
        done = [seq for seq in self.running if seq.finished]
        self.running = [seq for seq in self.running if not seq.finished]
        return done

    def remove_waiting(self, request_id: str) -> list[Sequence]:
        """Take a request's sequences (its choices) out of the queue."""
        found = [seq for seq in self.waiting if seq.request_id == request_id]
        for seq in found:
            self.waiting.remove(seq)
        return found

    def find_running(self, request_id: str) -> list[Sequence]:
        """A request's running sequences (its choices)."""
        return [seq for seq in self.running if seq.request_id == request_id]
