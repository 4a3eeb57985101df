"""Merge methods served per request (derived adapters) against transformers + PEFT's
add_weighted_adapter on the same NF4 weights, and the derived adapters' lifecycle.

Three PEFT adapters (ranks 4, 8 rsLoRA, 6; different targets) on a tiny random Llama;
a request's mix with `ties`, `dare_linear`, `dare_ties` or `svd` equals PEFT's merge
(seeded as MergeSpec documents) in float32: prefill logits within 1e-3, greedy tokens
identical; in one batch with a plain row, a linear mix and a base row, each row equals
its answer alone; a derived adapter is shared by the same merge only (other weights,
density, seed or member files make another), is listed while resident, is built on the
loader thread (counted), and goes when a member is unregistered.
"""

from __future__ import annotations

import shutil
import time
import warnings
from itertools import count

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model, load_nf4_reference, tiny_engine
from peft import PeftModel

from loraquilt.server.adapters.derived import DERIVED_PREFIX
from loraquilt.server.adapters.merge import MergeSpec
from loraquilt.server.adapters.registry import RegistryEvents, UnknownAdapter
from loraquilt.server.request import Request, RequestError, SamplingParams

NEW_TOKENS = 10
PROMPT = "The quick brown fox jumps over"
RECIPES = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True),
    dict(r=6, lora_alpha=12, target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]),
)
WEIGHTS = (0.6, 0.3, 0.8)
MIX = tuple(zip(("m0", "m1", "m2"), WEIGHTS))
_names = count()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merges")
    base = build_tiny_model(root / "base", "llama", seed=5)
    adapters = [build_peft_adapter(base, root / f"m{i}", seed=50 + i, scale=0.3, **recipe)
                for i, recipe in enumerate(RECIPES)]
    return base, adapters


@pytest.fixture(scope="module")
def peft_model(folders):
    base, adapters = folders
    model = PeftModel.from_pretrained(load_nf4_reference(base), adapters[0], adapter_name="m0")
    for i, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"m{i}")
    return model.eval()


@pytest.fixture(scope="module")
def built():
    return []  # seconds of every derived build of the module's engine


@pytest.fixture(scope="module")
def engine(folders, built):
    base, adapters = folders
    engine = tiny_engine(base, adapters, max_batch_size=8, max_active_adapters=6, max_cpu_adapters=8)
    engine.adapters.events = RegistryEvents(on_derive=built.append)
    for index in range(3):  # tiny_engine registers a0..a2; the merges name them m0..m2
        engine.adapters.unregister(f"a{index}")
        engine.register_adapter(f"m{index}", adapters[index])
    return engine


def merged_request(spec: MergeSpec | None, mix=MIX, prompt: str = PROMPT) -> Request:
    return Request(prompt=prompt, mix=mix, merge=spec,
                   sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def peft_merge(model, spec: MergeSpec) -> str:
    name = f"merged{next(_names)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(spec.seed or 0)
        model.add_weighted_adapter(["m0", "m1", "m2"], list(WEIGHTS), name,
                                   combination_type=spec.peft_combination_type, density=spec.density,
                                   svd_rank=spec.rank)
    return name


@torch.no_grad()
def peft_answer(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    logits, tokens = out.logits[0, -1].float(), []
    for _ in range(NEW_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def engine_answer(engine, request: Request) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens, and the last prefill logits (the first token's logprobs over the whole
    vocabulary would be 20 at most: the logits come from a one-step forward instead)."""
    result = engine.generate([request])[0]
    scored = engine.generate([Request(prompt=request.prompt, mix=request.mix, merge=request.merge,
                                      sampling=SamplingParams(max_new_tokens=1, logprobs=20))])[0]
    return list(result.token_ids), scored.logprobs[0]


@pytest.mark.parametrize("spec", [MergeSpec("ties", density=0.5), MergeSpec("dare_linear", density=0.6, seed=7),
                                  MergeSpec("dare_ties", density=0.4, seed=3, rank=5), MergeSpec("svd", rank=6)],
                         ids=["ties", "dare_linear", "dare_ties", "svd"])
def test_a_merge_equals_peft_add_weighted_adapter(engine, peft_model, spec):
    ids = engine.encode(merged_request(spec))
    peft_model.set_adapter(peft_merge(peft_model, spec))
    expected_tokens, expected_logits = peft_answer(peft_model, ids)
    tokens, first = engine_answer(engine, merged_request(spec))
    assert tokens == expected_tokens
    log_softmax = torch.log_softmax(expected_logits, dim=-1)
    for token, value in first.top:  # the 20 most likely first tokens' log probabilities
        assert abs(value - log_softmax[token].item()) <= 1e-3


def test_rows_of_a_batch_with_merges_equal_their_answers_alone(engine):
    requests = [merged_request(MergeSpec("ties", density=0.5)),
                merged_request(None, prompt="Rivers carry water"),  # linear: the exact in-kernel sum
                Request(prompt="A plain row", adapter="m1", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)),
                Request(prompt="A base row", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)),
                merged_request(MergeSpec("svd"), prompt="Rivers carry water")]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        assert result.token_ids == engine.generate([request])[0].token_ids
    assert batched[1].token_ids != batched[4].token_ids  # svd at the largest rank is not the exact sum


def run(engine, request: Request):
    """Run one request; the sequence (its `adapters` name the derived adapter it ran on)."""
    sequence = engine.add_request(request)
    while not sequence.finished:
        engine.step()
    return sequence


def test_a_derived_adapter_serves_only_its_own_merge(engine, built):
    spec = MergeSpec("dare_ties", density=0.5, seed=1)
    merges = [(spec, MIX), (spec, MIX), (MergeSpec("dare_ties", density=0.6, seed=1), MIX),
              (MergeSpec("dare_ties", density=0.5, seed=2), MIX), (spec, (("m0", 0.6), ("m1", 0.4), ("m2", 0.8))),
              (MergeSpec("ties", density=0.5), MIX)]
    builds = len(built)
    names = []
    for merge, mix in merges:
        (name, weight), = run(engine, merged_request(merge, mix)).adapters
        record = engine.adapters.get(name)
        assert name.startswith(DERIVED_PREFIX) and weight == 1.0 and record.tier != "disk"
        assert record.derived.spec == merge and record.derived.weights == tuple(w for _, w in mix)
        names.append(name)
    assert names[0] == names[1] and len(set(names)) == 5  # the repeated merge shared, every other its own
    assert len({engine.adapters.get(name).content_hash for name in names}) == 5  # prefix-cache identities
    assert len(built) - builds <= 5 and all(seconds < 2.0 for seconds in built)
    listed = [r.name for r in engine.adapters.resident_derived()]
    assert set(names) <= set(listed)


def test_new_member_files_make_a_new_derived_adapter_and_unregistering_drops_it(folders, tmp_path):
    base, adapters = folders
    engine = tiny_engine(base, adapters[:2], max_batch_size=4, max_active_adapters=4)
    spec = MergeSpec("ties", density=0.5)
    mix = (("a0", 0.5), ("a1", 0.5))
    first = engine.generate([merged_request(spec, mix)])[0].token_ids
    (derived,) = engine.adapters.resident_derived()
    assert engine.adapters.records() == [engine.adapters.get("a0"), engine.adapters.get("a1")]  # not listed as registered
    with pytest.raises(UnknownAdapter):
        engine.unregister_adapter(derived.name)  # not a name callers can unregister
    replacement = shutil.copytree(adapters[2], tmp_path / "other")
    engine.unregister_adapter("a1")
    assert engine.adapters.resident_derived() == [] and derived.retired  # a member went: so did the merge
    with pytest.raises(UnknownAdapter):
        engine.generate([merged_request(spec, mix)])
    engine.register_adapter("a1", replacement)  # the same name on other files
    second = engine.generate([merged_request(spec, mix)])[0].token_ids
    (rebuilt,) = engine.adapters.resident_derived()
    assert rebuilt.content_hash != derived.content_hash and second != first


def test_bad_merges_are_refused(engine):
    with pytest.raises(RequestError, match="^merge: .*needs a mix"):
        Request(prompt="x", adapter="m0", merge=MergeSpec("ties", density=0.5))
    with pytest.raises(RequestError, match="^merge.density: "):
        MergeSpec("ties")
    with pytest.raises(RequestError, match="^merge.rank: .*max LoRA rank"):
        engine.generate([merged_request(MergeSpec("svd", rank=64))])
    with pytest.raises(UnknownAdapter):
        engine.generate([merged_request(MergeSpec("svd"), (("m0", 1.0), ("ghost", 1.0)))])
    assert not engine.has_work()


def test_a_derived_build_does_not_hold_up_other_rows(engine):
    """The build runs on the loader thread: a row already decoding keeps stepping."""
    running = engine.add_request(Request(prompt="Keep going", adapter="m0",
                                         sampling=SamplingParams(max_new_tokens=40, ignore_eos=True)))
    for _ in range(3):
        engine.step()
    before = len(running.output_ids)
    merged = engine.add_request(merged_request(MergeSpec("ties", density=0.35, rank=3)))
    started = time.perf_counter()
    while not merged.finished:
        engine.step()
    assert len(running.output_ids) > before and time.perf_counter() - started < 30
    while engine.has_work():
        engine.step()


def test_a_merge_whose_member_goes_while_it_builds_fails_clearly(folders):
    base, adapters = folders
    engine = tiny_engine(base, adapters[:2], max_batch_size=4, max_active_adapters=4)
    sequence = engine.add_request(merged_request(MergeSpec("ties", density=0.4), (("a0", 0.5), ("a1", 0.5))))
    engine.unregister_adapter("a0")  # before the step that would admit it
    outputs = []
    while not outputs:
        outputs = [output for output in engine.step() if output.error is not None]
    assert isinstance(outputs[0].error, UnknownAdapter) and "members was unregistered" in str(outputs[0].error)
    assert sequence.request_id == outputs[0].request_id and not engine.has_work()
