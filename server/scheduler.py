"""Continuous batching policy: who runs in the next step (no torch, no tensors).

Every running sequence decodes one token per step; waiting sequences join, first come
first served, while the batch has room, the step's prompt-token budget allows, and the
engine can give them a KV cache row and adapter slots (`try_admit`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from loraquilt.server.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences running at once
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step (one long prompt may exceed it alone)
    max_waiting: int = 1024  # queue bound; past it the engine refuses new requests

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_prefill_tokens, self.max_waiting) < 1:
            raise ValueError("max_batch_size, max_prefill_tokens and max_waiting must be >= 1")


class Admission(Enum):
    ADMIT = "admit"  # resources granted: prefill this step
    WAIT = "wait"  # resources busy: stay first in line
    REJECT = "reject"  # can never run (e.g. its adapter cannot be loaded): drop it


@dataclass(frozen=True)
class StepPlan:
    decodes: tuple[Sequence, ...]
    prefills: tuple[Sequence, ...]
    rejected: tuple[Sequence, ...] = ()

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return self.decodes + self.prefills

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class QueueFull(RuntimeError):
    pass


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, sequence: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, try_admit: Callable[[Sequence], Admission]) -> StepPlan:
        decodes = tuple(seq for seq in self.running if seq.prefilled and not seq.finished)
        prefills: list[Sequence] = []
        rejected: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        while self.waiting and len(self.running) < self.config.max_batch_size:
            candidate = self.waiting[0]
            cost = len(candidate.prompt_ids)
            if prefills and cost > budget:
                break
            verdict = try_admit(candidate)
            if verdict is Admission.WAIT:
                break  # resources are busy: keep arrival order, retry next step
            self.waiting.popleft()
            if verdict is Admission.REJECT:
                rejected.append(candidate)
                continue
            self.running.append(candidate)
            prefills.append(candidate)
            budget -= cost
        return StepPlan(decodes=decodes, prefills=tuple(prefills), rejected=tuple(rejected))

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
