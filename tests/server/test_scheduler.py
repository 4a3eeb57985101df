"""Continuous-batching policy of the Scheduler, driven with plain Sequence objects."""

import random

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
    """What the engine does after a step: each scheduled chunk is in the cache, and a
    sequence whose prompt that completed is prefilled (its first token sampled)."""
    for seq in plan.prefills:
        if seq.finish_chunk():
            seq.append_token(0)


def chunks(plan: StepPlan, sequences: list[Sequence]) -> list[tuple[int, int]]:
    """The plan's prefills as (index in `sequences`, chunk tokens)."""
    return [(sequences.index(seq), seq.num_scheduled_tokens) for seq in plan.prefills]


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


def test_prompt_larger_than_budget_is_prefilled_in_chunks():
    scheduler = make_scheduler(max_prefill_tokens=10)
    big, small = make_sequence(25), make_sequence(1)
    scheduler.add(big)
    scheduler.add(small)
    admitter = RecordingAdmitter()
    first = scheduler.schedule(admitter)
    assert chunks(first, [big, small]) == [(0, 10)]
    assert big.next_input() == list(range(10)) and big.next_position() == 0
    assert admitter.asked == [big]  # the budget is spent: the small one is not even asked
    finish_prefill(first)
    assert not big.prefilled and big.num_computed_tokens == 10

    second = scheduler.schedule(admitter)
    assert second.decodes == () and chunks(second, [big, small]) == [(0, 10)]
    assert big.next_input() == list(range(10, 20)) and big.next_position() == 10
    assert admitter.asked == [big]  # an admitted prompt continues without asking again
    finish_prefill(second)

    third = scheduler.schedule(admitter)  # the last 5 tokens leave room for the small one
    assert chunks(third, [big, small]) == [(0, 5), (1, 1)]
    assert big.next_input() == list(range(20, 25)) and big.next_position() == 20
    finish_prefill(third)
    assert big.prefilled and small.prefilled
    fourth = scheduler.schedule(admit_all)
    assert fourth.decodes == (big, small) and fourth.prefills == ()
    assert big.next_input() == [0] and big.next_position() == 25


@pytest.mark.parametrize(
    "lengths, budget, steps",
    [
        ([6, 6], 10, [[(0, 6), (1, 4)], [(1, 2)]]),
        ([5, 5], 10, [[(0, 5), (1, 5)]]),
        ([3, 3, 3, 3], 10, [[(0, 3), (1, 3), (2, 3), (3, 1)], [(3, 2)]]),
        ([9, 1, 1], 10, [[(0, 9), (1, 1)], [(2, 1)]]),
        ([20, 2], 10, [[(0, 10)], [(0, 10)], [(1, 2)]]),
        ([3, 2], 1, [[(0, 1)], [(0, 1)], [(0, 1)], [(1, 1)], [(1, 1)]]),
    ],
    ids=["sum-over-budget", "exact-fit", "three-fit", "fill-then-stop", "multiple-of-budget", "budget-1"],
)
def test_prefill_token_budget(lengths, budget, steps):
    scheduler = make_scheduler(max_prefill_tokens=budget)
    sequences = [make_sequence(n) for n in lengths]
    for seq in sequences:
        scheduler.add(seq)
    for expected in steps:
        plan = scheduler.schedule(admit_all)
        assert chunks(plan, sequences) == expected
        assert plan.prefill_tokens <= budget
        finish_prefill(plan)
    assert not scheduler.waiting
    assert all(seq.prefilled for seq in sequences)


@pytest.mark.parametrize("seed", range(20))
def test_every_step_keeps_the_budget_and_covers_each_prompt_in_order(seed):
    """Random prompts, arrivals and budgets: each step feeds at most the budget, chunks
    of admitted prompts come before new admissions, every running prefilled sequence
    decodes, and each prompt is fed exactly once, in order, in contiguous chunks."""
    rng = random.Random(seed)
    budget = rng.choice([1, 2, 3, 7, 16, 64])
    scheduler = make_scheduler(max_batch_size=rng.choice([1, 3, 8]), max_prefill_tokens=budget)
    pending = [make_sequence(rng.randint(1, 90)) for _ in range(12)]
    everyone = list(pending)
    fed: dict[int, list[int]] = {id(seq): [] for seq in pending}
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            scheduler.add(pending.pop(0))
        plan = scheduler.schedule(admit_all)
        assert plan.prefill_tokens <= budget
        assert set(plan.decodes) == {seq for seq in scheduler.running if seq.prefilled}
        admitted_before = [seq for seq in plan.prefills if seq.num_computed_tokens > 0]
        assert list(plan.prefills[: len(admitted_before)]) == admitted_before  # continuing chunks first
        for seq in plan.prefills:
            assert seq.num_scheduled_tokens >= 1
            assert seq.next_position() == len(fed[id(seq)])
            fed[id(seq)].extend(seq.next_input())
        finish_prefill(plan)
        for seq in plan.decodes:
            seq.finish_chunk()
            seq.append_token(1)
            if len(seq.output_ids) >= 3:
                seq.finish_reason = "length"
        scheduler.remove_finished()
        if not pending and not scheduler.has_work():
            break
    assert not scheduler.has_work()
    assert all(fed[id(seq)] == seq.prompt_ids for seq in everyone)


def test_try_admit_not_asked_when_continuing_chunks_spend_the_budget():
    scheduler = make_scheduler(max_prefill_tokens=8)
    long_one = make_sequence(30)
    scheduler.add(long_one)
    finish_prefill(scheduler.schedule(admit_all))
    scheduler.add(make_sequence(2))
    admitter = RecordingAdmitter()
    assert scheduler.schedule(admitter).prefills == (long_one,)
    assert admitter.asked == []


def test_a_later_short_prompt_does_not_overtake_a_chunked_one():
    """The budget is handed out in arrival order: a short prompt behind a long one gets
    only what the long one's chunk leaves, never a share ahead of it."""
    scheduler = make_scheduler(max_prefill_tokens=10)
    first, long_one, short = make_sequence(6), make_sequence(8), make_sequence(1)
    sequences = [first, long_one, short]
    for seq in sequences:
        scheduler.add(seq)
    plan = scheduler.schedule(admit_all)
    assert chunks(plan, sequences) == [(0, 6), (1, 4)]
    assert list(scheduler.waiting) == [short]
    finish_prefill(plan)
    assert chunks(scheduler.schedule(admit_all), sequences) == [(1, 4), (2, 1)]


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
    finish_prefill(plan)

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
    assert (a.num_scheduled_tokens, b.num_scheduled_tokens) == (4, 6)
    assert plan.rejected == (rejected,)


# -- deferred admission (adapters being read from disk) -----------------------------------------


def test_defer_keeps_the_place_and_lets_later_sequences_in():
    scheduler = make_scheduler()
    a, b, c, d = (make_sequence() for _ in range(4))
    for seq in (a, b, c, d):
        scheduler.add(seq)
    admitter = RecordingAdmitter({id(a): Admission.DEFER, id(c): Admission.DEFER})
    plan = scheduler.schedule(admitter)
    assert plan.prefills == (b, d)
    assert admitter.asked == [a, b, c, d]
    assert list(scheduler.waiting) == [a, c]  # still first in line, in arrival order
    assert scheduler.running == [b, d]
    finish_prefill(plan)

    again = RecordingAdmitter({id(c): Admission.DEFER})  # a's adapter is in memory now
    assert scheduler.schedule(again).prefills == (a,)
    assert list(scheduler.waiting) == [c]


def test_wait_behind_a_deferred_sequence_keeps_everyone_in_order():
    scheduler = make_scheduler()
    a, b, c = make_sequence(), make_sequence(), make_sequence()
    for seq in (a, b, c):
        scheduler.add(seq)
    admitter = RecordingAdmitter({id(a): Admission.DEFER, id(b): Admission.WAIT})
    plan = scheduler.schedule(admitter)
    assert not plan and admitter.asked == [a, b]  # WAIT still stops admission for the step
    assert list(scheduler.waiting) == [a, b, c]


def test_deferred_sequences_use_neither_batch_room_nor_token_budget():
    scheduler = make_scheduler(max_batch_size=1, max_prefill_tokens=4)
    deferred, admitted, late = make_sequence(4), make_sequence(4), make_sequence(4)
    for seq in (deferred, admitted, late):
        scheduler.add(seq)
    plan = scheduler.schedule(RecordingAdmitter({id(deferred): Admission.DEFER}))
    assert plan.prefills == (admitted,) and admitted.num_scheduled_tokens == 4
    assert list(scheduler.waiting) == [deferred, late]
    assert deferred.num_scheduled_tokens == 0


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
