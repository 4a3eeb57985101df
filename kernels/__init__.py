"""Batched multi-adapter LoRA kernels (SGMV style): a different adapter, or a weighted
mix of several, on every row of one batch.

Public API:
    build_lora_meta(row_slots, row_weights, num_slots=...) -> LoraBatchMeta   once per step
    lora_add_(y, x, lora_a, lora_b, meta, backend="auto")                     per projection
    build_segments(pair_slots) -> Segments                                    the grouping itself
Backends: `reference` (ground truth loop), `torch` (CPU), `triton` (GPU); `auto` picks
triton for CUDA tensors and torch otherwise.
"""

from loraquilt.kernels.dispatch import BACKENDS, lora_add_, resolve_backend
from loraquilt.kernels.segments import (
    NO_ADAPTER,
    LoraBatchMeta,
    Segments,
    build_lora_meta,
    build_segments,
)

__all__ = [
    "BACKENDS",
    "NO_ADAPTER",
    "LoraBatchMeta",
    "Segments",
    "build_lora_meta",
    "build_segments",
    "lora_add_",
    "resolve_backend",
]
