"""CPU fast path: grouped matmuls over slot segments, no per-row work.

Three strategies, chosen per step from the segment table:
- `loop`: one `mm`/`addmm_` per segment on contiguous row slices; cheapest when few
  adapters are in the batch (the per-call cost stays below the matmul cost).
- `slot_range`: one `bmm` over the contiguous range of slot buffers the step touches
  (A[lo:hi] is a view, nothing is gathered), rows laid out in a [slots, L] grid; best
  for many distinct adapters with short segments (decode steps): 2-3x faster than
  `grouped` here, since grouped_mm's CPU path costs ~7 µs per group. Chosen while the
  grid's padding stays small (unused slots in the range, unequal segment lengths).
- `grouped`: `torch.nn.functional.grouped_mm` over every slot at once; one call whatever
  the number of segments, for steps whose segments are too uneven for `slot_range`
  (e.g. a long prefill beside single-token decodes).
(A gathered-weights `bmm` (BGMV) was measured too: 3-7x slower than both on this CPU:
copying every row's A and B costs more than the GEMMs.)
When the rows already come grouped by slot with one pair each (`rows_in_order`, the
common case once the scheduler sorts its batch), both write straight into y, with no
gather or scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraquilt.kernels.lora.segments import LoraBatchMeta

# Above this many segments per step, one grouped GEMM beats a Python loop of GEMMs
# (measured with `loraquilt bench kernels`, see README).
LOOP_MAX_SEGMENTS = 8
# slot_range computes (and reads weights for) every cell of its [slots, L] grid; it is
# chosen while the grid holds at most this many times the real pairs.
SLOT_RANGE_MAX_PADDING = 2
STRATEGIES = ("loop", "slot_range", "grouped")


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
    strategy: None = choose per step; one of STRATEGIES to force it (benchmarks, tests).

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
    if strategy == "slot_range":
        return _slot_range(y, x, lora_a, lora_b, meta)
    if strategy == "loop":
        return _loop(y, x, lora_a, lora_b, meta)
    raise ValueError(f"unknown CPU LoRA strategy {strategy!r}; choose one of {STRATEGIES}")


def choose_strategy(meta: LoraBatchMeta, x, lora_a, lora_b) -> str:
    if not needs_grouped(meta):
        return "loop" if meta.num_segments <= LOOP_MAX_SEGMENTS else "slot_range"
    return "grouped" if grouped_mm_supports(x, lora_a, lora_b) else "loop"


def needs_grouped(meta: LoraBatchMeta) -> bool:
    """Whether neither `loop` (too many segments) nor `slot_range` (too uneven) suits the
    step. grouped_mm's CPU path costs one GEMM per slot and a few µs each, so such a step
    does better split into parts that each avoid it (`dispatch.split_spans`: a prefill
    beside decodes)."""
    return (meta.num_segments > LOOP_MAX_SEGMENTS
            and meta.slot_range_rows > SLOT_RANGE_MAX_PADDING * meta.num_pairs)


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


def _slot_range(y, x, lora_a, lora_b, meta: LoraBatchMeta) -> torch.Tensor:
    slots, length = meta.slot_hi - meta.slot_lo, meta.max_segment_len
    a = lora_a[meta.slot_lo : meta.slot_hi]  # [n, R, in], a view
    b = lora_b[meta.slot_lo : meta.slot_hi]  # [n, out, R], a view
    xs = x if meta.rows_in_order else x.index_select(0, meta.pair_rows)  # [P, in]
    if meta.padded_pairs is None:  # the grid is exactly the sorted pairs
        grid = xs.view(slots, length, -1)  # [n, L, in]
    else:
        grid = x.new_zeros(slots * length, x.shape[1]).index_copy_(0, meta.padded_pairs, xs)
        grid = grid.view(slots, length, -1)  # [n, L, in]
    t = torch.bmm(grid, a.transpose(1, 2))  # [n, L, R]
    if not meta.unit_weights:
        weights = meta.pair_weights.to(t.dtype)  # [P]
        if meta.padded_pairs is None:
            t.mul_(weights.view(slots, length, 1))
        else:
            t.view(-1, t.shape[-1]).mul_(
                t.new_zeros(slots * length).index_copy_(0, meta.padded_pairs, weights).unsqueeze(1))
    delta = torch.bmm(t, b.transpose(1, 2)).view(slots * length, -1)  # [n*L, out]
    if meta.padded_pairs is not None:
        delta = delta.index_select(0, meta.padded_pairs)  # [P, out]
    if meta.rows_in_order:
        return y.add_(delta)
    return y.index_add_(0, meta.pair_rows, delta)
