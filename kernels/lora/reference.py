"""Ground truth: the slowest obvious loop over raw rows, accumulated in float32."""

from __future__ import annotations

import torch

from loraquilt.kernels.lora.segments import NO_ADAPTER, LoraBatchMeta


def lora_add_reference_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """Add each row's (weighted mix of) LoRA deltas to y, in place.

    Semantics:
        for t in range(T):
            delta = 0  (float32)
            for k in range(K):
                s = row_slots[t, k]
                if s == -1: continue
                delta += row_weights[t, k] * (x[t] @ A[s].T) @ B[s].T
            y[t] = (y[t] + delta).to(y.dtype)

    Reads only the raw (row_slots, row_weights) table, never the sorted segments, so a
    comparison against it also checks segment building.

    y:      [T, out]  compute dtype, updated in place
    x:      [T, in]   compute dtype
    lora_a: [num_slots, max_rank, in]
    lora_b: [num_slots, out, max_rank]
    """
    row_slots = meta.row_slots.tolist()  # [T][K]
    row_weights = meta.row_weights.tolist()  # [T][K]
    for t in range(y.shape[0]):
        delta = torch.zeros(y.shape[1], dtype=torch.float32, device=y.device)  # [out]
        for slot, weight in zip(row_slots[t], row_weights[t]):
            if slot == NO_ADAPTER:
                continue
            a = lora_a[slot].float()  # [R, in]
            b = lora_b[slot].float()  # [out, R]
            delta += weight * ((x[t].float() @ a.T) @ b.T)
        y[t] = (y[t].float() + delta).to(y.dtype)
    return y
