"""DoRA adapters (use_dora) in the folder reader, the scale computation, the slots and the
registry: magnitudes read and refused like every tensor, scales equal to PEFT's own
m / ||W + s·B·A||, slot buffers and bytes, the step's scaled rows, mixes refused."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_adapters import rewrite_tensors
from fixtures_registry import QV, acquire_now, write_adapter
from peft.tuners.lora.dora import DoraLinearLayer
from safetensors.torch import load_file, save_file

from loraquilt.server.adapters.dora import scale_columns, with_dora_scales
from loraquilt.server.adapters.peft_folder import AdapterError, load_peft_adapter
from loraquilt.server.adapters.slots import LoraSpan
from loraquilt.server.model.config import PROJECTIONS
from loraquilt.server.request import RequestError

MAX_RANK = 16
QKV = ("q_proj", "k_proj", "v_proj")


class FakeBase:
    """Random base weights per (layer, projection), as a model gives them to the norms."""

    def __init__(self, model, seed: int = 7):
        generator = torch.Generator().manual_seed(seed)
        self.weights = {(layer, proj): torch.randn(model.projection_shape(proj), generator=generator) * 0.1
                        for layer in range(model.num_layers) for proj in PROJECTIONS}

    def dequantized_projections(self, layer, names):
        for name in names:
            yield name, self.weights[(layer, name)]


def dora_folder(folder, model, seed: int, targets=QV, r: int = 4, magnitude_key: str = "lora_magnitude_vector"):
    """A PEFT DoRA folder: random A, B and magnitudes, use_dora set."""
    write_adapter(folder, model, seed, targets, r)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed + 1000)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        prefix = key.removesuffix(".lora_A.weight")
        out_features = tensors[f"{prefix}.lora_B.weight"].shape[0]
        tensors[f"{prefix}.{magnitude_key}"] = 0.5 + torch.rand(out_features, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def load(folder, model):
    return load_peft_adapter(folder, model, max_rank=MAX_RANK)


# -- the folder ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_magnitudes_are_read_per_module(tmp_path, model, key):
    adapter = load(dora_folder(tmp_path / "d", model, 1, magnitude_key=key), model)
    assert adapter.use_dora and set(adapter.magnitudes) == set(adapter.modules)
    for (layer, proj), magnitude in adapter.magnitudes.items():
        assert magnitude.shape == (model.projection_shape(proj)[0],) and magnitude.dtype == torch.float32
    assert not load(write_adapter(tmp_path / "plain", model, 1), model).use_dora


def test_magnitudes_are_part_of_the_content_hash(tmp_path, model):
    first = load(dora_folder(tmp_path / "a", model, 1), model)
    folder = dora_folder(tmp_path / "b", model, 1)
    rewrite_tensors(folder, lambda t: t.update({k: v * 2 for k, v in t.items() if k.endswith("magnitude_vector")}))
    assert load(folder, model).content_hash != first.content_hash


def _drop_one(tensors):
    del tensors[next(k for k in sorted(tensors) if k.endswith("magnitude_vector"))]


def _reshape_one(tensors):
    key = next(k for k in sorted(tensors) if k.endswith("magnitude_vector"))
    tensors[key] = torch.ones(3)


def _nan_one(tensors):
    key = next(k for k in sorted(tensors) if k.endswith("magnitude_vector"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = float("nan")


@pytest.mark.parametrize("change, fragments", [
    (_drop_one, ["model.layers.0.self_attn.q_proj", "lora_magnitude_vector missing"]),
    (_reshape_one, ["lora_magnitude_vector (3,)", "expected (64,)"]),
    (_nan_one, ["lora_magnitude_vector has NaN"]),
])
def test_broken_magnitudes_are_refused(tmp_path, model, change, fragments):
    folder = dora_folder(tmp_path / "d", model, 1)
    rewrite_tensors(folder, change)
    with pytest.raises(AdapterError) as info:
        load(folder, model)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_a_magnitude_without_use_dora_is_refused(tmp_path, model):
    folder = dora_folder(tmp_path / "d", model, 1)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": False}))
    with pytest.raises(AdapterError, match="DoRA magnitude, but use_dora is not set"):
        load(folder, model)


# -- the scales --------------------------------------------------------------------------


def test_scales_equal_peft_magnitude_over_weight_norm(tmp_path, model):
    """PEFT's own weight norm (fan_in_fan_out off): ||W + scaling * B @ A|| per output row."""
    base = FakeBase(model)
    targets = ("q_proj", "v_proj", "gate_proj", "down_proj")
    folder = dora_folder(tmp_path / "d", model, 3, targets, r=4)
    adapter = with_dora_scales(load(folder, model), base, model)
    raw = load_file(str(folder / "adapter_model.safetensors"))
    norm_of = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm
    columns = scale_columns(model)
    assert adapter.dora_scales.shape == (model.num_layers, max(end for _, end in columns.values()))
    for layer in range(model.num_layers):
        for proj in PROJECTIONS:
            scale = adapter.dora_scales[layer, slice(*columns[proj])]
            if proj not in targets:
                assert torch.equal(scale, torch.ones_like(scale))
                continue
            group = "self_attn" if proj in QKV + ("o_proj",) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            lora_weight = raw[f"{prefix}.lora_B.weight"] @ raw[f"{prefix}.lora_A.weight"]
            expected = raw[f"{prefix}.lora_magnitude_vector"] / norm_of(base.weights[(layer, proj)], lora_weight, 8 / 4)
            torch.testing.assert_close(scale, expected, atol=0, rtol=2e-6)


def test_a_plain_adapter_needs_no_base_and_a_dora_one_does(tmp_path, model):
    plain = load(write_adapter(tmp_path / "p", model, 1), model)
    assert with_dora_scales(plain, None, model) is plain
    with pytest.raises(AdapterError, match="needs the base model's weights"):
        with_dora_scales(load(dora_folder(tmp_path / "d", model, 1), model), None, model)


def test_a_zero_norm_row_is_refused(tmp_path, model):
    base = FakeBase(model)
    adapter = load(dora_folder(tmp_path / "d", model, 1), model)
    module = adapter.modules[(0, "q_proj")]
    base.weights[(0, "q_proj")][5] = -(module.b @ module.a)[5]  # W + s·B·A has a zero row 5
    with pytest.raises(AdapterError, match="model.layers.0.self_attn.q_proj: .* norm zero"):
        with_dora_scales(adapter, base, model)


# -- slots and registry -----------------------------------------------------------------


@pytest.fixture
def dora_registry(registry, slots, model):
    slots.attach_base(FakeBase(model))
    return registry


def test_slot_holds_the_scales_with_ones_elsewhere_and_bytes_count_them(dora_registry, slots, model, tmp_path):
    columns = sum(model.projection_shape(p)[0] for p in PROJECTIONS)
    slot_bytes = sum(t.numel() * 4 for layer in slots.a + slots.b for t in layer.values())
    assert slots.num_bytes == slot_bytes  # no DoRA adapter in a slot yet: no scale buffer
    dora_registry.register("p", write_adapter(tmp_path / "p", model, 2))
    acquire_now(dora_registry, ["p"])
    assert slots.num_bytes == slot_bytes
    record = dora_registry.register("d", dora_folder(tmp_path / "d", model, 1))
    assert record.dora
    adapter = record.host
    magnitude_bytes = sum(m.numel() * 4 for m in adapter.magnitudes.values())
    lora_bytes = sum((m.a.numel() + m.b.numel()) * 4 for m in adapter.modules.values())
    assert adapter.nbytes_in(torch.float32) == lora_bytes + magnitude_bytes + model.num_layers * columns * 4
    assert dora_registry.host_bytes() == sum(r.host.nbytes_in(torch.float32) for r in dora_registry.records())
    lease = acquire_now(dora_registry, ["d"])
    slot = lease.slots[0]
    assert slots.dora.dora[slot]
    assert slots.num_bytes == slot_bytes + model.num_layers * slots.config.num_slots * columns * 4
    for layer in range(model.num_layers):
        assert torch.equal(slots.dora.buffers[layer][slot], adapter.dora_scales[layer])
        for proj in PROJECTIONS:
            held = slots.dora.buffers[layer][slot, slice(*slots.dora.columns[proj])]
            assert (proj in QV) != torch.equal(held, torch.ones_like(held)), (layer, proj)
    dora_registry.release(lease)
    dora_registry.unregister("d")
    assert not slots.dora.dora[slot]


def test_step_scales_only_dora_rows_on_projections_it_targets(dora_registry, slots, model, tmp_path):
    dora_registry.register("d", dora_folder(tmp_path / "d", model, 1, targets=("q_proj", "down_proj")))
    dora_registry.register("p", write_adapter(tmp_path / "p", model, 2))
    d, p = acquire_now(dora_registry, ["d"]), acquire_now(dora_registry, ["p"])
    dslot, pslot = d.slots[0], p.slots[0]
    slots.begin_step([LoraSpan(1, ((pslot, 1.0),)), LoraSpan(2, ((dslot, 1.0),)), LoraSpan(3, ())])
    assert slots.has_dora
    meta = slots._step.dora_meta(QKV)
    assert meta.rows.tolist() == [1, 2] and meta.slots.tolist() == [dslot, dslot] and meta.num_rows == 6
    assert slots._step.dora_meta(("o_proj",)) is None  # not a DoRA target: nothing to scale
    qkv_parts = tuple((name, model.projection_shape(name)[0]) for name in QKV)
    fused = slots.dora_row_scale(1, qkv_parts)  # the fused kernel's argument: the same rows
    assert fused.row_slot.tolist() == [-1, dslot, dslot, -1, -1, -1]
    assert torch.equal(fused.scale, slots.dora.buffers[1][:, :fused.scale.shape[1]])
    assert slots.dora_row_scale(1, (("o_proj", 64),)) is None
    y = torch.ones(6, sum(model.projection_shape(p)[0] for p in QKV))
    slots.dora_scale_(y, 1, qkv_parts)
    q_out = model.projection_shape("q_proj")[0]
    assert torch.equal(y[1, :q_out], d.records[0].host.dora_scales[1, :q_out])
    assert torch.equal(y[1:3, q_out:], torch.ones(2, y.shape[1] - q_out))  # k, v: not targeted
    assert torch.equal(y[[0, 3, 4, 5]], torch.ones(4, y.shape[1]))  # plain and base rows untouched
    slots.begin_step([LoraSpan(1, ((pslot, 1.0),))])
    assert not slots.has_dora
    with pytest.raises(ValueError, match="DoRA adapter in a mix"):
        slots.begin_step([LoraSpan(1, ((dslot, 0.5), (pslot, 0.5)))])
    slots.end_step()


def test_a_mix_with_a_dora_adapter_is_refused_and_pins_nothing(dora_registry, model, tmp_path):
    dora_registry.register("d", dora_folder(tmp_path / "d", model, 1))
    dora_registry.register("p", write_adapter(tmp_path / "p", model, 2))
    for names in (["p", "d"], ["d", "p"]):
        with pytest.raises(RequestError, match="'d' is a DoRA adapter") as info:
            dora_registry.acquire(names)
        assert info.value.field == "adapters"
    assert all(record.pins == 0 and record.holds == 0 for record in dora_registry.records())
    dora_registry.check_mix([("d", 1.0)])
    dora_registry.check_mix([("p", 0.3)])
    with pytest.raises(RequestError, match="'d' is a DoRA adapter"):
        dora_registry.check_mix([("p", 0.5), ("d", 0.5)])
    with pytest.raises(RequestError, match="alone at weight 1"):
        dora_registry.check_mix([("d", 2.0)])


def test_a_registry_without_base_weights_refuses_dora(registry, model, tmp_path):
    with pytest.raises(AdapterError, match="needs the base model's weights"):
        registry.register("d", dora_folder(tmp_path / "d", model, 1))
    assert registry.records() == []
