"""Reading and validating PEFT LoRA folders (adapter_config.json + adapter_model.safetensors).

Folders are written by hand so every field and tensor is under the test's control: a valid
folder is built by `write_adapter`, then each refusal test breaks exactly one thing.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from loraquilt.server.adapters.peft_folder import AdapterError, load_peft_adapter, read_adapter_config
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig, model_config_from_hf

MAX_RANK = 16
QV = ("q_proj", "v_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model() -> ModelConfig:
    return model_config_from_hf(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))


# -- builders ---------------------------------------------------------------------------


def module_name(layer: int, proj: str) -> str:
    group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{proj}"


def peft_key(layer: int, proj: str, half: str) -> str:
    """PEFT's saved name of a LoRA tensor; half is "A" or "B"."""
    return f"base_model.model.{module_name(layer, proj)}.lora_{half}.weight"


def lora_tensors(model: ModelConfig, targets=QV, *, r: int = 4, layers=None, rank_of=None,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random A [r, in] / B [out, r] for every (layer, target); rank_of(layer, proj) overrides r."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model.num_layers) if layers is None else layers:
        for proj in targets:
            rank = rank_of(layer, proj) if rank_of else r
            out_features, in_features = model.projection_shape(proj)
            tensors[peft_key(layer, proj, "A")] = torch.randn(rank, in_features, generator=generator).to(dtype)
            tensors[peft_key(layer, proj, "B")] = torch.randn(out_features, rank, generator=generator).to(dtype)
    return tensors


def adapter_config(targets=QV, *, r: int = 4, alpha: float = 8, **fields) -> dict:
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama",
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": list(targets),
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    config.update(fields)
    return config


def write_adapter(folder: Path, model: ModelConfig, targets=QV, *, r: int = 4, alpha: float = 8,
                  config: dict | None = None, tensors: dict | None = None, **fields) -> Path:
    """A valid adapter folder unless `config` / `tensors` / extra config fields say otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = adapter_config(targets, r=r, alpha=alpha, **fields)
    with open(folder / CONFIG_FILE, "w") as handle:
        json.dump(config, handle)
    if tensors is None:
        tensors = lora_tensors(model, targets, r=r)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def load(folder: Path, model: ModelConfig, dtype: torch.dtype = torch.float32):
    return load_peft_adapter(folder, model, max_rank=MAX_RANK, dtype=dtype)


def expect_refusal(folder: Path, model: ModelConfig, *fragments: str) -> str:
    """Loading must raise AdapterError whose message contains every fragment."""
    with pytest.raises(AdapterError) as info:
        load(folder, model)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- valid adapters ---------------------------------------------------------------------


def test_q_v_adapter_loads_with_scaled_b(tmp_path, model):
    tensors = lora_tensors(model, QV, r=4)
    folder = write_adapter(tmp_path / "qv", model, QV, r=4, alpha=16, tensors=tensors)
    adapter = load(folder, model)

    assert set(adapter.modules) == {(layer, proj) for layer in range(2) for proj in QV}
    for (layer, proj), module in adapter.modules.items():
        assert module.rank == 4
        assert torch.equal(module.a, tensors[peft_key(layer, proj, "A")])
        torch.testing.assert_close(module.b, tensors[peft_key(layer, proj, "B")] * (16 / 4))
    assert adapter.rank == 4
    assert adapter.target_modules == QV
    assert adapter.path == folder
    assert adapter.size_bytes == (folder / WEIGHTS_FILE).stat().st_size
    assert adapter.warnings == ()


def test_all_seven_projections(tmp_path, model):
    tensors = lora_tensors(model, PROJECTIONS, r=8)
    folder = write_adapter(tmp_path / "all", model, PROJECTIONS, r=8, alpha=8, tensors=tensors)
    adapter = load(folder, model)

    assert adapter.target_modules == PROJECTIONS
    assert len(adapter.modules) == 2 * len(PROJECTIONS)
    for (layer, proj), module in adapter.modules.items():
        out_features, in_features = model.projection_shape(proj)
        assert module.a.shape == (8, in_features)
        assert module.b.shape == (out_features, 8)
        torch.testing.assert_close(module.b, tensors[peft_key(layer, proj, "B")])  # alpha / r == 1
        assert module.a.is_contiguous() and module.b.is_contiguous()


def test_target_modules_order_follows_the_model(tmp_path, model):
    targets = ("down_proj", "v_proj", "q_proj")
    adapter = load(write_adapter(tmp_path / "a", model, targets), model)
    assert adapter.target_modules == ("q_proj", "v_proj", "down_proj")


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path, model):
    tensors = lora_tensors(model, QV, r=4)
    folder = write_adapter(tmp_path / "rs", model, QV, r=4, alpha=8, use_rslora=True, tensors=tensors)
    adapter = load(folder, model)
    for (layer, proj), module in adapter.modules.items():
        torch.testing.assert_close(module.b, tensors[peft_key(layer, proj, "B")] * (8 / math.sqrt(4)))


def test_rank_and_alpha_patterns_apply_per_module(tmp_path, model):
    """A projection-wide key ("q_proj") and a layer-specific one each set their module's
    rank and alpha; other modules keep the defaults."""
    rank_pattern = {"q_proj": 2, "model.layers.1.mlp.down_proj": 8}
    alpha_pattern = {"q_proj": 6, "model.layers.1.mlp.down_proj": 32}
    targets = ("q_proj", "v_proj", "down_proj")

    def rank_of(layer, proj):
        return {"q_proj": 2}.get(proj, 8 if (layer, proj) == (1, "down_proj") else 4)

    tensors = lora_tensors(model, targets, rank_of=rank_of)
    folder = write_adapter(tmp_path / "pat", model, targets, r=4, alpha=8, tensors=tensors,
                           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    adapter = load(folder, model)

    expected = {  # (rank, scaling)
        "q_proj": (2, 6 / 2), "v_proj": (4, 8 / 4), "down_proj": (4, 8 / 4),
    }
    for (layer, proj), module in adapter.modules.items():
        rank, scaling = (8, 32 / 8) if (layer, proj) == (1, "down_proj") else expected[proj]
        assert module.rank == rank, (layer, proj)
        torch.testing.assert_close(module.b, tensors[peft_key(layer, proj, "B")] * scaling)
    assert adapter.rank == 8


@pytest.mark.parametrize("rank_pattern, layer0_rank, layer1_rank", [
    ({"down_proj": 2, "model.layers.1.mlp.down_proj": 8}, 2, 2),
    ({"model.layers.1.mlp.down_proj": 8, "down_proj": 2}, 2, 8),
    ({r"layers\.1\.mlp\.down_proj": 8}, 4, 8),
    ({"proj": 2}, 4, 4),  # matches only a whole dotted suffix, not the end of "down_proj"
    ({"layers.1.mlp.down": 8}, 4, 4),  # the key must reach the end of the name
], ids=["general-first", "specific-first", "regex-key", "partial-word", "not-anchored-at-end"])
def test_pattern_matching_follows_peft_first_match_rule(tmp_path, model, rank_pattern, layer0_rank, layer1_rank):
    """PEFT picks the first key k with re.match(rf"(.*\\.)?({k})$", name), in dict order,
    not the most specific one."""
    ranks = {0: layer0_rank, 1: layer1_rank}
    tensors = lora_tensors(model, ("down_proj",), rank_of=lambda layer, proj: ranks[layer])
    folder = write_adapter(tmp_path / "p", model, ("down_proj",), r=4, tensors=tensors,
                           rank_pattern=rank_pattern)
    adapter = load(folder, model)
    assert adapter.modules[(0, "down_proj")].rank == layer0_rank
    assert adapter.modules[(1, "down_proj")].rank == layer1_rank


def test_target_modules_as_regex_string(tmp_path, model):
    folder = write_adapter(tmp_path / "re", model, QV)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["target_modules"] = r".*\.(q_proj|v_proj)$"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    adapter = load(folder, model)
    assert adapter.target_modules == QV


def test_bf16_weights_are_converted_to_the_requested_dtype(tmp_path, model):
    tensors = lora_tensors(model, QV, r=4, dtype=torch.bfloat16)
    folder = write_adapter(tmp_path / "bf16", model, QV, r=4, alpha=8, tensors=tensors)
    adapter = load(folder, model, dtype=torch.float16)
    for (layer, proj), module in adapter.modules.items():
        assert module.a.dtype == module.b.dtype == torch.float16
        expected_a = tensors[peft_key(layer, proj, "A")].float()
        expected_b = tensors[peft_key(layer, proj, "B")].float() * 2
        torch.testing.assert_close(module.a.float(), expected_a, rtol=1e-3, atol=0)
        torch.testing.assert_close(module.b.float(), expected_b, rtol=1e-3, atol=0)


@pytest.mark.parametrize("value", [None, False], ids=["null", "false"])
def test_unknown_field_with_off_value_is_accepted(tmp_path, model, value):
    folder = write_adapter(tmp_path / "a", model, some_future_feature=value)
    assert load(folder, model).target_modules == QV


def test_read_adapter_config_returns_the_config(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model, r=4, alpha=8)
    config = read_adapter_config(folder, MAX_RANK)
    assert config["r"] == 4 and config["lora_alpha"] == 8


# -- refusals: the folder and the config file -------------------------------------------


def test_missing_folder(tmp_path, model):
    expect_refusal(tmp_path / "nowhere", model, "nowhere", "does not exist")


def test_missing_config(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / CONFIG_FILE).unlink()
    expect_refusal(folder, model, CONFIG_FILE)


def test_config_not_json(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / CONFIG_FILE).write_text("{'r': 8,")
    expect_refusal(folder, model, CONFIG_FILE, "not valid JSON")


def test_config_a_json_list(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / CONFIG_FILE).write_text(json.dumps([adapter_config()]))
    expect_refusal(folder, model, CONFIG_FILE, "JSON object")


def test_config_too_large(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model, padding="x" * (1 << 20))
    expect_refusal(folder, model, CONFIG_FILE, "larger than")


@pytest.mark.parametrize("fields, fragments", [
    pytest.param({"peft_type": "IA3"}, ["peft_type", "IA3"], id="ia3"),
    pytest.param({"use_dora": "yes"}, ["use_dora", "'yes'"], id="dora-not-a-flag"),
    pytest.param({"bias": "all"}, ["bias"], id="bias-all"),
    pytest.param({"lora_bias": True}, ["lora_bias"], id="lora-bias"),
    pytest.param({"modules_to_save": ["classifier"]}, ["modules_to_save", "classifier"], id="modules-to-save-other"),
    pytest.param({"fan_in_fan_out": True}, ["fan_in_fan_out"], id="fan-in-fan-out"),
    pytest.param({"some_future_feature": True}, ["some_future_feature"], id="unknown-field"),
    pytest.param({"r": 0}, ["r must be >= 1"], id="r-zero"),
    pytest.param({"r": 32}, ["r = 32", f"max LoRA rank {MAX_RANK}"], id="r-over-max"),
    pytest.param({"rank_pattern": {"q_proj": 32}}, ["rank_pattern['q_proj']", "32"], id="rank-pattern-over-max"),
    pytest.param({"lora_alpha": float("nan")}, ["lora_alpha", "nan"], id="alpha-nan"),
    pytest.param({"lora_alpha": "16"}, ["lora_alpha", "'16'"], id="alpha-string"),
    pytest.param({"alpha_pattern": {"v_proj": float("inf")}}, ["alpha_pattern['v_proj']"], id="alpha-pattern-inf"),
    pytest.param({"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, ["target_modules", "embed_tokens"],
                 id="embed-tokens"),
])
def test_config_refusals_name_the_field(tmp_path, model, fields, fragments):
    folder = write_adapter(tmp_path / "a", model, **fields)
    expect_refusal(folder, model, *fragments)


def test_nan_alpha_is_written_as_a_json_nan_literal(tmp_path, model):
    """Python's json writes NaN as a bare literal, which json.loads reads back as a float."""
    folder = write_adapter(tmp_path / "a", model, lora_alpha=float("nan"))
    assert '"lora_alpha": NaN' in (folder / CONFIG_FILE).read_text()


# -- refusals: the weights file -----------------------------------------------------------


def test_missing_weights(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / WEIGHTS_FILE).unlink()
    expect_refusal(folder, model, WEIGHTS_FILE)


def test_pickle_weights_only(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / WEIGHTS_FILE).unlink()
    torch.save(lora_tensors(model), folder / "adapter_model.bin")
    expect_refusal(folder, model, "adapter_model.bin", "pickle", WEIGHTS_FILE)


def test_safetensors_without_tensors(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model, tensors={})
    expect_refusal(folder, model, WEIGHTS_FILE, "no LoRA weights")


def test_truncated_safetensors(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    expect_refusal(folder, model, WEIGHTS_FILE)


def test_garbage_safetensors(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model)
    (folder / WEIGHTS_FILE).write_bytes(random.Random(1).randbytes(4096))
    expect_refusal(folder, model, WEIGHTS_FILE)


def test_huge_weights_file_refused_by_size_before_reading(tmp_path, model):
    """A sparse 1 GiB file costs nothing on disk; reading it would. The size check must
    refuse it from its length alone."""
    folder = write_adapter(tmp_path / "a", model)
    with open(folder / WEIGHTS_FILE, "r+b") as handle:
        handle.truncate(1 << 30)
    start = time.perf_counter()
    expect_refusal(folder, model, WEIGHTS_FILE, str(1 << 30))
    assert time.perf_counter() - start < 2.0


def _write_with(tmp_path, model, mutate, *, r: int = 4) -> Path:
    """A q/v adapter whose tensors dict went through `mutate` before saving."""
    tensors = lora_tensors(model, QV, r=r)
    mutate(tensors)
    return write_adapter(tmp_path / "a", model, QV, r=r, tensors=tensors)


def test_wrong_in_features(tmp_path, model):
    def narrow_a(tensors):
        tensors[peft_key(0, "q_proj", "A")] = torch.randn(4, 63)

    folder = _write_with(tmp_path, model, narrow_a)
    expect_refusal(folder, model, "model.layers.0.self_attn.q_proj", "(4, 63)", "(4, 64)")


def test_tensor_rank_differs_from_config_r(tmp_path, model):
    tensors = lora_tensors(model, QV, r=3)
    folder = write_adapter(tmp_path / "a", model, QV, r=4, tensors=tensors)
    expect_refusal(folder, model, "model.layers.0.self_attn.q_proj", "(3, 64)", "expected (4, 64)")


def test_a_and_b_ranks_disagree(tmp_path, model):
    def wide_b(tensors):
        tensors[peft_key(1, "v_proj", "B")] = torch.randn(32, 5)

    folder = _write_with(tmp_path, model, wide_b)
    expect_refusal(folder, model, "model.layers.1.self_attn.v_proj", "(32, 5)")


def test_nan_in_b(tmp_path, model):
    def poison(tensors):
        tensors[peft_key(1, "v_proj", "B")][3, 2] = float("nan")

    folder = _write_with(tmp_path, model, poison)
    expect_refusal(folder, model, "model.layers.1.self_attn.v_proj.lora_B", "NaN")


def test_inf_in_a(tmp_path, model):
    def poison(tensors):
        tensors[peft_key(0, "q_proj", "A")][0, 0] = float("-inf")

    folder = _write_with(tmp_path, model, poison)
    expect_refusal(folder, model, "model.layers.0.self_attn.q_proj.lora_A", "infinite")


def test_integer_weights(tmp_path, model):
    def to_int(tensors):
        key = peft_key(0, "q_proj", "A")
        tensors[key] = tensors[key].to(torch.int32)

    folder = _write_with(tmp_path, model, to_int)
    expect_refusal(folder, model, "model.layers.0.self_attn.q_proj.lora_A", "torch.int32")


def test_tensor_for_unknown_module(tmp_path, model):
    def add_rotary(tensors):
        tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.randn(4, 64)

    folder = _write_with(tmp_path, model, add_rotary)
    expect_refusal(folder, model, "self_attn.rotary.lora_A")


def test_projection_under_the_wrong_block(tmp_path, model):
    def misplace(tensors):
        tensors["base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"] = torch.randn(4, 64)

    folder = _write_with(tmp_path, model, misplace)
    expect_refusal(folder, model, "mlp.q_proj")


def test_layer_beyond_the_model(tmp_path, model):
    def add_layer(tensors):
        tensors.update(lora_tensors(model, ("q_proj",), layers=[2]))

    folder = _write_with(tmp_path, model, add_layer)
    expect_refusal(folder, model, "layers.2", "layer 2", "has 2")


def test_lora_a_without_lora_b(tmp_path, model):
    def drop_b(tensors):
        del tensors[peft_key(1, "q_proj", "B")]

    folder = _write_with(tmp_path, model, drop_b)
    expect_refusal(folder, model, "model.layers.1.self_attn.q_proj", "lora_B")


def test_dora_magnitude_vector(tmp_path, model):
    def add_magnitude(tensors):
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)

    folder = _write_with(tmp_path, model, add_magnitude)
    expect_refusal(folder, model, "lora_magnitude_vector")


# -- known defects --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, values, dtype", [
    (1e300, 1.0, torch.float32),  # alpha / r overflows fp32
    (8, 1e5, torch.float16),  # finite fp32 B, out of fp16 range
], ids=["huge-alpha", "fp16-overflow"])
def test_weights_that_overflow_after_scaling_are_refused(tmp_path, model, alpha, values, dtype):
    tensors = lora_tensors(model, QV, r=4)
    tensors[peft_key(0, "q_proj", "B")].fill_(values)
    folder = write_adapter(tmp_path / "a", model, QV, r=4, alpha=alpha, tensors=tensors)
    with pytest.raises(AdapterError, match="model.layers.0.self_attn.q_proj"):
        load(folder, model, dtype=dtype)


@pytest.mark.parametrize("fields", [
    {"rank_pattern": ["q_proj"]},
    {"alpha_pattern": "q_proj"},
    {"rank_pattern": {"q_proj(": 4}},
], ids=["rank-pattern-list", "alpha-pattern-string", "rank-pattern-bad-regex"])
def test_malformed_patterns_are_refused(tmp_path, model, fields):
    folder = write_adapter(tmp_path / "a", model, **fields)
    with pytest.raises(AdapterError, match="_pattern"):
        load(folder, model)
