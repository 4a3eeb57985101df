"""The Scheduler's running sequences (decode, finish, removal), its waiting-queue bound and
its lookups by request id."""

import pytest
from fixtures_scheduler import admit_all, finish_prefill, make_scheduler, make_sequence

from loraquilt.server.scheduler import QueueFull


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
    assert scheduler.remove_waiting("b") == [b]
    assert list(scheduler.waiting) == [a, c]
    assert scheduler.remove_waiting("b") == []
    assert scheduler.remove_waiting("unknown") == []


def test_remove_waiting_ignores_running_sequences():
    scheduler = make_scheduler()
    seq = make_sequence(request_id="r")
    scheduler.add(seq)
    scheduler.schedule(admit_all)
    assert scheduler.remove_waiting("r") == []
    assert scheduler.running == [seq]


def test_find_running():
    scheduler = make_scheduler(max_batch_size=1)
    running, waiting = make_sequence(request_id="run"), make_sequence(request_id="wait")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule(admit_all)
    assert scheduler.find_running("run") == [running]
    assert scheduler.find_running("wait") == []
    assert scheduler.find_running("unknown") == []
