"""Per-step LoRA batch description: which rows use which adapter slots, grouped SGMV style.

A step's rows each carry up to K (slot, weight) pairs. Every backend works on the *pairs*
with a valid slot, sorted by slot so that the rows of one slot form one contiguous
segment (SGMV). The metadata is built once per step and shared by every projection of
every layer, so all host-side work (sorting, Python lists for the CPU loop) happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_ADAPTER = -1


@dataclass(frozen=True)
class Segments:
    """Pairs sorted by slot and the segment table over them.

    perm:       [P] int64   index into the flattened [T*K] pair table, sorted by slot (stable)
    seg_indptr: [S+1] int64 pair offsets; segment s covers sorted pairs seg_indptr[s]:seg_indptr[s+1]
    seg_slot:   [S] int64   adapter slot of each segment (never NO_ADAPTER)
    """

    perm: torch.Tensor
    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor


def build_segments(pair_slots: torch.Tensor) -> Segments:
    """Group pairs by adapter slot.

    Semantics:
        valid = [p for p in range(P_all) if pair_slots[p] != -1]
        perm  = sorted(valid, key=lambda p: pair_slots[p])        # stable
        segments = maximal runs of equal slot in pair_slots[perm]
        seg_indptr[s]..seg_indptr[s+1] = run s,  seg_slot[s] = its slot

    pair_slots: [P_all] integer tensor, NO_ADAPTER (-1) for "no adapter".
    """
    if pair_slots.dim() != 1:
        raise ValueError(f"pair_slots must be 1-D, got shape {tuple(pair_slots.shape)}")
    pair_slots = pair_slots.to(torch.int64)
    valid = torch.nonzero(pair_slots != NO_ADAPTER).squeeze(1)  # [P]
    sorted_slots, order = torch.sort(pair_slots[valid], stable=True)
    perm = valid[order]  # [P]
    seg_slot, counts = torch.unique_consecutive(sorted_slots, return_counts=True)  # [S], [S]
    seg_indptr = torch.zeros(seg_slot.numel() + 1, dtype=torch.int64, device=pair_slots.device)
    torch.cumsum(counts, 0, out=seg_indptr[1:])
    return Segments(perm=perm, seg_indptr=seg_indptr, seg_slot=seg_slot)


@dataclass(frozen=True)
class LoraBatchMeta:
    """Everything a LoRA kernel needs to know about one step's rows.

    Tensors (on the device of the activations):
      row_slots:    [T, K] int64   the raw table: slot of pair k of row t, -1 = none
      row_weights:  [T, K] float32 weight of pair k of row t
      pair_rows:    [P] int64   activation row of each valid pair, sorted by slot
      pair_weights: [P] float32 weight of each valid pair, same order
      seg_indptr:   [S+1] int64 segment offsets into the sorted pairs
      seg_slot:     [S] int64   slot of each segment
      slot_offsets: [num_slots] int32  cumulative end of each slot's pairs (grouped-GEMM
                    form of the same table: slot j covers slot_offsets[j-1]:slot_offsets[j])
    Host values (Python, for launch sizes and the CPU loop):
      num_rows: T, num_slots, num_pairs: P, max_pairs_per_row: K actually used,
      segments: ((slot, start, end), ...) per segment, max_segment_len,
      rows_in_order: pair_rows == arange(T) (each row exactly one pair, already grouped),
      unit_weights: every pair weight is exactly 1.
    Slot-range form (for batched GEMMs over a contiguous range of slot buffers):
      slot_lo, slot_hi: the segments' slots lie in [slot_lo, slot_hi) (0, 0 when no pair)
      padded_pairs: [P] int64 position of each sorted pair in a [slot_hi - slot_lo,
                    max_segment_len] grid (slot - slot_lo, rank within its segment),
                    flattened; None when that grid holds exactly the pairs in order
                    (every slot of the range used, all segments max_segment_len long).
    """

    row_slots: torch.Tensor
    row_weights: torch.Tensor
    pair_rows: torch.Tensor
    pair_weights: torch.Tensor
    seg_indptr: torch.Tensor
    seg_slot: torch.Tensor
    slot_offsets: torch.Tensor
    num_rows: int
    num_slots: int
    num_pairs: int
    max_pairs_per_row: int
    segments: tuple[tuple[int, int, int], ...]
    max_segment_len: int
    rows_in_order: bool
    unit_weights: bool
    slot_lo: int = 0
    slot_hi: int = 0
    padded_pairs: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def slot_range_rows(self) -> int:
        """Rows of the [slot_hi - slot_lo, max_segment_len] grid (padding included)."""
        return (self.slot_hi - self.slot_lo) * self.max_segment_len


def build_lora_meta(
    row_slots: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    *,
    num_slots: int,
    device: torch.device | str | None = None,
) -> LoraBatchMeta:
    """Describe one step: row t applies Σ_k row_weights[t,k] · LoRA(row_slots[t,k]).

    row_slots:   [T] or [T, K] integer, slot index in [0, num_slots) or -1 (no adapter)
    row_weights: [T] or [T, K] float, weight per pair; None = all 1.0
    num_slots:   number of slots in the A/B buffers the kernels will read
    device:      where the kernels run (default: row_slots' device)
    """
    if row_slots.dim() == 1:
        row_slots = row_slots.unsqueeze(1)
    if row_slots.dim() != 2:
        raise ValueError(f"row_slots must be [T] or [T, K], got shape {tuple(row_slots.shape)}")
    if row_slots.dtype.is_floating_point or row_slots.dtype == torch.bool:
        raise ValueError(f"row_slots must be an integer tensor, got {row_slots.dtype}")
    num_rows, pairs_per_row = row_slots.shape
    if row_weights is None:
        row_weights = torch.ones(row_slots.shape, dtype=torch.float32)
    else:
        if row_weights.dim() == 1:
            row_weights = row_weights.unsqueeze(1)
        if tuple(row_weights.shape) != tuple(row_slots.shape):
            raise ValueError(
                f"row_weights shape {tuple(row_weights.shape)} != row_slots shape "
                f"{tuple(row_slots.shape)}"
            )
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    device = torch.device(device) if device is not None else row_slots.device

    host_slots = row_slots.detach().to("cpu", torch.int64)  # [T, K]
    host_weights = row_weights.detach().to("cpu", torch.float32)  # [T, K]
    bad = (host_slots < NO_ADAPTER) | (host_slots >= num_slots)
    if bool(bad.any()):
        raise ValueError(
            f"row_slots must be -1 or in [0, {num_slots}); got {host_slots[bad][:4].tolist()}"
        )
    if not bool(torch.isfinite(host_weights).all()):
        raise ValueError("row_weights must be finite")

    segs = build_segments(host_slots.reshape(-1))
    pair_rows = segs.perm // pairs_per_row  # [P]
    pair_weights = host_weights.reshape(-1)[segs.perm]  # [P]
    counts = torch.bincount(host_slots.reshape(-1)[segs.perm], minlength=num_slots)  # [num_slots]
    slot_offsets = torch.cumsum(counts, 0).to(torch.int32)  # [num_slots]

    bounds = segs.seg_indptr.tolist()
    slots = segs.seg_slot.tolist()
    segments = tuple((slot, bounds[i], bounds[i + 1]) for i, slot in enumerate(slots))
    num_pairs = int(pair_rows.numel())
    used_per_row = (host_slots != NO_ADAPTER).sum(1)
    rows_in_order = num_pairs == num_rows and bool(
        torch.equal(pair_rows, torch.arange(num_rows, dtype=torch.int64))
    )

    max_segment_len = max((end - start for _, start, end in segments), default=0)
    slot_lo, slot_hi = (slots[0], slots[-1] + 1) if slots else (0, 0)
    padded_pairs = None
    if num_pairs and num_pairs != (slot_hi - slot_lo) * max_segment_len:
        seg_of_pair = torch.repeat_interleave(torch.arange(len(slots)), torch.diff(segs.seg_indptr))  # [P]
        rank_in_seg = torch.arange(num_pairs) - segs.seg_indptr[seg_of_pair]  # [P]
        padded_pairs = (segs.seg_slot[seg_of_pair] - slot_lo) * max_segment_len + rank_in_seg  # [P]

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return LoraBatchMeta(
        row_slots=on_device(host_slots),
        row_weights=on_device(host_weights),
        pair_rows=on_device(pair_rows),
        pair_weights=on_device(pair_weights),
        seg_indptr=on_device(segs.seg_indptr),
        seg_slot=on_device(segs.seg_slot),
        slot_offsets=on_device(slot_offsets),
        num_rows=num_rows,
        num_slots=num_slots,
        num_pairs=num_pairs,
        max_pairs_per_row=int(used_per_row.max()) if num_rows else 0,
        segments=segments,
        max_segment_len=max_segment_len,
        rows_in_order=rows_in_order,
        unit_weights=bool((pair_weights == 1.0).all()),
        slot_lo=slot_lo,
        slot_hi=slot_hi,
        padded_pairs=None if padded_pairs is None else on_device(padded_pairs),
    )
