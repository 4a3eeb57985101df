"""Shared builders for the fused NF4 + LoRA kernel tests (test_nf4_lora_*.py): shapes,
ranks and adapter mixes, seeded NF4 weights, slot buffers and row tables, and cached cases
with their reference outputs."""

import functools
import zlib
from dataclasses import dataclass

import pytest
import torch

from loraquilt.kernels.nf4.fused_lora import (
    ISAS, FusedLora, LoraPairs, LoraPart, detected_isa, nf4_lora_linear, nf4_lora_linear_reference,
)
from loraquilt.kernels.nf4.weight import NF4Weight

# max |kernel - reference| over max |reference|: float32 sums in another order; bf16 one
# rounding of a float32 value (at most 1 ulp of the largest output, 2^-8..2^-7 of it)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]

# (out, in): column widths of the parts side by side
SHAPES = {
    (64, 64): (64,),
    (130, 64): (40, 26, 50, 14),  # out not a multiple of 16; MAX_PARTS parts, boundaries inside panels
    (7, 64): (7,),  # one short panel
    (576, 576): (576,),
    (960, 576): (576, 192, 192),  # q/k/v
    (3072, 576): (1536, 1536),  # gate/up
    (576, 1536): (576,),
    (96, 2048): (96,),
}
ROWS = [1, 7, 32, 133]
# rank label -> (buffer rank R, true rank of slot s): "padded" is zero beyond 1 + s % 16
RANKS = {"r1": (1, None), "r4": (4, None), "r8": (8, None), "r16": (16, None), "padded": (16, lambda s: 1 + s % 16)}
MIXES = ("one_pair", "composed", "some_without", "none", "same_slot", "distinct", "zipf")
NUM_SLOTS = 8
# mixes, ranks and parts without pairs on a smaller q/k/v-like weight (its reference is cheap)
QKV = (320, 128)
QKV_PARTS = (192, 64, 64)


def isa_param(isa: str):
    """An ISA the CPU does not run is skipped (the kernel would fault on its instructions)."""
    too_wide = ISAS.index(isa) > ISAS.index(detected_isa())
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(too_wide, reason=f"this CPU runs up to {detected_isa()}"))


ISA_PARAMS = [isa_param(isa) for isa in ISAS]


def assert_matches(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, case: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype, case
    scale = float(expected.float().abs().max())
    error = float((got.float() - expected.float()).abs().max())
    assert error <= TOLERANCE[dtype] * max(scale, 1e-6), \
        f"{case}: max error {error:.3g} against max |reference| {scale:.3g} (relative {error / max(scale, 1e-30):.3g})"


@functools.lru_cache(maxsize=8)
def nf4_weight(out_features: int, in_features: int, dtype: torch.dtype) -> NF4Weight:
    """Outputs of order 1 for inputs of order 1, like the LoRA deltas (so both are checked)."""
    gen = torch.Generator().manual_seed(out_features * 31 + in_features)
    return NF4Weight.quantize((torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(dtype))


def slot_buffers(num_slots: int, rank_label: str, in_features: int, width: int, dtype: torch.dtype,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, R, in], Bt [S, R, width]: deltas of order 1 for inputs of order 1."""
    rank, true_rank = RANKS[rank_label]
    a = torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5
    bt = torch.randn(num_slots, rank, width, generator=gen) / rank**0.5
    if true_rank is not None:
        for slot in range(num_slots):
            a[slot, true_rank(slot):] = 0
            bt[slot, true_rank(slot):] = 0
    return a.to(dtype).contiguous(), bt.to(dtype).contiguous()


def row_table(mix: str, rows: int, num_slots: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] slots (-1 = none) and [T, K] weights of one part's rows."""
    if mix == "one_pair":
        return torch.randint(0, num_slots, (rows, 1), generator=gen), torch.ones(rows, 1)
    if mix == "composed":  # 1-4 pairs per row, repeated slots, weights negative, zero, over 1
        slots = torch.randint(0, num_slots, (rows, 4), generator=gen)
        count = torch.randint(1, 5, (rows, 1), generator=gen)
        slots[torch.arange(4).expand(rows, 4) >= count] = -1
        weights = torch.rand(rows, 4, generator=gen) * 3 - 1
        weights[::3, 0] = 0.0
        weights[1::5, -1] = -1.0
        return slots, weights
    if mix == "some_without":  # ~40% of rows without a pair, the others 1-2 pairs
        slots = torch.randint(0, num_slots, (rows, 2), generator=gen)
        slots[torch.rand(rows, generator=gen) < 0.5, 1] = -1
        slots[torch.rand(rows, generator=gen) < 0.4] = -1
        return slots, torch.rand(rows, 2, generator=gen) * 2 - 0.5
    if mix == "none":
        return torch.full((rows, 1), -1), torch.ones(rows, 1)
    if mix == "same_slot":
        return torch.full((rows, 1), num_slots - 1), torch.full((rows, 1), 0.75)
    if mix == "distinct":  # num_slots >= rows: every row its own slot
        return torch.randperm(num_slots, generator=gen)[:rows].unsqueeze(1), torch.rand(rows, 1, generator=gen) + 0.5
    if mix == "zipf":
        probs = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.1
        slots = torch.multinomial(probs / probs.sum(), rows * 2, replacement=True, generator=gen).view(rows, 2)
        slots[::2, 1] = -1
        return slots, torch.rand(rows, 2, generator=gen) * 2 - 1
    raise ValueError(mix)


@dataclass(frozen=True)
class Case:
    """One call on up to 133 rows; `rows(n)` is the same call on its first n rows (the
    reference is row by row, so its first n rows are the reference of that call).
    row_tables: per part its raw [T, K] slots and weights, or None (no pairs)."""

    x: torch.Tensor
    weight: NF4Weight
    bias: torch.Tensor | None
    parts: tuple[LoraPart, ...]
    row_tables: tuple
    expected: torch.Tensor

    def rows(self, n: int) -> tuple:
        """(x, weight, bias, parts, tables) of the call on the first n rows, and its reference."""
        tables = [None if t is None else LoraPairs.from_row_table(t[0][:n], t[1][:n]) for t in self.row_tables]
        return (self.x[:n], self.weight, self.bias, self.parts, tables), self.expected[:n]


@functools.lru_cache(maxsize=8)
def make_case(shape, widths, dtype, rank_label="padded", mix="composed", bias=True, empty_part=None,
              rows=max(ROWS)) -> Case:
    """empty_part: the part whose table is None; rows: the most rows a test takes of it."""
    out_features, in_features = shape
    key = repr((shape, dtype, rank_label, mix, bias, empty_part, rows)).encode()
    gen = torch.Generator().manual_seed(zlib.crc32(key))  # a seed per case, the same in every run
    num_slots = max(rows, NUM_SLOTS) if mix == "distinct" else NUM_SLOTS
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    b = (torch.randn(out_features, generator=gen) * 0.5).to(dtype) if bias else None
    parts, row_tables, start = [], [], 0
    for index, width in enumerate(widths):
        parts.append(LoraPart(start, start + width, *slot_buffers(num_slots, rank_label, in_features, width,
                                                                  dtype, gen)))
        start += width
        table = row_table(mix, rows, num_slots, gen)
        row_tables.append(None if index == empty_part else table)
    assert start == out_features
    weight = nf4_weight(out_features, in_features, dtype)
    tables = [None if t is None else LoraPairs.from_row_table(*t) for t in row_tables]
    expected = nf4_lora_linear_reference(x, weight, b, parts, tables)
    return Case(x, weight, b, tuple(parts), tuple(row_tables), expected)


def run_kernel(call, isa):
    x, weight, bias, parts, tables = call
    return nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, isa=isa)
