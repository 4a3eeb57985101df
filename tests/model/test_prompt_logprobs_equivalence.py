"""Prompt log probabilities against transformers + PEFT on the same NF4 weights in float32:
for the base model, an adapter and a weighted mix, every prompt token after the first gets
the log-softmax of the reference's logits at the position before it (within 1e-4), its
rank and its top alternatives, when the prompt is prefilled in several chunks, when its
prefix was cached by an earlier request, and when its sequence is preempted part-way and
recomputed (no entry lost or doubled)."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures_models import build_tiny_model, load_nf4_reference, make_adapter_zoo
from peft import PeftModel

from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.server.request import Request, SamplingParams

TOP = 3
MIX = (("a0", 0.7), ("a1", 0.3))
CASES = {"base": dict(), "adapter": dict(adapter="a1"), "mix": dict(mix=MIX)}
REFERENCE_ADAPTER = {"base": None, "adapter": "a1", "mix": "mix"}
BUDGET = 8  # prompt tokens per step: every prompt below takes several chunks
BLOCK = 4


def make_engine(base, adapters, **overrides) -> Engine:
    settings = dict(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=8, max_active_adapters=4,
                    lora_backend="torch", progress=False, max_prefill_tokens=BUDGET, kv_block_size=BLOCK,
                    max_seq_len=96)
    engine = Engine(EngineConfig(**{**settings, **overrides}))
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"a{index}", folder)
    return engine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_logprobs")
    base = build_tiny_model(root / "base", "llama", seed=4)
    adapters = make_adapter_zoo(base, root / "adapters", count=2, seed=40)
    model = PeftModel.from_pretrained(load_nf4_reference(base), adapters[0], adapter_name="a0")
    model.load_adapter(adapters[1], adapter_name="a1")
    model.add_weighted_adapter([name for name, _ in MIX], [w for _, w in MIX], adapter_name="mix",
                               combination_type="cat")
    model.eval()
    return base, adapters, make_engine(base, adapters), model


@torch.no_grad()
def reference_logprobs(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the reference's logits at every position."""
    if adapter is None:
        with model.disable_adapter():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    else:
        model.set_adapter(adapter)
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def prompt_ids(length: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 300) for _ in range(length))


def check_prompt_entries(engine, model, request: Request, entries, kind: str) -> None:
    ids = engine.encode(request)
    expected = reference_logprobs(model, ids, REFERENCE_ADAPTER[kind])  # [P, V]
    assert [entry.token_id for entry in entries] == ids, kind  # every prompt token once, in order
    first, *scored = entries
    assert first.logprob is None and first.top == () and first.text == engine.tokenizer.decode([ids[0]])
    for position, entry in enumerate(scored):  # prompt token position + 1, scored by position's logits
        row = expected[position]
        value = float(row[entry.token_id])
        assert abs(entry.logprob - value) < 1e-4, (kind, position)
        assert int((row > value + 1e-4).sum()) + 1 <= entry.rank <= int((row > value - 1e-4).sum()) + 1
        values, indices = torch.topk(row, TOP)
        assert [token for token, _ in entry.top] == indices.tolist(), (kind, position)
        assert max(abs(a - float(b)) for (_, a), b in zip(entry.top, values)) < 1e-4
        assert entry.text == engine.tokenizer.decode([entry.token_id]) and len(entry.top_texts) == TOP


def scoring(max_new_tokens: int = 0, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, prompt_logprobs=TOP, **extra)


def test_prompt_logprobs_equal_peft_over_several_chunks_in_one_batch(world):
    _, _, engine, model = world
    lengths = {"base": 29, "adapter": 17, "mix": 24}  # 2-4 chunks of BUDGET, not multiples of it
    requests = {kind: Request(prompt_token_ids=prompt_ids(lengths[kind], seed=len(kind)), sampling=scoring(),
                              **CASES[kind]) for kind in CASES}
    beside = Request(prompt="A request that asks for nothing", sampling=SamplingParams(max_new_tokens=6))
    results = engine.generate([*requests.values(), beside])
    for (kind, request), result in zip(requests.items(), results):
        check_prompt_entries(engine, model, request, result.prompt_logprobs, kind)
        assert result.token_ids == () and result.finish_reason == "length" and result.completion_tokens == 0
    assert results[-1].prompt_logprobs == () and results[-1].completion_tokens == 6


def test_prompt_and_generated_logprobs_together_and_streamed_once(world):
    _, _, engine, model = world
    request = Request(prompt_token_ids=prompt_ids(21, seed=5), adapter="a1",
                      sampling=scoring(max_new_tokens=5, logprobs=TOP))
    sequence = engine.add_request(request)
    outputs = []
    while engine.has_work():
        outputs += [output for output in engine.step() if output.request_id == sequence.request_id]
    carrying = [output for output in outputs if output.prompt_logprobs]
    assert carrying == outputs[:1]  # the first output carries them, and no other
    result = outputs[-1].finished
    assert carrying[0].prompt_logprobs == result.prompt_logprobs
    check_prompt_entries(engine, model, request, result.prompt_logprobs, "adapter")
    full = list(request.prompt_token_ids) + list(result.token_ids)
    expected = reference_logprobs(model, full, "a1")
    for step, entry in enumerate(result.logprobs):  # the generated tokens' entries as before
        assert abs(entry.logprob - float(expected[len(request.prompt_token_ids) - 1 + step][entry.token_id])) < 1e-4


def test_a_prompt_whose_prefix_was_cached_is_scored_whole(world):
    _, _, engine, model = world
    prompt = prompt_ids(30, seed=9)
    warm = Request(prompt_token_ids=prompt, adapter="a1", sampling=SamplingParams(max_new_tokens=1))
    [warmed] = engine.generate([warm])
    [again] = engine.generate([warm])
    assert again.cached_tokens > 0  # the prefix is in the cache...
    request = Request(prompt_token_ids=prompt, adapter="a1", sampling=scoring(max_new_tokens=1))
    [scored] = engine.generate([request])
    assert scored.cached_tokens == 0  # ...and a request scoring its prompt recomputes it
    check_prompt_entries(engine, model, request, scored.prompt_logprobs, "adapter")
    assert scored.token_ids == warmed.token_ids
    [after] = engine.generate([warm])
    assert after.cached_tokens == again.cached_tokens  # the cache still serves the others


def test_a_sequence_preempted_while_and_after_scoring_loses_and_doubles_nothing(world):
    _, _, engine, model = world
    request = Request(prompt_token_ids=prompt_ids(27, seed=11), mix=MIX, sampling=scoring(max_new_tokens=6))
    sequence = engine.add_request(request)
    preempted_at = []
    while engine.has_work():
        engine.step()
        scored = len(sequence.prompt_logprobs)
        if (scored == 2 * BUDGET and not preempted_at) or (len(sequence.output_ids) == 2 and len(preempted_at) == 1):
            with engine._lock:  # as the scheduler does when the pool runs out
                engine.scheduler._preempt(sequence)
            preempted_at.append(scored)
    assert preempted_at == [2 * BUDGET, 26] and sequence.preemptions == 2
    result = engine.postprocessor.result(sequence)
    check_prompt_entries(engine, model, request, result.prompt_logprobs, "mix")
    [alone] = engine.generate([request])
    assert result.token_ids == alone.token_ids


def test_a_pool_too_small_for_the_batch_preempts_and_every_prompt_is_still_scored_once(world):
    base, adapters, _, model = world
    requests = [(Request(prompt_token_ids=prompt_ids(18 + 3 * i, seed=30 + i), sampling=scoring(max_new_tokens=16),
                         **CASES[kind]), kind) for i, kind in enumerate([*CASES, *CASES])]
    roomy = make_engine(base, adapters)
    per_position = roomy.cache.num_bytes / roomy.cache.config.num_positions
    # 6 sequences of 34-49 positions want ~70 blocks; the pool has 40 (160 positions)
    small = make_engine(base, adapters, kv_cache_mb=160 * per_position / 2**20, max_seq_len=64)
    results = small.generate([request for request, _ in requests])
    assert small.stats().preemptions > 0
    for (request, kind), result in zip(requests, results):
        check_prompt_entries(small, model, request, result.prompt_logprobs, kind)
    small.blocks.check()


def test_max_new_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0
