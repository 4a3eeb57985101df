"""Several choices of one request (n > 1, best_of) on a real engine (tiny random Llama,
float32): one prefill shared by forked block tables, each choice its own random stream
(choice i equals the same request alone with seed + i), usage counting the prompt once,
best_of ranking, cancellation, preemption of forked choices, and adapters' leases."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.server.choices import mean_logprob
from loraquilt.server.engine import Engine
from loraquilt.server.model.config import load_model_config
from loraquilt.server.model.kv_cache import MIB, kv_bytes_per_position
from loraquilt.server.request import Constraint, Request, RequestError, SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("choices")
    base = build_tiny_model(root / "base", "llama", seed=17)
    adapters = make_adapter_zoo(base, root / "adapters", count=2, seed=170)
    return base, adapters


def make_engine(model, **overrides) -> Engine:
    base, adapters = model
    settings = dict(max_batch_size=8, max_active_adapters=4, max_seq_len=96, kv_block_size=BLOCK,
                    max_prefill_tokens=64)
    return tiny_engine(base, adapters, **{**settings, **overrides})


@pytest.fixture(scope="module")
def engine(model):
    return make_engine(model)


def ids(count: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 200) for _ in range(count))


def sampled(seed: int, **fields) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 8, "temperature": 1.3, "seed": seed, "ignore_eos": True, **fields})


def alone(engine, request: Request):
    (result,) = engine.generate([request])
    return result


def counting_prefill(engine) -> list[int]:
    """The prompt tokens each later step feeds (observed around the real scheduler)."""
    fed, schedule = [], engine.scheduler.schedule

    def observed(try_admit):
        plan = schedule(try_admit)
        fed.append(plan.prefill_tokens)
        return plan

    engine.scheduler.schedule = observed
    return fed


@pytest.mark.parametrize("length", [1, 4, 5, 7, 9])  # a fork at a block's start, inside one, before any
@pytest.mark.parametrize("adapter", [None, "a0"])
def test_each_choice_equals_the_request_alone_with_its_seed(engine, length, adapter):
    prompt = ids(length, seed=length)
    request = Request(prompt_token_ids=prompt, adapter=adapter, sampling=sampled(40, n=4))
    result = alone(engine, request)
    assert [choice.index for choice in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        single = alone(engine, Request(prompt_token_ids=prompt, adapter=adapter, sampling=sampled(40 + choice.index)))
        assert choice.token_ids == single.token_ids and choice.text == single.text
    assert len({choice.token_ids for choice in result.choices}) > 1  # own random streams
    assert result.token_ids == result.choices[0].token_ids
    assert result.prompt_tokens == length  # the prompt counted once
    assert result.completion_tokens == sum(len(c.token_ids) for c in result.choices) == 32
    engine.blocks.check()
    assert engine.blocks.usage() == 0.0


def test_the_prompt_is_prefilled_once(model):
    engine = make_engine(model, prefix_cache=False)
    fed = counting_prefill(engine)
    alone(engine, Request(prompt_token_ids=ids(21, seed=2), adapter="a1", sampling=sampled(5, n=6)))
    assert sum(fed) == 20 + 6  # every prompt token but the last once, the last once per choice
    assert engine.adapters.get("a1").pins == 0  # every choice's lease released


def test_choices_in_a_batch_with_other_requests_and_a_mix(engine):
    requests = [Request(prompt="The river bends", mix=(("a0", 0.7), ("a1", 0.3)), sampling=sampled(3, n=3)),
                Request(prompt="A mountain", adapter="a1", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)),
                Request(prompt="Birds sing", sampling=sampled(9, n=2, max_new_tokens=5))]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        assert [c.token_ids for c in result.all_choices] == [c.token_ids for c in alone(engine, request).all_choices]
    assert batched[1].choices == ()  # a single choice has no choice list


def test_best_of_returns_the_choices_with_the_highest_mean_logprob(engine):
    prompt = ids(6, seed=8)
    every = alone(engine, Request(prompt_token_ids=prompt, sampling=sampled(70, n=5, logprobs=0)))
    scores = [mean_logprob(choice.logprobs) for choice in every.choices]
    best = sorted(range(5), key=lambda i: -scores[i])[:2]
    picked = alone(engine, Request(prompt_token_ids=prompt, sampling=sampled(70, n=2, best_of=5)))
    assert [c.token_ids for c in picked.choices] == [every.choices[i].token_ids for i in best]
    assert [c.index for c in picked.choices] == [0, 1]
    assert picked.choices[0].logprobs == ()  # scored for the ranking, not returned unless asked
    assert picked.completion_tokens == every.completion_tokens == 40  # every sampled sequence's tokens


def test_choices_end_on_their_own(engine):
    """Stop strings and lengths end each choice separately; the result waits for the last."""
    request = Request(prompt="Once", sampling=sampled(11, n=4, max_new_tokens=12, ignore_eos=False,
                                                      stop_token_ids=tuple(range(3, 60))))
    result = alone(engine, request)
    reasons = {choice.finish_reason for choice in result.choices}
    assert reasons <= {"stop", "length", "eos"} and len(result.choices) == 4
    lengths = [len(choice.token_ids) for choice in result.choices]
    assert result.completion_tokens == sum(lengths)


def test_streamed_outputs_name_their_choice_and_the_last_carries_every_choice(engine):
    sequence = engine.add_request(Request(prompt="Streams", sampling=sampled(21, n=3, max_new_tokens=4)))
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    ended, final = [], None
    while final is None:
        for output in engine.step():
            assert output.request_id == sequence.request_id and output.error is None
            tokens[output.index].extend(output.new_token_ids)
            if output.choice_finished is not None:
                ended.append(output.choice_finished.index)
            final = output.finished or final
    assert sorted(ended) == [0, 1, 2]
    assert [list(c.token_ids) for c in final.choices] == [tokens[0], tokens[1], tokens[2]]


def test_cancelling_ends_every_choice_once(engine):
    sequence = engine.add_request(Request(prompt="Cancel me", sampling=sampled(2, n=3, max_new_tokens=40)))
    outputs = []
    for _ in range(3):
        outputs += engine.step()
    engine.abort(sequence.request_id)
    outputs += engine.step()
    final = [o for o in outputs if o.finished is not None]
    assert len(final) == 1 and [c.finish_reason for c in final[0].finished.choices] == ["cancelled"] * 3
    assert not engine.has_work() and engine.blocks.usage() == 0.0


def test_cancelling_before_the_fork(engine):
    sequence = engine.add_request(Request(prompt_token_ids=ids(40, seed=5), sampling=sampled(2, n=3)))
    engine.abort(sequence.request_id)
    (output,) = engine.step()
    assert [c.finish_reason for c in output.finished.choices] == ["cancelled"] * 3
    assert all(c.token_ids == () for c in output.finished.choices)
    engine.blocks.check()


def test_forked_choices_survive_preemption(model):
    base, _ = model
    config = load_model_config(base)
    per_position = kv_bytes_per_position(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                         head_dim=config.head_dim, dtype=torch.float32)
    requests = [Request(prompt_token_ids=ids(18 + i, seed=60 + i), adapter="a0" if i % 2 else None,
                        sampling=sampled(80 + i, n=3, max_new_tokens=20)) for i in range(3)]
    roomy = make_engine(model, max_batch_size=3)
    expected = [[c.token_ids for c in roomy.generate([r])[0].choices] for r in requests]
    small = make_engine(model, kv_cache_mb=30 * BLOCK * per_position / MIB)  # 30 blocks for ~9 x 10 wanted
    results = small.generate(requests)
    assert small.stats().preemptions > 0
    assert [[c.token_ids for c in r.choices] for r in results] == expected
    small.blocks.check()
    assert small.blocks.usage() == 0.0 and small.adapters.get("a0").pins == 0


def test_constrained_choices_each_match(engine):
    constraint = Constraint("regex", "(yes|no|maybe) [a-z]{1,6}")
    result = alone(engine, Request(prompt="Answer", sampling=sampled(4, n=4, max_new_tokens=12,
                                                                      constraint=constraint)))
    import re

    assert all(re.fullmatch("(yes|no|maybe) [a-z]{1,6}", c.text) for c in result.choices)


def test_bad_counts_are_refused(engine):
    with pytest.raises(RequestError, match="^n: "):
        SamplingParams(n=0)
    with pytest.raises(RequestError, match="^best_of: "):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(RequestError, match="^n: "):
        SamplingParams(n=2, max_new_tokens=0, prompt_logprobs=1)
    with pytest.raises(RequestError, match="^n: .*--max-batch-size"):
        engine.add_request(Request(prompt="x", sampling=sampled(1, n=9)))
    assert not engine.has_work()


def test_every_choice_carries_the_prompt_logprobs(engine):
    prompt = ids(13, seed=31)
    single = alone(engine, Request(prompt_token_ids=prompt, sampling=sampled(1, prompt_logprobs=2)))
    result = alone(engine, Request(prompt_token_ids=prompt, sampling=sampled(1, n=3, prompt_logprobs=2)))
    expected = [(entry.token_id, entry.logprob) for entry in single.prompt_logprobs]
    assert len(expected) == 13
    for choice in result.choices:
        assert [(entry.token_id, entry.logprob) for entry in choice.prompt_logprobs] == expected
