"""CPU fast path: grouped matmuls over slot segments, no per-row work.

Two strategies, chosen per step from the segment table:
- `loop`: one `mm`/`addmm_` per segment on contiguous row slices; cheapest when few
  adapters are in the batch (the per-call cost stays below the matmul cost).
- `grouped`: `torch.nn.functional.grouped_mm` over every slot at once; one call whatever
  the number of segments, best when many distinct adapters share a step.
(A gathered-weights `bmm` (BGMV) was measured too: 3-7x slower than both on this CPU,
MKL's batched GEMV on [R, in] x [in, 1] problems being the bottleneck.)
When the rows already come grouped by slot with one pair each (`rows_in_order`, the
common case once the scheduler sorts its batch), both write straight into y, with no
gather or scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraquilt.kernels.segments import LoraBatchMeta

# Above this many segments per step, one grouped GEMM beats a Python loop of GEMMs
# (measured with `loraquilt bench kernels`, see README).
LOOP_MAX_SEGMENTS = 8


def _weighted(t: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """t: [P, R] per-pair shrink result; scales row p by pair_weights[p] in place."""
    if not meta.unit_weights:
        t.mul_(meta.pair_weights.to(t.dtype).unsqueeze(1))
    return t


def lora_add_cpu_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraBatchMeta,
    strategy: str | None = None,
) -> torch.Tensor:
    """Add each row's (weighted mix of) LoRA deltas to y, in place.

    Semantics: as `lora_add_reference_`; matmuls run in the compute dtype.
    strategy: None = choose per step; "loop" or "grouped" to force one (benchmarks).

    y:      [T, out]
    x:      [T, in]
    lora_a: [num_slots, max_rank, in]
    lora_b: [num_slots, out, max_rank]
    """
    if meta.num_pairs == 0:
        return y
    if strategy is None:
        strategy = choose_strategy(meta, x, lora_a, lora_b)
    if strategy == "grouped":
        return _grouped(y, x, lora_a, lora_b, meta)
    if strategy == "loop":
        return _loop(y, x, lora_a, lora_b, meta)
    raise ValueError(f"unknown CPU LoRA strategy {strategy!r}; choose loop or grouped")


def choose_strategy(meta: LoraBatchMeta, x, lora_a, lora_b) -> str:
    if meta.num_segments <= LOOP_MAX_SEGMENTS:
        return "loop"
    return "grouped" if grouped_mm_supports(x, lora_a, lora_b) else "loop"


def grouped_mm_supports(*tensors: torch.Tensor) -> bool:
    """grouped_mm wants every non-unit stride aligned to 16 bytes (e.g. rank % 4 == 0 in fp32)."""
    for tensor in tensors:
        if any(stride != 1 and stride * tensor.element_size() % 16 for stride in tensor.stride()):
            return False
    return True


def _loop(y, x, lora_a, lora_b, meta: LoraBatchMeta) -> torch.Tensor:
    rank = lora_a.shape[1]
    if meta.rows_in_order:
        # Rows are already grouped by slot: segment s covers rows start:end of x and y.
        for slot, start, end in meta.segments:
            t = torch.mm(x[start:end], lora_a[slot].T)  # [n, R]
            if not meta.unit_weights:
                t.mul_(meta.pair_weights[start:end].to(t.dtype).unsqueeze(1))
            y[start:end].addmm_(t, lora_b[slot].T)
        return y
    xs = x.index_select(0, meta.pair_rows)  # [P, in]
    t = torch.empty(meta.num_pairs, rank, dtype=x.dtype, device=x.device)  # [P, R]
    for slot, start, end in meta.segments:
        torch.mm(xs[start:end], lora_a[slot].T, out=t[start:end])
    _weighted(t, meta)
    delta = torch.empty(meta.num_pairs, y.shape[1], dtype=y.dtype, device=y.device)  # [P, out]
    for slot, start, end in meta.segments:
        torch.mm(t[start:end], lora_b[slot].T, out=delta[start:end])
    return y.index_add_(0, meta.pair_rows, delta)


def _grouped(y, x, lora_a, lora_b, meta: LoraBatchMeta) -> torch.Tensor:
    if not grouped_mm_supports(x, lora_a, lora_b):
        raise ValueError(
            "grouped strategy needs 16-byte aligned strides (pad max_rank and features); "
            f"got x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, {x.dtype}"
        )
    offsets = meta.slot_offsets  # [num_slots]
    xs = x if meta.rows_in_order else x.index_select(0, meta.pair_rows)  # [P, in]
    t = F.grouped_mm(xs, lora_a.transpose(1, 2), offs=offsets)  # [P, R]
    _weighted(t, meta)
    delta = F.grouped_mm(t, lora_b.transpose(1, 2), offs=offsets)  # [P, out]
    if meta.rows_in_order:
        return y.add_(delta)
    return y.index_add_(0, meta.pair_rows, delta)
