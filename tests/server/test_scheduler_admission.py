"""Admission in the Scheduler's continuous batching: its config, first come first served
within the batch size, and the admitter's answers (admit, wait, reject, defer)."""

import pytest
from fixtures_scheduler import RecordingAdmitter, admit_all, finish_prefill, make_scheduler, make_sequence

from loraquilt.server.scheduler import Admission, SchedulerConfig


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
