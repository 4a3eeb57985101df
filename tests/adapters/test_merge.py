"""Per-request adapter merges (server/adapters/merge.py) against PEFT's add_weighted_adapter.

Three PEFT adapters of different ranks and targets (one rsLoRA, one with a rank_pattern)
on a tiny random Llama in float32, loaded with this repo's loader, are merged with every
method; the result's per-module deltas and the model's logits and greedy tokens equal
those of PeftModel.add_weighted_adapter with the mapped combination_type, the same
weights, density, rank and `torch.manual_seed(seed)` right before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from itertools import count

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from loraquilt.server.adapters.merge import MERGE_METHODS, DerivedAdapter, MergeSpec, merge_adapters
from loraquilt.server.adapters.peft_folder import LoadedAdapter, load_peft_adapter
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, model_config_from_hf
from loraquilt.server.request import RequestError

MAX_RANK = 16
PROMPT_IDS = [[5, 17, 42, 99, 3, 250, 7, 61, 128, 33, 12, 8]]
RECIPES = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True),
    dict(r=6, lora_alpha=12, target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"],
         rank_pattern={"model.layers.1.mlp.down_proj": 2}),
)
_names = count()


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if proj in ATTENTION_PROJECTIONS else 'mlp'}.{proj}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(members loaded by this repo, PeftModel holding them as m0..m2, the base model)."""
    root = tmp_path_factory.mktemp("merge")
    base_folder = build_tiny_model(root / "base", "llama", seed=3)
    folders = [build_peft_adapter(base_folder, root / f"m{i}", seed=10 + i, scale=0.2, **recipe)
               for i, recipe in enumerate(RECIPES)]
    config = model_config_from_hf(AutoConfig.from_pretrained(base_folder))
    members = [load_peft_adapter(folder, config, max_rank=MAX_RANK) for folder in folders]
    peft_model = PeftModel.from_pretrained(load_base(base_folder), folders[0], adapter_name="m0")
    for i, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(folder, adapter_name=f"m{i}")
    return members, peft_model.eval(), load_base(base_folder)


def load_base(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_merge(peft_model, indices, weights, spec: MergeSpec) -> str:
    """The merged adapter PEFT makes, seeded as MergeSpec.seed documents; its name."""
    name = f"merged{next(_names)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density 1: PEFT warns that nothing is pruned
        torch.manual_seed(spec.seed or 0)
        peft_model.add_weighted_adapter(
            [f"m{i}" for i in indices], list(weights), name, combination_type=spec.peft_combination_type,
            density=spec.density, svd_rank=spec.rank,
        )
    return name


def peft_deltas(peft_model, name: str) -> dict[str, torch.Tensor]:
    deltas = {}
    for module_path, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            deltas[module_path] = module.get_delta_weight(name).detach()  # [out, in]
    return deltas


@contextlib.contextmanager
def applied(model, adapter: LoadedAdapter):
    """The base model with every module's delta (B @ A, scaling folded in B) added."""
    saved = {}
    with torch.no_grad():
        for (layer, proj), module in adapter.modules.items():
            linear = model.get_submodule(module_name(layer, proj))
            saved[linear] = linear.weight.clone()
            linear.weight += module.b.float() @ module.a.float()
    try:
        yield model
    finally:
        with torch.no_grad():
            for linear, weight in saved.items():
                linear.weight.copy_(weight)


@torch.no_grad()
def logits_and_greedy(model) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor(PROMPT_IDS)
    logits = model(input_ids=ids).logits
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                         min_new_tokens=8, do_sample=False, pad_token_id=0)
    return logits, out[0, ids.shape[1]:].tolist()


CASES = [
    ("linear", MergeSpec(), (0, 1, 2), (0.6, 0.3, 0.8)),
    ("cat", MergeSpec("cat"), (0, 1, 2), (0.6, -0.3, 0.8)),
    ("svd", MergeSpec("svd"), (0, 1, 2), (0.6, 0.3, 0.8)),
    ("svd-rank", MergeSpec("svd", rank=3), (0, 1, 2), (1.0, 0.5, 0.7)),
    ("ties", MergeSpec("ties", density=0.5), (0, 1, 2), (0.6, 0.3, 0.8)),
    ("ties-rank", MergeSpec("ties", density=0.3, rank=12), (2, 0, 1), (1.2, -0.4, 0.5)),
    ("ties-dense", MergeSpec("ties", density=1.0), (0, 1), (0.5, 0.5)),
    ("dare_linear", MergeSpec("dare_linear", density=0.6, seed=7), (0, 1, 2), (0.6, 0.3, 0.8)),
    ("dare_ties", MergeSpec("dare_ties", density=0.4, seed=3, rank=5), (0, 1, 2), (0.9, 0.4, 0.6)),
    ("dare_ties-pair", MergeSpec("dare_ties", density=0.7), (2, 1), (0.8, 0.5)),
    ("one-member", MergeSpec("ties", density=0.5, rank=2), (2,), (0.7,)),
]


@pytest.mark.parametrize(("spec", "indices", "weights"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_merge_equals_peft(world, spec, indices, weights):
    members, peft_model, base = world
    state = torch.random.get_rng_state()
    derived = merge_adapters([members[i] for i in indices], weights, spec)
    assert torch.equal(torch.random.get_rng_state(), state), "the merge touched the global generator"
    name = peft_merge(peft_model, indices, weights, spec)

    expected = peft_deltas(peft_model, name)
    ours = {module_name(*key): module.b @ module.a for key, module in derived.modules.items()}
    assert set(ours) <= set(expected)
    for path, delta in expected.items():
        got = ours.get(path, torch.zeros_like(delta))
        scale = float(delta.abs().max())
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, p=path: f"{p}: {m}")

    if spec.derives and len(indices) > 1:
        assert derived.rank == (spec.rank or max(members[i].rank for i in indices))
    peft_model.set_adapter(name)
    want_logits, want_tokens = logits_and_greedy(peft_model)
    with applied(base, derived) as model:
        got_logits, got_tokens = logits_and_greedy(model)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-3)
    assert got_tokens == want_tokens


@pytest.mark.parametrize(("spec", "indices"), [(MergeSpec("svd"), (1, 0)), (MergeSpec("cat"), (1,))])
def test_peft_scales_by_sqrt_rank_after_an_rslora_first_member(world, spec, indices):
    """PEFT's merged adapter copies the first adapter's use_rslora, so its scaling is
    rank / sqrt(rank) instead of 1: the one way its result departs from the mix's sum
    (and depends on the members' order). The merge here keeps scaling 1."""
    members, peft_model, _ = world
    weights = (0.6, 0.3)[: len(indices)]
    derived = merge_adapters([members[i] for i in indices], weights, spec)
    name = peft_merge(peft_model, indices, weights, spec)
    rank = peft_model.peft_config[name].r
    for path, delta in peft_deltas(peft_model, name).items():
        module = derived.modules[next(key for key in derived.modules if module_name(*key) == path)]
        torch.testing.assert_close(module.b @ module.a * rank**0.5, delta, rtol=1e-4,
                                   atol=1e-4 * float(delta.abs().max()))


def test_result_is_a_loaded_adapter(world):
    members, _, _ = world
    spec = MergeSpec("dare_linear", density=0.5, seed=11)
    derived = merge_adapters(members, (0.5, 0.2, 0.3), spec)
    assert isinstance(derived, DerivedAdapter) and isinstance(derived, LoadedAdapter)
    assert derived.spec == spec and derived.weights == (0.5, 0.2, 0.3)
    assert derived.member_hashes == tuple(m.content_hash for m in members)
    assert derived.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert all(module.a.shape[0] == module.b.shape[1] == 8 for module in derived.modules.values())
    assert derived.size_bytes == derived.nbytes_in(torch.float32)
    again = merge_adapters(members, (0.5, 0.2, 0.3), spec)
    assert again.content_hash == derived.content_hash
    other = merge_adapters(members, (0.5, 0.2, 0.3), MergeSpec("dare_linear", density=0.5, seed=12))
    assert other.content_hash != derived.content_hash
    half = merge_adapters(members, (0.5, 0.2, 0.3), spec, dtype=torch.bfloat16)
    assert {m.a.dtype for m in half.modules.values()} == {torch.bfloat16}
    assert half.content_hash != derived.content_hash


def test_linear_is_the_exact_concatenation(world):
    members, _, _ = world
    derived = merge_adapters(members, (0.6, 0.3, 0.8), MergeSpec("linear"))
    key = (1, "down_proj")  # all three members, ranks 4 + 8 + 2
    assert derived.modules[key].rank == 14 and derived.rank == 18  # layer 0: 4 + 8 + 6
    want = sum(w * m.modules[key].b @ m.modules[key].a for m, w in zip(members, (0.6, 0.3, 0.8)))
    torch.testing.assert_close(derived.modules[key].b @ derived.modules[key].a, want)
    assert not MergeSpec("linear").derives and not MergeSpec("cat").derives


def test_rank_over_the_limit_is_refused(world):
    members, _, _ = world
    with pytest.raises(RequestError) as error:
        merge_adapters(members, (1, 1, 1), MergeSpec("svd", rank=12), max_rank=8)
    assert error.value.field == "merge.rank"
    with pytest.raises(RequestError) as error:
        merge_adapters(members, (1, 1, 1), MergeSpec("cat"), max_rank=MAX_RANK)  # 4 + 8 + 6 = 18
    assert error.value.field == "adapters"
    with pytest.raises(RequestError) as error:
        merge_adapters(members, (1, 1), MergeSpec("svd"))
    assert error.value.field == "adapters.weight"
    with pytest.raises(RequestError) as error:
        merge_adapters(members, (1, float("nan"), 1), MergeSpec("svd"))
    assert error.value.field == "adapters.weight"
    with pytest.raises(RequestError) as error:
        merge_adapters([], (), MergeSpec())
    assert error.value.field == "adapters"


@pytest.mark.skipif("magnitudes" not in LoadedAdapter.__dataclass_fields__, reason="no DoRA adapters here")
def test_dora_members_are_refused(world):
    members, _, _ = world
    dora = dataclasses.replace(members[1], magnitudes={key: torch.ones(module.b.shape[0])
                                                       for key, module in members[1].modules.items()})
    with pytest.raises(RequestError) as error:
        merge_adapters([members[0], dora], (0.5, 0.5), MergeSpec("svd"))
    assert error.value.field == "adapters" and "DoRA" in str(error.value)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(method="sum"), "method"),
    (dict(method="TIES", density=0.5), "method"),
    (dict(method="ties_svd", density=0.5), "method"),
    (dict(method="ties"), "density"),
    (dict(method="ties", density=0.0), "density"),
    (dict(method="ties", density=1.5), "density"),
    (dict(method="dare_linear", density=float("nan")), "density"),
    (dict(method="dare_ties", density=True), "density"),
    (dict(method="dare_ties", density="0.5"), "density"),
    (dict(method="linear", density=0.5), "density"),
    (dict(method="svd", density=0.5), "density"),
    (dict(method="dare_linear", density=0.5, seed=-1), "seed"),
    (dict(method="dare_linear", density=0.5, seed=2**64), "seed"),
    (dict(method="dare_linear", density=0.5, seed=1.0), "seed"),
    (dict(method="ties", density=0.5, seed=1), "seed"),
    (dict(method="svd", seed=1), "seed"),
    (dict(method="linear", rank=4), "rank"),
    (dict(method="cat", rank=4), "rank"),
    (dict(method="svd", rank=0), "rank"),
    (dict(method="svd", rank=True), "rank"),
    (dict(method="ties", density=0.5, rank=2.0), "rank"),
])
def test_spec_refuses(kwargs, field):
    with pytest.raises(RequestError) as error:
        MergeSpec(**kwargs)
    assert error.value.field == f"merge.{field}"


def test_spec_defaults_and_keys():
    assert MergeSpec().method == "linear" and MERGE_METHODS == (
        "linear", "cat", "ties", "dare_linear", "dare_ties", "svd")
    assert MergeSpec("dare_ties", density=1).density == 1.0
    assert MergeSpec("dare_ties", density=0.5).seed == 0
    assert MergeSpec("dare_ties", density=0.5) == MergeSpec("dare_ties", density=0.5, seed=0)
    assert MergeSpec().key == MergeSpec("cat").key == "linear"
    assert MergeSpec("svd").key == "svd"
    assert MergeSpec("svd", rank=4).key == "svd;rank=4"
    assert MergeSpec("ties", density=0.25).key == "ties;density=0.25"
    assert MergeSpec("dare_linear", density=0.5, seed=9, rank=3).key == "dare_linear;density=0.5;seed=9;rank=3"
    keys = {MergeSpec("ties", density=d).key for d in (0.1, 0.2, 0.30000000000000004, 0.3)}
    assert len(keys) == 4
    assert {MergeSpec(m, density=0.5).peft_combination_type for m in ("ties", "dare_linear", "dare_ties")} == {
        "ties_svd", "dare_linear_svd", "dare_ties_svd"}
