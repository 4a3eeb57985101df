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
(in the fused NF4 + LoRA kernel's epilogue, `kernels.nf4.RowScale`, else
`kernels.lora.row_scale_` after the projection), before the bias; rows on other slots or
none are untouched.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
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


def scale_columns(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each projection's columns [start, end) in a layer's row of DoRA scales: PROJECTIONS
    in order, so the projections one NF4 weight holds (q/k/v, gate/up) are adjacent."""
    columns, start = {}, 0
    for proj in PROJECTIONS:
        out_features = model.projection_shape(proj)[0]
        columns[proj] = (start, start + out_features)
        start += out_features
    return columns


def with_dora_scales(adapter: LoadedAdapter, base: BaseWeights | None, model: ModelConfig) -> LoadedAdapter:
    """The adapter with its DoRA output scales m / ||W + s·B·A||: `dora_scales` [L, C]
    float32 (CPU), layer l's row holding each module's scale in its `scale_columns` and ones
    elsewhere (what a slot's buffer row holds: one copy brings it in); a plain LoRA adapter
    as it is. B·A is the adapter's as the slots hold it (scaling folded into B, in the slot
    dtype); the sum and its norm in float32.

    Cost: per module one dequantize of its NF4 weight (a fused q/k/v or gate/up weight
    once per layer), one rank-r GEMM update of [out, in] and a row norm."""
    if not adapter.use_dora:
        return adapter
    if base is None:
        raise AdapterError("a DoRA adapter (use_dora) needs the base model's weights for its norms, "
                           "and this registry has none attached")
    columns = scale_columns(model)
    table = torch.ones(model.num_layers, max(end for _, end in columns.values()))  # [L, C]
    by_layer: dict[int, list[str]] = {}
    for layer, proj in adapter.modules:
        by_layer.setdefault(layer, []).append(proj)
    done = set()
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
            start, end = columns[proj]
            table[layer, start:end] = scale.cpu()
            done.add((layer, proj))
    missing = sorted(set(adapter.modules) - done)
    if missing:
        raise AdapterError(f"the base model gave no weight for DoRA modules {missing[:4]}")
    return replace(adapter, dora_scales=table)


class DoraScales:
    """The slots' DoRA output scales: one float32 buffer [L, num_slots, C], C the sum of
    every projection's out (`scale_columns`), so the projections one NF4 weight holds are
    adjacent columns and one multiply covers the weight's output. Allocated when the first
    DoRA adapter comes into a slot (a server without one holds none: 4·L·S·C bytes, 20 MiB
    for SmolLM2 with 32 slots, 150 MiB for a 7B Llama), kept after.

    A slot's rows are read only while the slot holds a DoRA adapter (`dora[slot]`): its
    scale on the projections it targets, ones on the others (a fused weight's other
    parts). Float32 whatever the compute dtype: the fused kernel multiplies in float32
    before its one rounding (a scale rounded to bf16 would bias every token of its column
    alike)."""

    def __init__(self, model: ModelConfig, num_slots: int, device: torch.device):
        self.columns = scale_columns(model)
        self.shape = (model.num_layers, num_slots, max(end for _, end in self.columns.values()))  # [L, S, C]
        self.device = device
        self.buffer: torch.Tensor | None = None  # [L, S, C], from the first DoRA adapter on
        self.buffers: list[torch.Tensor] = []  # per layer [S, C] views of it
        self.dora = [False] * num_slots  # whether the slot holds a DoRA adapter
        self._views: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}

    @property
    def num_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Take the adapter's scales into the slot (nothing to take for plain LoRA)."""
        self.dora[slot] = False
        if not adapter.use_dora:
            return
        layers, _, width = self.shape
        if adapter.dora_scales is None or tuple(adapter.dora_scales.shape) != (layers, width):
            raise ValueError("a DoRA adapter's scales are not computed for this model (with_dora_scales)")
        if self.buffer is None:
            self.buffer = torch.ones(self.shape, dtype=torch.float32, device=self.device)
            self.buffers = list(self.buffer)
        self.buffer[:, slot].copy_(adapter.dora_scales)
        self.dora[slot] = True

    def clear(self, slot: int) -> None:
        self.dora[slot] = False

    def view(self, layer: int, names: tuple[str, ...]) -> torch.Tensor:
        """[S, sum of the names' out]: the scales of one NF4 weight whose columns are the
        projections `names` in order (adjacent in PROJECTIONS order, as the model fuses them)."""
        key = (layer, names)
        view = self._views.get(key)
        if view is None:
            spans = [self.columns[name] for name in names]
            if any(prev[1] != nxt[0] for prev, nxt in zip(spans, spans[1:])):
                raise ValueError(f"projections {names} are not adjacent in {PROJECTIONS}")
            view = self._views[key] = self.buffers[layer][:, spans[0][0] : spans[-1][1]]
        return view

    def scale_(self, y: torch.Tensor, layer: int, names: tuple[str, ...], meta: RowScaleMeta) -> None:
        """y: [T, sum of the names' out], the output of one NF4 weight (no bias) whose
        columns are the projections `names` in order; rows of `meta` times their scale."""
        row_scale_(y, self.view(layer, names), meta)
