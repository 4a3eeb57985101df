"""The one place that picks a LoRA backend."""

from __future__ import annotations

from typing import Literal

import torch

from loraquilt.kernels.cpu import lora_add_cpu_
from loraquilt.kernels.reference import lora_add_reference_
from loraquilt.kernels.segments import LoraBatchMeta

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
    from loraquilt.kernels.triton_sgmv import lora_add_triton_

    return lora_add_triton_(y, x, lora_a, lora_b, meta)
