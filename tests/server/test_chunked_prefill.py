"""Chunked prefill on a real engine (tiny random models, float32): a prompt longer than
--max-prefill-tokens is fed in chunks beside the running decodes and answers exactly as
a one-shot prefill would."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.request import Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)  # later tokens read the chunked keys back


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    base = build_tiny_model(root / "base", "llama", seed=7)
    adapters = make_adapter_zoo(base, root / "adapters", count=2, seed=70)
    return base, adapters


def make_engine(base, adapters=(), **overrides) -> Engine:
    settings = dict(max_batch_size=6, max_active_adapters=4, max_seq_len=160)
    return tiny_engine(base, adapters, **{**settings, **overrides})


@pytest.fixture(scope="module")
def engine(model_folder):
    base, adapters = model_folder
    return make_engine(base, adapters, max_prefill_tokens=1000)


def set_budget(engine: Engine, budget: int) -> None:
    assert not engine.has_work()
    engine.scheduler.config = replace(engine.scheduler.config, max_prefill_tokens=budget)


def prompt_ids(length: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 400) for _ in range(length))


class StepLog:
    """Wraps the engine's runner: records each step's decodes and prefill chunks."""

    def __init__(self, engine: Engine):
        self.steps: list[dict] = []
        real = engine.runner.execute

        def execute(decodes, prefills):
            self.steps.append({
                "decodes": [seq.request_id for seq in decodes],
                "chunks": [(seq.request_id, seq.next_position(), len(seq.next_input())) for seq in prefills],
            })
            return real(decodes, prefills)

        engine.runner.execute = execute


def answers(engine: Engine, requests: list[Request]) -> list[tuple[int, ...]]:
    return [result.token_ids for result in engine.generate(requests)]


KINDS = ({}, {"adapter": "a0"}, {"mix": (("a0", 0.5), ("a1", 0.75))})
LENGTHS = (16, 17, 48, 3)  # over the budgets below, multiples of them (16, 48) or not, under them


def make_requests(lengths) -> list[Request]:
    return [Request(prompt_token_ids=prompt_ids(n, seed=n), sampling=GREEDY, **KINDS[n % len(KINDS)])
            for n in lengths]


@pytest.fixture(scope="module")
def one_shot(engine) -> dict[int, tuple[int, ...]]:
    """Each prompt's greedy answer, prefilled in one piece and alone, by prompt length."""
    set_budget(engine, 1000)
    return {n: answers(engine, [request])[0] for n, request in zip((*LENGTHS, 9, 5), make_requests((*LENGTHS, 9, 5)))}


@pytest.mark.parametrize("budget, lengths", [(8, LENGTHS), (16, LENGTHS), (5, LENGTHS[:2]), (1, (9, 5))])
def test_chunked_prefill_gives_the_one_shot_tokens(engine, one_shot, budget, lengths):
    """Batched: the prompts share each step's budget (base, adapter and mix rows); the
    first is alone in its first steps, so its chunks are exactly budget-sized."""
    set_budget(engine, budget)
    log = StepLog(engine)
    try:
        chunked = answers(engine, make_requests(lengths))
    finally:
        del engine.runner.execute
        set_budget(engine, 1000)
    assert chunked == [one_shot[n] for n in lengths]
    assert all(sum(n for _, _, n in step["chunks"]) <= budget for step in log.steps)
    first = lengths[0]
    assert [c[1:] for step in log.steps[: math.ceil(first / budget)] for c in step["chunks"]][: math.ceil(first / budget)] \
        == [(start, min(budget, first - start)) for start in range(0, first, budget)]


def test_seeded_sampling_does_not_depend_on_the_chunking(engine):
    """A partial chunk's token is discarded without drawing from the request's stream."""
    params = SamplingParams(max_new_tokens=6, temperature=1.1, top_k=40, seed=4321, ignore_eos=True)
    request = Request(prompt_token_ids=prompt_ids(30, seed=3), adapter="a1", sampling=params)
    set_budget(engine, 1000)
    one_shot = answers(engine, [request])[0]
    set_budget(engine, 7)
    try:
        chunked = answers(engine, [request])[0]
    finally:
        set_budget(engine, 1000)
    assert chunked == one_shot


def test_decodes_keep_stepping_while_a_long_prompt_is_chunked(engine):
    set_budget(engine, 8)
    log = StepLog(engine)
    try:
        running = Request(prompt="The river", adapter="a0",
                          sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
        engine.add_request(running)
        engine.step()  # its prompt fits in one chunk: it decodes from now on
        long_prompt = Request(prompt_token_ids=prompt_ids(60, seed=11), adapter="a1", sampling=GREEDY)
        sequence = engine.add_request(long_prompt)
        chunk_steps = 0
        while not sequence.prefilled:
            outputs = {o.request_id: o for o in engine.step()}
            chunk_steps += 1
            assert len(outputs[running.request_id].new_token_ids) == 1  # a token in every step
            if not sequence.prefilled:
                assert long_prompt.request_id not in outputs  # a partial chunk emits nothing
                assert sequence.output_ids == []
                assert sequence.num_computed_tokens == 8 * chunk_steps
            else:
                assert len(outputs[long_prompt.request_id].new_token_ids) == 1
                assert len(sequence.output_ids) == 1
        assert chunk_steps == math.ceil(60 / 8)
        for step in log.steps[1:]:
            assert step["decodes"] == [running.request_id]
            assert sum(n for _, _, n in step["chunks"]) <= 8
        results = {}
        while len(results) < 2:
            results.update({o.request_id: o.finished for o in engine.step() if o.finished})
    finally:
        del engine.runner.execute
        set_budget(engine, 1000)
    assert results[long_prompt.request_id].token_ids == answers(engine, [long_prompt])[0]
    assert results[running.request_id].token_ids == answers(engine, [running])[0]


def test_abort_during_a_chunked_prefill_frees_its_blocks(engine):
    set_budget(engine, 4)
    try:
        free_before = engine.blocks.available()
        request = Request(prompt_token_ids=prompt_ids(20, seed=5), adapter="a0", sampling=GREEDY)
        sequence = engine.add_request(request)
        engine.step()
        engine.step()
        assert sequence.num_computed_tokens == 8 and not sequence.prefilled
        engine.abort(request.request_id)
        (cancelled,) = [o.finished for o in engine.step() if o.request_id == request.request_id]
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
        engine.blocks.check()
        assert engine.blocks.available() == free_before and engine.adapters.get("a0").pins == 0
        assert not engine.has_work()
    finally:
        set_budget(engine, 1000)


def test_only_rows_that_sample_get_logits(engine):
    """A chunk that does not end its prompt is run for its keys only: the model computes
    no lm_head row for it, and the step that completes the prompt computes one."""
    set_budget(engine, 16)
    rows_per_step: list[int] = []
    real_forward = engine.model.forward

    def forward(batch, cache, lora=None):
        rows_per_step.append(int(batch.logits_rows.numel()))
        return real_forward(batch, cache, lora)

    engine.model.forward = forward
    try:
        request = Request(prompt_token_ids=prompt_ids(40, seed=8), adapter="a1", sampling=GREEDY)
        (result,) = engine.generate([request])
    finally:
        del engine.model.forward
        set_budget(engine, 1000)
    # chunks of 16, 16 and 8 prompt tokens, then GREEDY's remaining decodes
    assert rows_per_step == [0, 0, 1] + [1] * (GREEDY.max_new_tokens - 1)
    assert len(result.token_ids) == GREEDY.max_new_tokens


def test_chunk_continuation_under_a_sliding_window(tmp_path):
    """Mistral with a 6-token window: chunks start past the window, so a continuing chunk
    must read earlier keys from the cache and mask the ones older than the window."""
    base = build_tiny_model(tmp_path / "mistral", "mistral", seed=5, config_overrides={"sliding_window": 6})
    engine = make_engine(base, max_prefill_tokens=1000)
    requests = [Request(prompt_token_ids=prompt_ids(n, seed=n), sampling=GREEDY) for n in (20, 13)]
    one_shot = [answers(engine, [r])[0] for r in requests]
    for budget in (4, 7):
        set_budget(engine, budget)
        assert answers(engine, requests) == one_shot, budget


def test_default_budget_is_the_documented_one():
    from loraquilt.server.scheduler import SchedulerConfig
    assert EngineConfig().max_prefill_tokens == SchedulerConfig().max_prefill_tokens == 128
