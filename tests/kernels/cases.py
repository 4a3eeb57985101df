"""Shared builders for the kernel tests: adapter buffers and row->slot popularity patterns."""

from __future__ import annotations

import torch

from loraquilt.kernels.lora import NO_ADAPTER

PATTERNS = ("all_distinct", "uniform", "zipf", "identical", "all_none", "mixed_none")

# (atol, rtol) per dtype against the float32-accumulated reference
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def row_slots_for(pattern: str, rows: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[rows] int64 slot per row following a popularity pattern."""
    if pattern == "all_distinct":
        return torch.randperm(max(rows, num_slots), generator=gen)[:rows] % num_slots
    if pattern == "uniform":
        return torch.randint(0, num_slots, (rows,), generator=gen)
    if pattern == "zipf":
        ranks = torch.arange(1, num_slots + 1, dtype=torch.float64)
        probs = 1.0 / ranks**1.1
        return torch.multinomial(probs / probs.sum(), rows, replacement=True, generator=gen)
    if pattern == "identical":
        return torch.full((rows,), int(torch.randint(0, num_slots, (1,), generator=gen)))
    if pattern == "all_none":
        return torch.full((rows,), NO_ADAPTER)
    if pattern == "mixed_none":
        slots = torch.randint(0, num_slots, (rows,), generator=gen)
        none = torch.rand(rows, generator=gen) < 0.4
        return torch.where(none, torch.full_like(slots, NO_ADAPTER), slots)
    raise ValueError(pattern)


def composed_slots(rows: int, pairs: int, num_slots: int, gen: torch.Generator):
    """[rows, pairs] slots (some -1, repeats allowed) and [rows, pairs] weights in [-1, 2)."""
    slots = torch.randint(NO_ADAPTER, num_slots, (rows, pairs), generator=gen)
    weights = torch.rand(rows, pairs, generator=gen) * 3 - 1
    return slots, weights


def adapter_buffers(
    num_slots: int, rank: int, in_features: int, out_features: int, dtype, gen,
    padded_ranks: bool = True,
):
    """Slot buffers A [S, R, in], B [S, out, R] with O(1) deltas for O(1) inputs.

    With padded_ranks, slot s really has rank 1 + s % rank and is zero beyond it, as the
    engine stores adapters of smaller rank.
    """
    a = torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(num_slots, out_features, rank, generator=gen) / rank**0.5
    if padded_ranks:
        for slot in range(num_slots):
            true_rank = 1 + slot % rank
            a[slot, true_rank:] = 0
            b[slot, :, true_rank:] = 0
    return a.to(dtype), b.to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
