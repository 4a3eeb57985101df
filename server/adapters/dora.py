"""DoRA adapters (PEFT `use_dora`): each module's output scale m / ||W + s·B·A||, computed
once when the adapter is read, and the slots' buffers of those scales.

PEFT 0.21.2 (`peft/tuners/lora/dora.py`, `DoraLinearLayer.forward`, in eval mode: no
dropout) adds to a module's base output `base = W x`
    (mag_norm_scale - 1) * base + mag_norm_scale * s·B·A·x,
    mag_norm_scale = m / ||W + s·B·A||   (per output row: the L2 norm over the input dim)
with W dequantized from NF4 (`dequantize_module_weight`) and fan_in_fan_out off (the
folder reader refuses it), that is  y = mag_norm_scale ⊙ (W x + s·B·A·x): the plain LoRA
output times a per-output scale. The norm depends on the weights only, so it is computed
here once, on the thread that reads the adapter (never inside a step), against the NF4
base as this server holds it (the values its forward multiplies by). In a step, the rows
on a DoRA slot multiply each projection's whole output by their scale
(`kernels.lora.row_scale_`); rows on other slots or none are untouched.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

import torch

from loraquilt.kernels.lora import RowScaleMeta, row_scale_
from loraquilt.server.adapters.peft_folder import AdapterError, LoadedAdapter
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig


class BaseWeights(Protocol):
    """Where the DoRA norms read the base model's weights (the model: CausalLM)."""

    def dequantized_projections(self, layer: int, names: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, W [out, in]) for each projection of `names` in `layer`: the values its
        forward multiplies by."""


def with_dora_scales(adapter: LoadedAdapter, base: BaseWeights | None) -> LoadedAdapter:
    """The adapter with every module's DoRA output scale m / ||W + s·B·A|| ([out] float32,
    CPU); a plain LoRA adapter as it is. B·A is the adapter's as the slots hold it (scaling
    folded into B, in the slot dtype); the sum and its norm in float32.

    Cost: per module one dequantize of its NF4 weight (a fused q/k/v or gate/up weight
    once per layer), one rank-r GEMM update of [out, in] and a row norm."""
    if not adapter.use_dora:
        return adapter
    if base is None:
        raise AdapterError("a DoRA adapter (use_dora) needs the base model's weights for its norms, "
                           "and this registry has none attached")
    by_layer: dict[int, list[str]] = {}
    for layer, proj in adapter.modules:
        by_layer.setdefault(layer, []).append(proj)
    scales: dict[tuple[int, str], torch.Tensor] = {}
    for layer, names in sorted(by_layer.items()):
        for proj, weight in base.dequantized_projections(layer, names):  # [out, in]
            module = adapter.modules[(layer, proj)]
            device = weight.device
            merged = torch.addmm(weight.float(), module.b.float().to(device), module.a.float().to(device))  # W + s·B·A
            norm = torch.linalg.vector_norm(merged, dim=1)  # [out]
            scale = adapter.magnitudes[(layer, proj)].to(device) / norm  # [out]
            if not bool(torch.isfinite(scale).all()):
                group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
                raise AdapterError(f"model.layers.{layer}.{group}.{proj}: W + s·B·A has a row of norm zero, "
                                   "so its DoRA scale is not finite")
            scales[(layer, proj)] = scale.to("cpu", torch.float32)
    missing = sorted(set(adapter.modules) - set(scales))
    if missing:
        raise AdapterError(f"the base model gave no weight for DoRA modules {missing[:4]}")
    return replace(adapter, dora_scales=scales)


class DoraScales:
    """The slots' DoRA output scales: per layer one float32 buffer [num_slots, C], C the sum
    of every projection's out in PROJECTIONS order, so the projections one NF4 weight holds
    (q/k/v, gate/up) are adjacent columns and one multiply covers the weight's output.

    A slot's row is read only while the slot holds a DoRA adapter (`dora[slot]`): its scale
    on the projections the adapter targets, ones on the others (a fused weight's other
    parts). Float32 whatever the compute dtype: a scale rounded to bf16 would bias every
    token of its column alike; the product is rounded once to the output's dtype."""

    def __init__(self, model: ModelConfig, num_slots: int, device: torch.device):
        self.columns: dict[str, tuple[int, int]] = {}  # each projection's columns of a layer buffer
        start = 0
        for proj in PROJECTIONS:
            out_features = model.projection_shape(proj)[0]
            self.columns[proj] = (start, start + out_features)
            start += out_features
        self.buffers = [torch.ones(num_slots, start, dtype=torch.float32, device=device)
                        for _ in range(model.num_layers)]  # per layer [S, C]
        self.dora = [False] * num_slots  # whether the slot holds a DoRA adapter

    @property
    def num_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Take the adapter's scales into the slot (nothing to take for plain LoRA)."""
        self.dora[slot] = False
        if not adapter.use_dora:
            return
        if set(adapter.dora_scales) != set(adapter.modules):
            raise ValueError("a DoRA adapter's scales are not computed (with_dora_scales)")
        for buffer in self.buffers:
            buffer[slot].fill_(1.0)
        for (layer, proj), scale in adapter.dora_scales.items():
            start, end = self.columns[proj]
            self.buffers[layer][slot, start:end].copy_(scale)
        self.dora[slot] = True

    def clear(self, slot: int) -> None:
        self.dora[slot] = False

    def scale_(self, y: torch.Tensor, layer: int, names: Sequence[str], meta: RowScaleMeta) -> None:
        """y: [T, sum of the names' out], the output of one NF4 weight whose columns are the
        projections `names` in order; rows of `meta` times their slot's scale."""
        starts = [self.columns[name] for name in names]
        buffer = self.buffers[layer]
        if all(prev[1] == nxt[0] for prev, nxt in zip(starts, starts[1:])):  # adjacent: one multiply
            row_scale_(y, buffer[:, starts[0][0] : starts[-1][1]], meta)
            return
        offset = 0
        for start, end in starts:
            row_scale_(y[:, offset : offset + end - start], buffer[:, start:end], meta)
            offset += end - start
