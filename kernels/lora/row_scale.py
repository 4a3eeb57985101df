"""Per-row output scales (DoRA): rows on a DoRA adapter multiply their projection's output,
base and LoRA delta together, by that adapter's per-column scale m / ||W + s·B·A||.

A step names the scaled rows once (`build_row_scale_meta`, shared by every layer); each
projection then calls `row_scale_` with its columns of the slots' scale buffer. Rows not
named (base model, plain LoRA) are left as they are, bit for bit.

Backends: `row_scale_reference_` (a loop over raw rows, float32) and `row_scale_` (torch:
one broadcast multiply when every row is on one slot, one gather + multiply when every
row is scaled, else gather, multiply, scatter of the scaled rows only). Both round once to
y's dtype, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraquilt.kernels.lora.segments import NO_ADAPTER


@dataclass(frozen=True)
class RowScaleMeta:
    """The step's scaled rows (device tensors) and their slots.

    rows:  [N] int64  scaled token rows, increasing
    slots: [N] int64  slot of each scaled row (its scale row in the buffer)
    num_rows:    T, the step's rows
    single_slot: the one slot of every row when N == T and all share it, else NO_ADAPTER
    """

    rows: torch.Tensor
    slots: torch.Tensor
    num_rows: int
    single_slot: int = NO_ADAPTER

    @property
    def all_rows(self) -> bool:
        return int(self.rows.numel()) == self.num_rows


def build_row_scale_meta(span_slots: Sequence[int], span_rows: Sequence[int],
                         device: torch.device | str = "cpu") -> RowScaleMeta | None:
    """span_slots: per span (consecutive rows of one sequence) its scaled slot, or
    NO_ADAPTER for none; span_rows: per span its row count. None when no row is scaled."""
    rows: list[int] = []
    slots: list[int] = []
    start = 0
    for slot, count in zip(span_slots, span_rows, strict=True):
        if slot != NO_ADAPTER:
            rows.extend(range(start, start + count))
            slots.extend([slot] * count)
        start += count
    if not rows:
        return None
    if min(slots) < 0:
        raise ValueError(f"scaled slots must be >= 0 or NO_ADAPTER, got {min(slots)}")
    single = slots[0] if len(rows) == start and len(set(slots)) == 1 else NO_ADAPTER
    return RowScaleMeta(torch.tensor(rows, dtype=torch.int64, device=device),
                        torch.tensor(slots, dtype=torch.int64, device=device), start, single)


def _check(y: torch.Tensor, scale: torch.Tensor, meta: RowScaleMeta) -> None:
    if y.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"y and scale must be 2-D, got {tuple(y.shape)} and {tuple(scale.shape)}")
    if scale.shape[1] != y.shape[1]:
        raise ValueError(f"scale has {scale.shape[1]} columns, y {y.shape[1]}")
    if y.shape[0] != meta.num_rows:
        raise ValueError(f"y has {y.shape[0]} rows, the table {meta.num_rows}")
    if scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32, got {scale.dtype}")


def row_scale_(y: torch.Tensor, scale: torch.Tensor, meta: RowScaleMeta) -> torch.Tensor:
    """Semantics: `row_scale_reference_`.

    y:     [T, out] float32 / bfloat16 / float16, updated in place and returned
    scale: [num_slots, out] float32 (a column slice of a wider buffer is fine)
    meta:  from `build_row_scale_meta`, once per step"""
    _check(y, scale, meta)
    if meta.single_slot != NO_ADAPTER:  # every row on one adapter: one broadcast multiply
        return y.mul_(scale[meta.single_slot])
    gathered = scale.index_select(0, meta.slots)  # [N, out] float32
    if meta.all_rows:
        return y.mul_(gathered)  # float32 product, rounded once to y's dtype
    scaled = y.index_select(0, meta.rows)  # [N, out]
    scaled.mul_(gathered)
    return y.index_copy_(0, meta.rows, scaled)


def row_scale_reference_(y: torch.Tensor, scale: torch.Tensor, meta: RowScaleMeta) -> torch.Tensor:
    """Semantics:
        for row, slot in zip(meta.rows, meta.slots):
            y[row, :] = (y[row, :].float() * scale[slot, :]).to(y.dtype)
        other rows unchanged

    y: [T, out], scale: [num_slots, out] float32 -> y, updated in place"""
    _check(y, scale, meta)
    for row, slot in zip(meta.rows.tolist(), meta.slots.tolist()):
        y[row] = (y[row].float() * scale[slot].float()).to(y.dtype)
    return y
