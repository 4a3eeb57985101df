"""Continuous batching policy: who runs in the next step (no torch, no tensors).

Every prefilled running sequence decodes one token per step. Prompts are prefilled in
chunks, beside those decodes: a step feeds at most `max_prefill_tokens` prompt tokens in
all, first the next chunks of prompts already admitted (in admission order), then the
first chunks of waiting sequences. Those are admitted first come first served while the
batch has room, the budget has tokens left and the engine can give them a KV cache row
and adapter slots (`try_admit`). A long prompt thus takes several steps and never stalls
the running decodes for more than one budget's worth of prompt tokens per step.

Head of line: a waiting sequence whose adapters are still being read from disk
(Admission.DEFER) keeps its place in line, but the ones behind it may be admitted
meanwhile, so a disk read never holds up requests whose adapters are in memory; among
everything else the order stays first come first served (WAIT, resources busy, stops
admission for the step; a prompt never overtakes an earlier one for budget reasons).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from loraquilt.server.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences running at once (prefilling or decoding)
    max_prefill_tokens: int = 128  # prompt tokens fed per step over every sequence (long prompts are chunked)
    max_waiting: int = 1024  # queue bound; past it the engine refuses new requests

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_prefill_tokens, self.max_waiting) < 1:
            raise ValueError("max_batch_size, max_prefill_tokens and max_waiting must be >= 1")


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
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; prefilling ones included

    def add(self, sequence: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, try_admit: Callable[[Sequence], Admission]) -> StepPlan:
        """The next step's decodes and prompt chunks. try_admit grabs engine resources, so it
        is asked only about sequences that would run this step if admitted."""
        decodes = tuple(seq for seq in self.running if seq.prefilled and not seq.finished)
        budget = self.config.max_prefill_tokens
        prefills: list[Sequence] = []
        for seq in self.running:  # prompts already admitted continue first
            if budget == 0:
                break
            if not seq.prefilled and not seq.finished:
                budget -= self._schedule_chunk(seq, budget)
                prefills.append(seq)
        rejected: list[Sequence] = []
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            candidate = self.waiting.popleft()
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
            self.running.append(candidate)
            budget -= self._schedule_chunk(candidate, budget)
            prefills.append(candidate)
        self.waiting.extendleft(reversed(deferred))  # back at the front, in arrival order
        return StepPlan(decodes=decodes, prefills=tuple(prefills), rejected=tuple(rejected))

    @staticmethod
    def _schedule_chunk(seq: Sequence, budget: int) -> int:
        seq.num_scheduled_tokens = min(seq.remaining_prompt, budget)
        return seq.num_scheduled_tokens

    def remove_finished(self) -> list[Sequence]:
        done = [seq for seq in self.running if seq.finished]
        self.running = [seq for seq in self.running if not seq.finished]
        return done

    def remove_waiting(self, request_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        return None

    def find_running(self, request_id: str) -> Sequence | None:
        return next((seq for seq in self.running if seq.request_id == request_id), None)
