"""Batched multi-adapter LoRA (SGMV style): a different adapter, or a weighted mix of
several, on every row of one batch.

Modules:
    segments.py     the per-step batch description (`build_lora_meta`, `build_segments`)
    reference.py    ground truth: a loop over raw rows, float32 accumulate
    cpu.py          the torch CPU fast path (grouped matmuls over slot segments)
    triton_sgmv.py  the GPU path (SGMV shrink/expand in Triton)
    dispatch.py     the one place that picks a backend (`lora_add_`) and splits a step's
                    rows into tables for it (`split_spans`)
    row_scale.py    DoRA's per-row output scales (`row_scale_`) and their reference
    heads.py        per-row token tables: adapters' embeddings and lm_heads (`embed_rows_`,
                    `head_logits`) and their references
    bench.py        `loraquilt bench kernels`

Public API:
    build_lora_meta(row_slots, row_weights, num_slots=...) -> LoraBatchMeta   once per step
    lora_add_(y, x, lora_a, lora_b, meta, backend="auto")                     per projection
    build_segments(pair_slots) -> Segments                                    the grouping itself
    split_spans(meta, span_rows, device) -> ((first, last), ...)              tables per step
    build_row_scale_meta(span_slots, span_rows) -> RowScaleMeta | None        once per step (DoRA)
    row_scale_(y, scale, meta)                                                per projection (DoRA)
    build_table_groups(row_tables, tables) -> TableGroups | None              per step (token tables)
    embed_rows_(out, ids, groups); head_logits(x, base, groups)               embeddings; logits
Backends: `reference` (ground truth loop), `torch` (CPU), `triton` (GPU); `auto` picks
triton for CUDA tensors and torch otherwise.
"""

from loraquilt.kernels.lora.dispatch import BACKENDS, lora_add_, resolve_backend, split_spans
from loraquilt.kernels.lora.heads import (
    TableGroups,
    TokenRows,
    TokenTable,
    build_table_groups,
    embed_rows_,
    head_logits,
    project_logits,
)
from loraquilt.kernels.lora.row_scale import RowScaleMeta, build_row_scale_meta, row_scale_
from loraquilt.kernels.lora.segments import (
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
    "RowScaleMeta",
    "Segments",
    "TableGroups",
    "TokenRows",
    "TokenTable",
    "build_lora_meta",
    "build_row_scale_meta",
    "build_segments",
    "build_table_groups",
    "embed_rows_",
    "head_logits",
    "lora_add_",
    "project_logits",
    "resolve_backend",
    "row_scale_",
    "split_spans",
]
