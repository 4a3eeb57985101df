"""Helpers for the Scheduler tests (tests/server/test_scheduler_*.py): plain Sequence
objects, admitters that answer from a table, and what the engine does after a step."""

from loraquilt.server.request import Request
from loraquilt.server.scheduler import Admission, Scheduler, SchedulerConfig, StepPlan
from loraquilt.server.sequence import Sequence


def make_sequence(prompt_tokens: int = 4, request_id: str | None = None) -> Sequence:
    request = Request(prompt="x") if request_id is None else Request(prompt="x", request_id=request_id)
    return Sequence(request=request, prompt_ids=list(range(prompt_tokens)))


def admit_all(seq: Sequence) -> Admission:
    return Admission.ADMIT


class RecordingAdmitter:
    """try_admit that records who it was asked about and answers from a per-sequence table."""

    def __init__(self, verdicts: dict[int, Admission] | None = None):
        self.verdicts = verdicts or {}
        self.asked: list[Sequence] = []

    def __call__(self, seq: Sequence) -> Admission:
        self.asked.append(seq)
        return self.verdicts.get(id(seq), Admission.ADMIT)


def make_scheduler(max_batch_size=8, max_prefill_tokens=1000, max_waiting=100) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size, max_prefill_tokens, max_waiting))


def finish_prefill(plan: StepPlan) -> None:
    """What the engine does after a step: each scheduled chunk is in the cache, and a
    sequence whose prompt that completed is prefilled (its first token sampled)."""
    for seq in plan.prefills:
        if seq.finish_chunk():
            seq.append_token(0)


def chunks(plan: StepPlan, sequences: list[Sequence]) -> list[tuple[int, int]]:
    """The plan's prefills as (index in `sequences`, chunk tokens)."""
    return [(sequences.index(seq), seq.num_scheduled_tokens) for seq in plan.prefills]
