"""Helpers of the adapter registry's tests (tests/adapters): an event log, PEFT folders
with random weights, acquiring as a waiting request does, and checks of slot contents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraquilt.server.adapters.peft_folder import load_peft_adapter
from loraquilt.server.adapters.registry import Acquired, AdapterRegistry, Lease, RegistryEvents
from loraquilt.server.adapters.slots import LoraSlots
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig

MAX_RANK = 16
QV = ("q_proj", "v_proj")


class EventLog:
    def __init__(self):
        self.loads: list[float] = []
        self.evictions: list[str] = []

    def events(self) -> RegistryEvents:
        return RegistryEvents(on_load=self.loads.append, on_evict=self.evictions.append)


def write_adapter(folder: Path, model: ModelConfig, seed: int, targets=QV, r: int = 4) -> Path:
    """A valid PEFT LoRA folder with random weights."""
    folder.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model.num_layers):
        for proj in targets:
            group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            out_features, in_features = model.projection_shape(proj)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def acquire_now(registry: AdapterRegistry, names: list[str]) -> Lease | None:
    """acquire() as a waiting request sees it over several engine steps: whatever must be
    read from disk is read on the loader thread, then the next try pins it. None when
    there is no room now (the hold is given up)."""
    hold = None
    for _ in range(1000):
        got = registry.acquire(names, hold)
        if got.status == Acquired.LEASED:
            return got.lease
        if got.status == Acquired.NO_ROOM:
            registry.release_hold(got.hold)
            return None
        hold = got.hold
        assert hold.wait(timeout=30)
    raise AssertionError(f"{names} never became resident")


def register_all(registry: AdapterRegistry, make, *names: str, targets=QV) -> None:
    for name in names:
        registry.register(name, make(name, targets))


def assert_slot_holds(slots: LoraSlots, slot: int, folder: Path, model: ModelConfig) -> None:
    """The slot's buffers hold exactly the adapter in `folder`: its A/B in the first r rows,
    zero padding after them, and zero on every projection it does not target."""
    adapter = load_peft_adapter(folder, model, max_rank=MAX_RANK, dtype=torch.float32)
    for layer in range(model.num_layers):
        for proj in PROJECTIONS:
            a, b = slots.a[layer][proj][slot], slots.b[layer][proj][slot]
            module = adapter.modules.get((layer, proj))
            if module is None:
                assert not a.any() and not b.any(), f"leftover on layer {layer} {proj}"
                continue
            r = module.rank
            assert torch.equal(a[:r], module.a)
            assert torch.equal(b[:, :r], module.b)
            assert not a[r:].any() and not b[:, r:].any(), f"leftover padding on layer {layer} {proj}"
    assert slots.targets[slot] == frozenset(adapter.target_modules)


def assert_slot_empty(slots: LoraSlots, slot: int) -> None:
    for layer in range(len(slots.a)):
        for proj in PROJECTIONS:
            assert not slots.a[layer][proj][slot].any() and not slots.b[layer][proj][slot].any()
    assert slots.targets[slot] == frozenset()


def tiers(registry: AdapterRegistry) -> dict[str, str]:
    return {record.name: record.tier for record in registry.records()}
