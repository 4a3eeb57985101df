"""Continuous-batching policy of the Scheduler, driven with plain Sequence objects."""

import pytest

from loraquilt.server.request import Request
from loraquilt.server.scheduler import Admission, QueueFull, Scheduler, SchedulerConfig, StepPlan
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
    """What the engine does after a step: every scheduled sequence has now been prefilled."""
    for seq in plan.sequences:
        seq.prefilled = True


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_prefill_tokens": 0}, {"max_waiting": 0}, {"max_batch_size": -3}],
)
def test_config_rejects_non_positive_limits(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


def test_config_accepts_minimal_limits():
    config = SchedulerConfig(max_batch_size=1, max_prefill_tokens=1, max_waiting=1)
    assert (config.max_batch_size, config.max_prefill_tokens, config.max_waiting) == (1, 1, 1)


# -- admission --------------------------------------------------------------------------------


def test_empty_scheduler_plans_nothing():
    scheduler = make_scheduler()
    plan = scheduler.schedule(admit_all)
    assert not plan
    assert plan.sequences == () and plan.rejected == ()
    assert not scheduler.has_work()


def test_admission_is_first_come_first_served():
    scheduler = make_scheduler()
    sequences = [make_sequence() for _ in range(4)]
    for seq in sequences:
        scheduler.add(seq)
    assert scheduler.has_work()
    plan = scheduler.schedule(admit_all)
    assert plan.prefills == tuple(sequences)
    assert plan.decodes == ()
    assert plan.sequences == tuple(sequences)
    assert scheduler.running == sequences
    assert not scheduler.waiting


def test_batch_size_bounds_running_sequences():
    scheduler = make_scheduler(max_batch_size=2)
    sequences = [make_sequence() for _ in range(5)]
    for seq in sequences:
        scheduler.add(seq)

    first = scheduler.schedule(admit_all)
    assert first.prefills == tuple(sequences[:2])
    finish_prefill(first)

    full = scheduler.schedule(admit_all)
    assert full.decodes == tuple(sequences[:2])
    assert full.prefills == ()
    assert list(scheduler.waiting) == sequences[2:]

    sequences[0].finish_reason = "length"
    assert scheduler.remove_finished() == [sequences[0]]
    after = scheduler.schedule(admit_all)
    assert after.decodes == (sequences[1],)
    assert after.prefills == (sequences[2],)


def test_try_admit_not_asked_when_batch_is_full():
    """try_admit grabs engine resources, so it must only be called for sequences that fit."""
    scheduler = make_scheduler(max_batch_size=1)
    scheduler.add(make_sequence())
    scheduler.add(make_sequence())
    admitter = RecordingAdmitter()
    scheduler.schedule(admitter)
    assert len(admitter.asked) == 1


def test_prompt_larger_than_budget_runs_alone():
    scheduler = make_scheduler(max_prefill_tokens=10)
    big, small = make_sequence(100), make_sequence(1)
    scheduler.add(big)
    scheduler.add(small)
    admitter = RecordingAdmitter()
    first = scheduler.schedule(admitter)
    assert first.prefills == (big,)
    assert admitter.asked == [big]  # the small one is not even asked this step
    finish_prefill(first)
    second = scheduler.schedule(admit_all)
    assert second.decodes == (big,)
    assert second.prefills == (small,)


@pytest.mark.parametrize(
    "lengths, budget, steps",
    [
        ([6, 6], 10, [[0], [1]]),
        ([5, 5], 10, [[0, 1]]),
        ([3, 3, 3, 3], 10, [[0, 1, 2], [3]]),
        ([9, 1, 1], 10, [[0, 1], [2]]),
    ],
    ids=["sum-over-budget", "exact-fit", "three-fit", "fill-then-stop"],
)
def test_prefill_token_budget(lengths, budget, steps):
    scheduler = make_scheduler(max_prefill_tokens=budget)
    sequences = [make_sequence(n) for n in lengths]
    for seq in sequences:
        scheduler.add(seq)
    for expected in steps:
        plan = scheduler.schedule(admit_all)
        assert plan.prefills == tuple(sequences[i] for i in expected)
        finish_prefill(plan)
    assert not scheduler.waiting


def test_budget_blocks_later_sequences_rather_than_skipping_ahead():
    """A short prompt behind a blocked long one does not overtake it (strict FIFO)."""
    scheduler = make_scheduler(max_prefill_tokens=10)
    first, long_one, short = make_sequence(6), make_sequence(8), make_sequence(1)
    for seq in (first, long_one, short):
        scheduler.add(seq)
    assert scheduler.schedule(admit_all).prefills == (first,)
    assert list(scheduler.waiting) == [long_one, short]


def test_wait_stops_admission_and_keeps_arrival_order():
    scheduler = make_scheduler()
    a, b, c = make_sequence(), make_sequence(), make_sequence()
    for seq in (a, b, c):
        scheduler.add(seq)
    admitter = RecordingAdmitter({id(b): Admission.WAIT})
    plan = scheduler.schedule(admitter)
    assert plan.prefills == (a,)
    assert plan.rejected == ()
    assert admitter.asked == [a, b]  # c is not considered once b has to wait
    assert list(scheduler.waiting) == [b, c]
    assert scheduler.running == [a]

    next_plan = scheduler.schedule(admit_all)
    assert next_plan.prefills == (b, c)


def test_reject_drops_the_sequence_and_admission_continues():
    scheduler = make_scheduler()
    a, b, c = make_sequence(), make_sequence(), make_sequence()
    for seq in (a, b, c):
        scheduler.add(seq)
    plan = scheduler.schedule(RecordingAdmitter({id(b): Admission.REJECT}))
    assert plan.prefills == (a, c)
    assert plan.rejected == (b,)
    assert b not in scheduler.running and b not in scheduler.waiting
    assert not scheduler.schedule(admit_all).rejected  # reported once only


def test_rejected_sequences_use_neither_batch_room_nor_token_budget():
    scheduler = make_scheduler(max_batch_size=2, max_prefill_tokens=10)
    a, rejected, b = make_sequence(4), make_sequence(5), make_sequence(6)
    for seq in (a, rejected, b):
        scheduler.add(seq)
    plan = scheduler.schedule(RecordingAdmitter({id(rejected): Admission.REJECT}))
    assert plan.prefills == (a, b)
    assert plan.rejected == (rejected,)


def test_everything_rejected_gives_a_falsy_plan_with_rejections():
    scheduler = make_scheduler()
    a, b = make_sequence(), make_sequence()
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule(lambda seq: Admission.REJECT)
    assert not plan
    assert plan.rejected == (a, b)
    assert not scheduler.has_work()


# -- running sequences ------------------------------------------------------------------------


def test_prefilled_running_sequences_decode_and_new_ones_prefill():
    scheduler = make_scheduler()
    old = make_sequence()
    scheduler.add(old)
    finish_prefill(scheduler.schedule(admit_all))
    new = make_sequence()
    scheduler.add(new)
    plan = scheduler.schedule(admit_all)
    assert plan.decodes == (old,)
    assert plan.prefills == (new,)
    assert plan.sequences == (old, new)  # decodes first


def test_finished_sequences_do_not_decode_and_are_removed():
    scheduler = make_scheduler()
    a, b, c = make_sequence(), make_sequence(), make_sequence()
    for seq in (a, b, c):
        scheduler.add(seq)
    finish_prefill(scheduler.schedule(admit_all))
    b.finish_reason = "eos"

    assert scheduler.schedule(admit_all).decodes == (a, c)
    assert scheduler.remove_finished() == [b]
    assert scheduler.running == [a, c]
    assert scheduler.remove_finished() == []


def test_has_work_until_everything_is_finished_and_removed():
    scheduler = make_scheduler()
    seq = make_sequence()
    scheduler.add(seq)
    finish_prefill(scheduler.schedule(admit_all))
    assert scheduler.has_work()
    seq.finish_reason = "stop"
    scheduler.remove_finished()
    assert not scheduler.has_work()


# -- queue bound, lookups ---------------------------------------------------------------------


def test_queue_full_past_max_waiting():
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add(make_sequence())
    scheduler.add(make_sequence())
    with pytest.raises(QueueFull):
        scheduler.add(make_sequence())
    assert len(scheduler.waiting) == 2
    scheduler.schedule(admit_all)  # running sequences do not count against the queue bound
    scheduler.add(make_sequence())
    scheduler.add(make_sequence())
    assert len(scheduler.waiting) == 2


def test_queue_full_is_a_runtime_error():
    assert issubclass(QueueFull, RuntimeError)


def test_remove_waiting():
    scheduler = make_scheduler()
    a, b, c = (make_sequence(request_id=name) for name in ("a", "b", "c"))
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.remove_waiting("b") is b
    assert list(scheduler.waiting) == [a, c]
    assert scheduler.remove_waiting("b") is None
    assert scheduler.remove_waiting("unknown") is None


def test_remove_waiting_ignores_running_sequences():
    scheduler = make_scheduler()
    seq = make_sequence(request_id="r")
    scheduler.add(seq)
    scheduler.schedule(admit_all)
    assert scheduler.remove_waiting("r") is None
    assert scheduler.running == [seq]


def test_find_running():
    scheduler = make_scheduler(max_batch_size=1)
    running, waiting = make_sequence(request_id="run"), make_sequence(request_id="wait")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule(admit_all)
    assert scheduler.find_running("run") is running
    assert scheduler.find_running("wait") is None
    assert scheduler.find_running("unknown") is None
