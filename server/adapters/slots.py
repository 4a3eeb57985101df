"""Device-resident adapter slots: stacked, preallocated A/B buffers per layer and projection,
DoRA's output scales (dora.py), adapters' own token tables (head_pool.py), and the
per-step LoRA hook the model calls after every projection (and on its embeddings and
logits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraquilt.kernels.lora import (
    NO_ADAPTER, LoraBatchMeta, RowScaleMeta, build_lora_meta, build_row_scale_meta, lora_add_, split_spans,
)
from loraquilt.kernels.nf4 import FusedLora, LoraPairs, LoraPart, PairsArgs, RowScale
from loraquilt.server.adapters.dora import BaseWeights, DoraScales
from loraquilt.server.adapters.head_pool import HeadPool, StepHeads
from loraquilt.server.adapters.peft_folder import LoadedAdapter
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.model.config import PROJECTIONS, ModelConfig


@dataclass(frozen=True)
class SlotConfig:
    """The adapter slots' sizes (defaults: EngineConfig's, where they are declared)."""

    num_slots: int = EngineConfig.max_active_adapters  # adapters resident on the device at once
    max_rank: int = EngineConfig.max_lora_rank  # largest adapter rank accepted
    backend: str = EngineConfig.lora_backend  # kernels backend
    max_head_adapters: int = EngineConfig.max_lora_head_adapters  # slots holding token tables at once

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_rank", "max_head_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_engine(cls, config: EngineConfig) -> SlotConfig:
        return cls(config.max_active_adapters, config.max_lora_rank, config.lora_backend,
                   config.max_lora_head_adapters)

    @property
    def padded_rank(self) -> int:
        """Buffer rank, rounded up to 8 so every row of every buffer is 16-byte aligned."""
        return -(-self.max_rank // 8) * 8


@dataclass(frozen=True)
class LoraSpan:
    """`rows` consecutive token rows of a step (one sequence) that all apply the same
    (slot, weight) pairs: the unit the step's LoRA tables are built from."""

    rows: int
    pairs: tuple[tuple[int, float], ...]


# A step's LoRA tables for one projection: (row start, row end, table) parts covering the
# rows that carry adapters; usually one part for all rows.
RowParts = tuple[tuple[int, int, LoraBatchMeta], ...]


class LoraSlots:
    """A[layer][proj]: [num_slots, R, in], B[layer][proj]: [num_slots, out, R].

    On CPU, B is a view of storage laid out [num_slots, R, out] (`bt`): the fused NF4 +
    LoRA kernel reads a vector of outputs in one load, and the torch kernels' B[slot].T is
    contiguous. A slot's projections the adapter does not target stay zero, and rows on
    that slot skip those projections altogether (a per-projection view of the step's rows)."""

    def __init__(self, model: ModelConfig, config: SlotConfig, dtype: torch.dtype, device: torch.device):
        self.model, self.config = model, config
        self.dtype, self.device = dtype, device
        rank = config.padded_rank
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        transposed = device.type == "cpu"
        for _ in range(model.num_layers):
            a_layer, b_layer = {}, {}
            for proj in PROJECTIONS:
                out_features, in_features = model.projection_shape(proj)
                a_layer[proj] = torch.zeros(config.num_slots, rank, in_features, dtype=dtype, device=device)
                if transposed:  # [S, R, out] storage, seen as [S, out, R]
                    b_layer[proj] = torch.zeros(config.num_slots, rank, out_features, dtype=dtype,
                                                device=device).transpose(1, 2)
                else:
                    b_layer[proj] = torch.zeros(config.num_slots, out_features, rank, dtype=dtype, device=device)
            self.a.append(a_layer)
            self.b.append(b_layer)
        self.targets: list[frozenset[str]] = [frozenset()] * config.num_slots
        # each slot's adapter rank (its largest module's): the fused kernel skips the zero rows past it
        self.ranks = torch.zeros(config.num_slots, dtype=torch.int32)
        self._generation = 0  # bumped whenever a slot's contents change (tables depend on targets)
        self._step: _StepTables | None = None
        self._last_key: tuple | None = None  # the previous step's spans, and its tables
        self._fused_parts: dict[tuple, FusedLora] = {}  # (layer, parts) -> the kernel's static arguments
        self.dora = DoraScales(model, config.num_slots, device)
        self.heads = HeadPool(config.max_head_adapters, dtype, device, config.backend)
        self.base: BaseWeights | None = None  # the model's weights, for DoRA norms (attach_base)

    def attach_base(self, base: BaseWeights) -> None:
        """The model these slots' deltas are added to: DoRA adapters read their norms from it."""
        self.base = base

    @property
    def num_bytes(self) -> int:
        lora = sum(t.numel() * t.element_size() for layer in self.a + self.b for t in layer.values())
        return lora + self.dora.num_bytes + self.heads.num_bytes

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Copy an adapter into a slot (zero-padded to the buffer rank)."""
        self._check_slot(slot)
        if adapter.rank > self.config.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} over max_rank {self.config.max_rank}")
        self.clear(slot)
        self.heads.load(slot, adapter.heads)
        for (layer, proj), module in adapter.modules.items():
            rank = module.rank
            self.a[layer][proj][slot, :rank].copy_(module.a)
            self.b[layer][proj][slot, :, :rank].copy_(module.b)
        self.dora.load(slot, adapter)
        self.targets[slot] = frozenset(adapter.target_modules)
        self.ranks[slot] = max((module.rank for module in adapter.modules.values()), default=0)
        self._generation += 1

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in range(self.model.num_layers):
            for proj in PROJECTIONS:
                self.a[layer][proj][slot].zero_()
                self.b[layer][proj][slot].zero_()
        self.dora.clear(slot)
        self.heads.clear(slot)
        self.targets[slot] = frozenset()
        self.ranks[slot] = 0
        self._generation += 1

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.config.num_slots})")

    # -- per step ---------------------------------------------------------------------

    def begin_step(self, spans: Sequence[LoraSpan]) -> None:
        """The step's LoRA tables, from its row spans (one per sequence, in row order).

        Built on first use, once per step per distinct target mask, shared by every layer;
        a step with the same spans as the previous one (steady decoding) reuses its tables
        as they are."""
        key = (tuple(spans), self._generation)
        if key != self._last_key or self._step is None:
            self._last_key, self._step = key, _StepTables(self, tuple(spans))

    def step_row_parts(self, proj: str) -> RowParts:
        """The current step's LoRA kernel tables for one projection (built on first use)."""
        return self._step.row_parts(proj) if self._step is not None else ()

    def masked_pairs(self, spans: Sequence[LoraSpan], proj: str) -> tuple[tuple[tuple[int, float], ...], ...]:
        """Each span's pairs whose slot holds this projection (others skip it entirely)."""
        return tuple(tuple(pair for pair in span.pairs if proj in self.targets[pair[0]]) for span in spans)

    def _row_parts(self, span_pairs: tuple[tuple[tuple[int, float], ...], ...], rows: list[int]) -> RowParts:
        """The tables for all rows, or one per group of spans where the LoRA dispatch splits
        the step (`split_spans`: on CPU, the leading decode rows apart from a prefill)."""
        whole = self._span_meta(span_pairs, rows)
        if whole is None:
            return ()
        groups = split_spans(whole, rows, self.device)
        if len(groups) == 1:
            return ((0, sum(rows), whole),)
        parts = []
        for first, last in groups:
            meta = self._span_meta(span_pairs[first:last], rows[first:last])
            if meta is not None:
                parts.append((sum(rows[:first]), sum(rows[:last]), meta))
        return tuple(parts)

    def _span_meta(self, span_pairs: tuple[tuple[tuple[int, float], ...], ...],
                   rows: list[int]) -> LoraBatchMeta | None:
        """span_pairs: per span its (slot, weight) pairs; rows: per span its row count."""
        width = max(map(len, span_pairs), default=0)
        if width == 0:
            return None
        counts = torch.tensor(rows, dtype=torch.int64)  # [S]
        padded = [list(pairs) + [(NO_ADAPTER, 0.0)] * (width - len(pairs)) for pairs in span_pairs]
        span_slots = torch.tensor([[slot for slot, _ in row] for row in padded], dtype=torch.int64)  # [S, K]
        span_weights = torch.tensor([[w for _, w in row] for row in padded], dtype=torch.float32)  # [S, K]
        return build_lora_meta(span_slots.repeat_interleave(counts, 0), span_weights.repeat_interleave(counts, 0),
                               num_slots=self.config.num_slots, device=self.device)  # rows [T, K]

    def end_step(self) -> None:
        pass  # the tables stay for the next step, which reuses them when its spans are the same

    def add_(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str) -> None:
        """y: [T, out] += this step's LoRA deltas of x: [T, in] (nothing for rows without one)."""
        parts = self.step_row_parts(projection)
        a, b = self.a[layer][projection], self.b[layer][projection]
        if len(parts) == 1 and parts[0][1] - parts[0][0] == y.shape[0]:
            lora_add_(y, x, a, b, parts[0][2], self.config.backend)
            return
        for start, end, meta in parts:
            lora_add_(y[start:end], x[start:end], a, b, meta, self.config.backend)

    @property
    def has_dora(self) -> bool:
        """Whether a row of the current step is on a DoRA adapter (else `dora_scale_` has
        nothing to do, and the model does not call it)."""
        return self._step is not None and self._step.has_dora

    def dora_scale_(self, y: torch.Tensor, layer: int, parts: tuple[tuple[str, int], ...]) -> None:
        """y: [T, sum of the parts' out], one NF4 weight's whole output, LoRA deltas
        included, no bias: rows on a DoRA slot that targets any of the parts times its scale."""
        names = tuple(name for name, _ in parts)
        meta = self._step.dora_meta(names) if self._step is not None else None
        if meta is not None:
            self.dora.scale_(y, layer, names, meta)

    def dora_row_scale(self, layer: int, parts: tuple[tuple[str, int], ...]) -> RowScale | None:
        """The fused kernel's DoRA argument for one NF4 weight of `layer` (its columns are
        `parts`), or None when no row of the step is on a DoRA slot that targets them."""
        return self._step.row_scale(layer, parts) if self._step is not None else None

    @property
    def has_heads(self) -> bool:
        """Whether a row of the current step is on an adapter with its own token tables
        (else the model calls neither `embed_` nor `head_logits`)."""
        return self._step is not None and self._step.heads is not None

    def embed_(self, x: torch.Tensor, input_ids: torch.Tensor) -> None:
        """x: [T, hidden] the base's embeddings of input_ids [T]; rows on an adapter with
        its own embeddings read those instead, in place."""
        self._step.heads.embed_(x, input_ids)

    def head_logits(self, x: torch.Tensor, logits_rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] final-normed states of the token rows logits_rows [N]; base:
        [V, hidden] the base's lm_head -> [N, V] float32, rows on an adapter with its own
        lm_head by that one."""
        return self._step.heads.logits(x, logits_rows, base)

    @property
    def fuses_lora(self) -> bool:
        """Whether the fused NF4 + LoRA kernel may add the deltas: with the CPU backends
        (`auto`, `torch`); `reference` (and `triton`) run as named, after the projection."""
        return self.config.backend in ("auto", "torch")

    def fused_args(self, layer: int, parts: tuple[tuple[str, int], ...]) -> tuple[FusedLora, PairsArgs] | None:
        """The fused NF4 + LoRA kernel's LoRA arguments for one NF4 weight of `layer` whose
        columns are `parts` ((projection, width) in order); None when no row uses them."""
        if self._step is None:
            return None
        pairs = self._step.pairs_args(parts)
        if pairs is None:
            return None
        key = (layer, parts)
        fused = self._fused_parts.get(key)
        if fused is None:
            columns, start = [], 0
            for name, width in parts:
                columns.append(LoraPart(start, start + width, self.a[layer][name],
                                        self.b[layer][name].transpose(1, 2), self.ranks))
                start += width
            fused = self._fused_parts[key] = FusedLora(columns)
        return fused, pairs


class _StepTables:
    """One step's LoRA tables, each built on first use: the LoRA kernels' metadata per
    projection (`row_parts`) and the fused kernel's pair tables per projection group."""

    def __init__(self, slots: LoraSlots, spans: tuple[LoraSpan, ...]):
        self.slots, self.spans = slots, spans
        self.rows = [span.rows for span in spans]
        self._metas: dict[tuple, RowParts] = {}  # by target mask
        self._pairs: dict[tuple, LoraPairs | None] = {}  # by target mask
        self._args: dict[tuple, PairsArgs | None] = {}  # by parts
        self._dora_spans: dict[tuple[str, ...], list[int] | None] = {}  # by projection names
        self._dora: dict[tuple[str, ...], RowScaleMeta | None] = {}  # by projection names
        self._row_slots: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}  # by projection names
        self._row_scales: dict[tuple, RowScale | None] = {}  # by (layer, parts)
        dora = slots.dora.dora
        self.has_dora = any(dora[slot] for span in spans for slot, _ in span.pairs)
        if self.has_dora and any(len(span.pairs) > 1 and any(dora[s] for s, _ in span.pairs) for span in spans):
            raise ValueError("a DoRA adapter in a mix: the registry refuses such requests")
        if any(len(span.pairs) > 1 and any(slots.heads.holds(s) for s, _ in span.pairs) for span in spans):
            raise ValueError("an adapter with its own token tables in a mix: the registry refuses such requests")
        self.heads: StepHeads | None = slots.heads.step(
            [span.pairs[0][0] if len(span.pairs) == 1 else NO_ADAPTER for span in spans], self.rows)

    def dora_span_slots(self, names: tuple[str, ...]) -> list[int] | None:
        """Per span its DoRA slot when that slot targets any of `names`, else NO_ADAPTER;
        None when no span has one."""
        if not self.has_dora:
            return None
        if names not in self._dora_spans:
            slots = self.slots
            span_slots = [span.pairs[0][0] if len(span.pairs) == 1 and slots.dora.dora[span.pairs[0][0]]
                          and not slots.targets[span.pairs[0][0]].isdisjoint(names) else NO_ADAPTER
                          for span in self.spans]
            self._dora_spans[names] = span_slots if any(s != NO_ADAPTER for s in span_slots) else None
        return self._dora_spans[names]

    def dora_meta(self, names: tuple[str, ...]) -> RowScaleMeta | None:
        """The rows on a DoRA slot that targets any of `names`, and their slots (row_scale_)."""
        if names not in self._dora:
            span_slots = self.dora_span_slots(names)
            self._dora[names] = None if span_slots is None else \
                build_row_scale_meta(span_slots, self.rows, self.slots.device)
        return self._dora[names]

    def row_scale(self, layer: int, parts: tuple[tuple[str, int], ...]) -> RowScale | None:
        """The fused kernel's RowScale of one NF4 weight (its row table shared by the layers)."""
        key = (layer, parts)
        if key not in self._row_scales:
            names = tuple(name for name, _ in parts)
            if names not in self._row_slots:
                span_slots = self.dora_span_slots(names) or []
                row_slot = [slot for slot, count in zip(span_slots, self.rows) for _ in range(count)]
                self._row_slots[names] = (torch.tensor(row_slot, dtype=torch.int32), max(row_slot, default=-1))
            row_slot, max_slot = self._row_slots[names]
            self._row_scales[key] = None if max_slot < 0 else \
                RowScale(self.slots.dora.view(layer, names), row_slot, max_slot)
        return self._row_scales[key]

    def row_parts(self, proj: str) -> RowParts:
        masked = self.slots.masked_pairs(self.spans, proj)
        if masked not in self._metas:
            self._metas[masked] = self.slots._row_parts(masked, self.rows)
        return self._metas[masked]

    def pairs_args(self, parts: tuple[tuple[str, int], ...]) -> PairsArgs | None:
        if parts not in self._args:
            tables = []
            for name, _ in parts:
                masked = self.slots.masked_pairs(self.spans, name)
                if masked not in self._pairs:
                    self._pairs[masked] = LoraPairs.from_spans(masked, self.rows) if any(masked) else None
                tables.append(self._pairs[masked])
            rank = self.slots.config.padded_rank
            self._args[parts] = PairsArgs(tables, [rank] * len(tables)) if any(tables) else None
        return self._args[parts]
