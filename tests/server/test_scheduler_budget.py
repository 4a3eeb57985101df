"""The Scheduler's prefill token budget: prompts longer than the budget prefilled in
chunks, in arrival order, each prompt fed exactly once."""

import random

import pytest
from fixtures_scheduler import RecordingAdmitter, admit_all, chunks, finish_prefill, make_scheduler, make_sequence


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
