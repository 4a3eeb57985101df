"""Log probabilities of generated tokens against transformers + PEFT on the same NF4
weights in float32: for the base model, an adapter and a weighted mix, each generated
token's log probability and its top alternatives equal the log-softmax of the reference's
logits at that position within 1e-4, also when the rows run in one batch and with logits
processing on (log probabilities are of the raw logits)."""

from __future__ import annotations

import pytest
import torch
from fixtures_models import build_tiny_model, load_nf4_reference, make_adapter_zoo
from peft import PeftModel

from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.server.request import Request, SamplingParams

NEW_TOKENS = 8
TOP = 5
MIX = (("a0", 0.7), ("a1", 0.3))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    base = build_tiny_model(root / "base", "llama", seed=2)
    adapters = make_adapter_zoo(base, root / "adapters", count=2, seed=20)
    engine = Engine(EngineConfig(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=8,
                                 max_active_adapters=4, lora_backend="torch", progress=False))
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"a{index}", folder)
    model = PeftModel.from_pretrained(load_nf4_reference(base), adapters[0], adapter_name="a0")
    model.load_adapter(adapters[1], adapter_name="a1")
    model.add_weighted_adapter([name for name, _ in MIX], [w for _, w in MIX], adapter_name="mix",
                               combination_type="cat")
    model.eval()
    return engine, model


@torch.no_grad()
def reference_logprobs(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the reference's logits at every position."""
    def forward():
        return model(input_ids=torch.tensor([ids])).logits[0].float()

    if adapter is None:
        with model.disable_adapter():
            logits = forward()
    else:
        model.set_adapter(adapter)
        logits = forward()
    return torch.log_softmax(logits, dim=-1)


CASES = {"base": dict(), "adapter": dict(adapter="a1"), "mix": dict(mix=MIX)}
REFERENCE_ADAPTER = {"base": None, "adapter": "a1", "mix": "mix"}


def check_against_reference(engine, model, request: Request, result, kind: str) -> None:
    prompt = engine.encode(request)
    full = prompt + list(result.token_ids)
    expected = reference_logprobs(model, full, REFERENCE_ADAPTER[kind])  # [T, V]
    assert len(result.logprobs) == len(result.token_ids) == NEW_TOKENS
    for step, entry in enumerate(result.logprobs):
        row = expected[len(prompt) - 1 + step]  # the logits that predicted this token
        assert entry.token_id == result.token_ids[step]
        assert abs(entry.logprob - float(row[entry.token_id])) < 1e-4, (kind, step)
        values, indices = torch.topk(row, TOP)
        assert [token for token, _ in entry.top] == indices.tolist(), (kind, step)
        assert max(abs(a - float(b)) for (_, a), b in zip(entry.top, values)) < 1e-4
        assert len(entry.top_texts) == TOP and entry.text == engine.tokenizer.decode([entry.token_id])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_peft_log_softmax_in_one_batch(world, temperature):
    engine, model = world
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=temperature, seed=3,
                              logprobs=TOP)
    prompts = {"base": "The river bends", "adapter": "Birds fly over the", "mix": "A long time ago"}
    requests = {kind: Request(prompt=prompts[kind], sampling=sampling, **CASES[kind]) for kind in CASES}
    results = dict(zip(requests, engine.generate(list(requests.values()))))
    for kind, request in requests.items():
        check_against_reference(engine, model, request, results[kind], kind)


def test_logprobs_are_of_the_raw_logits_when_processing_changes_the_choice(world):
    engine, model = world
    plain = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    request = Request(prompt="The river bends", adapter="a1", sampling=plain)
    [alone] = engine.generate([request])
    banned = alone.token_ids[0]
    processed = Request(prompt="The river bends", adapter="a1", sampling=SamplingParams(
        max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP, logit_bias=((banned, -100.0),),
        repetition_penalty=1.3, presence_penalty=0.5))
    [result] = engine.generate([processed])
    assert result.token_ids[0] != banned  # the bias changed the greedy choice...
    check_against_reference(engine, model, processed, result, "adapter")  # ...not the log probabilities


def test_no_logprobs_unless_asked(world):
    engine, _ = world
    [result] = engine.generate([Request(prompt="The river", sampling=SamplingParams(max_new_tokens=4))])
    assert result.logprobs == ()
