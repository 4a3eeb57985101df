"""The one place that picks a LoRA backend, and how a step's rows are split into tables
for it (`split_spans`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from loraquilt.kernels.lora.cpu import lora_add_cpu_, needs_grouped
from loraquilt.kernels.lora.reference import lora_add_reference_
from loraquilt.kernels.lora.segments import LoraBatchMeta

Backend = Literal["auto", "reference", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> `triton` for CUDA tensors, `torch` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _check_shapes(y, x, lora_a, lora_b, meta: LoraBatchMeta) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError("lora_a must be [num_slots, max_rank, in], lora_b [num_slots, out, max_rank]")
    num_slots, rank, in_features = lora_a.shape
    if tuple(lora_b.shape) != (num_slots, y.shape[1], rank):
        raise ValueError(
            f"lora_b shape {tuple(lora_b.shape)} != (num_slots={num_slots}, "
            f"out={y.shape[1]}, max_rank={rank})"
        )
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, lora_a expects {in_features}")
    if x.shape[0] != y.shape[0] or x.shape[0] != meta.num_rows:
        raise ValueError(
            f"row counts differ: x {x.shape[0]}, y {y.shape[0]}, meta {meta.num_rows}"
        )
    if meta.num_slots > num_slots:
        raise ValueError(f"meta was built for {meta.num_slots} slots, buffers hold {num_slots}")


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraBatchMeta,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Batched multi-adapter LoRA: add every row's adapter delta (or weighted mix) to y.

    Semantics:
        for t in range(T):
            y[t] += Σ_k row_weights[t,k] · (x[t] @ A[row_slots[t,k]].T) @ B[row_slots[t,k]].T
        pairs with slot -1 add nothing; scaling (alpha/r) is expected folded into B.

    y:      [T, out]  base projection output, updated in place and returned
    x:      [T, in]   projection input
    lora_a: [num_slots, max_rank, in]   smaller ranks zero-padded
    lora_b: [num_slots, out, max_rank]  smaller ranks zero-padded
    meta:   from `build_lora_meta`, once per step, shared by all projections
    dtypes: float32, bfloat16, float16 (x, y, A, B all the same)
    """
    _check_shapes(y, x, lora_a, lora_b, meta)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return lora_add_reference_(y, x, lora_a, lora_b, meta)
    if chosen == "torch":
        return lora_add_cpu_(y, x, lora_a, lora_b, meta)
    from loraquilt.kernels.lora.triton_sgmv import lora_add_triton_

    return lora_add_triton_(y, x, lora_a, lora_b, meta)


def split_spans(meta: LoraBatchMeta, span_rows: Sequence[int], device: torch.device) -> tuple[tuple[int, int], ...]:
    """The groups of spans that each get their own LoRA table: (first, last) span index
    ranges, in order, covering every span; `((0, len(span_rows)),)` keeps one table.

    A span is a run of consecutive rows with the same pairs (one sequence of the step).
    On the CPU, a step the torch backend could only run with grouped_mm (`needs_grouped`:
    a prefill chunk beside many single-row decodes on distinct adapters) is split into its
    leading one-row spans and the rest, when every later span is longer than one row: each
    part then takes a cheap strategy (one bmm over the decodes' slots, one GEMM pair per
    prefill span). Elsewhere one table.

    meta:      the table built over all rows of the step
    span_rows: [S] row count of each span, in row order (sums to meta.num_rows)
    """
    everything = ((0, len(span_rows)),)
    decodes = next((i for i, n in enumerate(span_rows) if n != 1), len(span_rows))  # leading 1-row spans
    if device.type != "cpu" or not needs_grouped(meta) or not 0 < decodes < len(span_rows) \
            or any(n == 1 for n in span_rows[decodes:]):
        return everything
    return ((0, decodes), (decodes, len(span_rows)))
