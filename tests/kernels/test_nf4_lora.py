"""The fused NF4 + LoRA CPU kernel (`kernels/nf4/nf4_lora_gemm.c`) against its pure-torch
reference (`nf4_lora_linear_reference`): shapes (outputs not a multiple of the 16-row panel,
projection parts side by side), row counts, ranks (padded ones included), adapter mixes
(composition, negative and zero weights, rows without adapters, one slot, a slot per
row, zipf), parts without pairs, bias, both dtypes and every instruction set the CPU runs;
then the weight values it multiplies by, its pair tables, its refusals and the choice of
instruction set."""

import functools
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.cpu import dequantize_nf4_into
from loraquilt.kernels.nf4.reference import nf4_linear_reference
from loraquilt.kernels.nf4.weight import NF4Weight
from loraquilt.kernels.nf4.fused_lora import (
    ISA_ENV, ISAS, MAX_PARTS, FusedLora, LoraPairs, LoraPart, PairsArgs, active_isa, dequantize_like_kernel,
    detected_isa, nf4_lora_linear, nf4_lora_linear_reference, supports,
)

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")

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


@pytest.fixture
def one_thread():
    """One OpenMP thread: the many small calls of a test then cost microseconds each, where
    two threads on a busy machine wait on each other at every barrier (the shape tests and
    `test_thread_count_does_not_change_the_bits` keep the threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_kernel(call, isa):
    x, weight, bias, parts, tables = call
    return nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, isa=isa)


# -- kernel against the reference -------------------------------------------------------


@pytest.mark.parametrize("isa", ISA_PARAMS)  # the innermost parameter: the references are reused
@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference_over_shapes(dtype, shape, isa):
    """Composed pairs on every part, padded ranks, bias; 1, 7, 32 and 133 rows."""
    case = make_case(shape, SHAPES[shape], dtype)
    for rows in ROWS:
        call, expected = case.rows(rows)
        assert_matches(run_kernel(call, isa), expected, dtype, f"{shape} rows={rows} {isa} {dtype}")


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference_over_mixes_and_ranks(dtype, mix, rank, isa, one_thread):
    """q/k/v-like parts side by side, 1 to 40 rows (133 in the other tests); the bias on
    every other rank."""
    case = make_case(QKV, QKV_PARTS, dtype, rank, mix, list(RANKS).index(rank) % 2 == 0, rows=40)
    for rows in (1, 7, 40):
        call, expected = case.rows(rows)
        assert_matches(run_kernel(call, isa), expected, dtype, f"{QKV} rows={rows} {mix} {rank} {isa} {dtype}")


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_without_pairs(dtype, isa, one_thread):
    """One part's table is None: its columns are the base projection only, bit for bit."""
    for shape, widths in ((QKV, QKV_PARTS), ((130, 64), SHAPES[(130, 64)])):
        for empty_part in range(len(widths)):
            case = make_case(shape, widths, dtype, "r8", "some_without", empty_part % 2 == 0, empty_part)
            for rows in (7, 133):
                call, expected = case.rows(rows)
                got = run_kernel(call, isa)
                assert_matches(got, expected, dtype, f"{shape} rows={rows} part {empty_part} empty {isa} {dtype}")
                x, weight, bias, parts, _ = call
                part = parts[empty_part]
                base = nf4_lora_linear(x, weight, bias, isa=isa)[:, part.col_start:part.col_end]
                assert torch.equal(got[:, part.col_start:part.col_end], base), (shape, rows, empty_part)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prebuilt_pairs_args_and_no_lora_rows(dtype, isa, one_thread):
    """The tables prebuilt once per step (PairsArgs) give the same result as the list; LoRA
    with no pair on any part, and no LoRA at all, give the base projection."""
    (x, weight, bias, parts, tables), _ = make_case(QKV, QKV_PARTS, dtype, "r16", "composed", True).rows(32)
    fused = FusedLora(parts)
    prebuilt = PairsArgs(tables, [p.a.shape[1] for p in parts])
    assert torch.equal(nf4_lora_linear(x, weight, bias, fused, prebuilt, isa=isa),
                       nf4_lora_linear(x, weight, bias, fused, tables, isa=isa))
    base = nf4_lora_linear(x, weight, bias, isa=isa)
    assert torch.equal(nf4_lora_linear(x, weight, bias, fused, [None] * len(parts), isa=isa), base)
    assert_matches(base, nf4_lora_linear_reference(x, weight, bias), dtype, f"base only {isa} {dtype}")


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_the_bits(dtype, isa):
    """Each output (and each shrunk value) is summed by one thread in one order: the same
    bits with one thread as with several, call after call (panels and shrink items are
    handed out dynamically, so the threads take different ones each time)."""
    threads = torch.get_num_threads()
    for shape, rows in (((3072, 576), 32), ((960, 576), 133)):
        call, _ = make_case(shape, SHAPES[shape], dtype).rows(rows)
        try:
            torch.set_num_threads(1)
            single = run_kernel(call, isa)
        finally:
            torch.set_num_threads(threads)
        for _ in range(3):
            assert torch.equal(run_kernel(call, isa), single), (shape, rows, threads)


def test_reference_follows_the_raw_row_tables():
    """The reference (and `LoraPairs.from_row_table`) against a loop over the raw [T, K]
    slot/weight tables: row t gets sum_k w[t, k] (x[t] @ A[slot].T) @ Bt[slot] per part."""
    for mix in MIXES:
        gen = torch.Generator().manual_seed(5)
        shape, rows = (130, 64), 33
        out_features, in_features = shape
        x = torch.randn(rows, in_features, generator=gen)
        weight = nf4_weight(out_features, in_features, torch.float32)
        num_slots = rows if mix == "distinct" else NUM_SLOTS
        expected = x @ dequantize_nf4_into(weight, torch.empty(shape)).T
        parts, tables, start = [], [], 0
        for width in SHAPES[shape]:
            a, bt = slot_buffers(num_slots, "r4", in_features, width, torch.float32, gen)
            slots, weights = row_table(mix, rows, num_slots, gen)
            for t in range(rows):
                for slot, w in zip(slots[t].tolist(), weights[t].tolist()):
                    if slot >= 0:
                        expected[t, start:start + width] += w * ((x[t] @ a[slot].T) @ bt[slot])
            parts.append(LoraPart(start, start + width, a, bt))
            tables.append(LoraPairs.from_row_table(slots, weights))
            start += width
        got = nf4_lora_linear_reference(x, weight, None, parts, tables)
        assert_matches(got, expected, torch.float32, mix)


# -- base only, weight values -----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def base_case(shape):
    """x [133, in], bias, and bitsandbytes' outputs without and with the bias."""
    weight = nf4_weight(*shape, torch.float32)
    gen = torch.Generator().manual_seed(shape[0])
    x, bias = torch.randn(max(ROWS), shape[1], generator=gen), torch.randn(shape[0], generator=gen)
    return weight, x, bias, nf4_linear_reference(x, weight, None), nf4_linear_reference(x, weight, bias)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_base_only_matches_bitsandbytes_in_float32(shape, isa, one_thread):
    """lora=None: the NF4 GEMM alone against bitsandbytes' matmul_4bit."""
    weight, x, bias, plain, biased = base_case(shape)
    for rows in ROWS:
        for b, expected in ((None, plain), (bias, biased)):
            assert_matches(nf4_lora_linear(x[:rows], weight, b, isa=isa), expected[:rows],
                           torch.float32, f"{shape} rows={rows} bias={b is not None} {isa}")


@pytest.mark.parametrize("shape", [(130, 64), (960, 576), (96, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_weight_values_are_bitsandbytes_dequantize(shape):
    """The values the bf16 kernel multiplies by are bitsandbytes' dequantize in bf16, bit for bit."""
    weight = nf4_weight(*shape, torch.bfloat16)
    expected = dequantize_like_kernel(weight, torch.bfloat16)
    assert expected.dtype == torch.float32 and torch.equal(expected, expected.to(torch.bfloat16).float())
    for dequantizer in ("bnb", "auto"):
        dense = dequantize_nf4_into(weight, torch.empty(shape, dtype=torch.bfloat16), dequantizer)
        assert torch.equal(dense.float(), expected), dequantizer
    assert torch.equal(dequantize_like_kernel(weight, torch.float32),
                       dequantize_nf4_into(weight, torch.empty(shape), "bnb"))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_multiplies_by_exactly_those_values(dtype, isa):
    """x = identity rows: each output is one weight value times 1, with nothing to round,
    so y[t, o] == W[o, t] bit for bit whatever the instruction set."""
    for shape in ((130, 64), (96, 128)):
        weight = nf4_weight(*shape, dtype)
        x = torch.eye(shape[1], dtype=dtype)
        got = nf4_lora_linear(x, weight, None, isa=isa)
        assert torch.equal(got.float(), dequantize_like_kernel(weight, dtype).T), (shape, isa, dtype)


# -- refusals ---------------------------------------------------------------------------


def test_supports_and_refusals():
    good = NF4Weight.quantize(torch.randn(64, 128))
    x = torch.randn(3, 128)
    assert supports(x, good) and supports(x.bfloat16(), good)
    odd = NF4Weight.quantize(torch.randn(64, 96))  # in % 64 != 0
    assert not supports(torch.randn(3, 96), odd)
    assert not supports(x.half(), good)
    assert not supports(torch.randn(128, 3).t(), good)  # not contiguous
    assert not supports(torch.randn(128), good)
    with pytest.raises(RuntimeError, match="does not take"):
        nf4_lora_linear(torch.randn(3, 96), odd, None)
    with pytest.raises(RuntimeError, match="does not take"):
        nf4_lora_linear(x.half(), good, None)
    with pytest.raises(ValueError, match="features"):
        nf4_lora_linear(torch.randn(3, 192), good, None)

    gen = torch.Generator().manual_seed(0)
    parts = [LoraPart(0, 32, *slot_buffers(2, "r4", 128, 32, torch.float32, gen)),
             LoraPart(32, 64, *slot_buffers(2, "r4", 128, 32, torch.float32, gen))]
    table = LoraPairs.from_row_table(torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="2 parts but 1 pair tables"):
        nf4_lora_linear(x, good, None, FusedLora(parts), [table])
    with pytest.raises(ValueError, match="2 parts but 3 pair tables"):
        nf4_lora_linear(x, good, None, FusedLora(parts), [table, table, table])
    with pytest.raises(ValueError, match="a pair table for 3 rows, x has 5"):  # a table of another step
        nf4_lora_linear(torch.randn(5, 128), good, None, FusedLora(parts), [table, None])
    with pytest.raises(ValueError, match="at most"):
        FusedLora(parts * 3)
    assert MAX_PARTS == 4
    a, bt = slot_buffers(2, "r4", 128, 32, torch.float32, gen)
    with pytest.raises(ValueError, match="does not match"):
        LoraPart(0, 33, a, bt)  # 33 columns, Bt has 32
    with pytest.raises(ValueError, match="does not match"):
        LoraPart(0, 32, a, bt[:, :2].contiguous())  # rank 2 against A's 4
    with pytest.raises(ValueError, match="contiguous"):
        LoraPart(0, 32, a, bt.transpose(1, 2).contiguous().transpose(1, 2))


def test_zero_rows_in_a_fresh_process():
    """A step of no rows gives [0, out]; in a fresh process (no per-thread buffers yet)."""
    script = (
        "import torch\n"
        "from loraquilt.kernels.nf4.weight import NF4Weight\n"
        "from loraquilt.kernels.nf4.fused_lora import nf4_lora_linear\n"
        "w = NF4Weight.quantize(torch.randn(64, 64))\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    assert nf4_lora_linear(torch.randn(0, 64).to(dtype), w, None).shape == (0, 64)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


# -- pair tables ------------------------------------------------------------------------


def test_pairs_from_spans():
    """Spans of 2, 1 and 2 rows: pairs listed row by row, row_start the CSR offsets."""
    pairs = LoraPairs.from_spans([((0, 1.0),), (), ((2, 0.5), (1, -1.0))], [2, 1, 2])
    assert pairs.pair_row.tolist() == [0, 1, 3, 3, 4, 4]
    assert pairs.pair_slot.tolist() == [0, 0, 2, 1, 2, 1]
    assert pairs.pair_weight.tolist() == [1.0, 1.0, 0.5, -1.0, 0.5, -1.0]
    assert pairs.row_start.tolist() == [0, 1, 2, 2, 4, 6]
    assert pairs.num_pairs == pairs.struct.num_pairs == 6
    assert (pairs.pair_row.dtype, pairs.pair_slot.dtype, pairs.pair_weight.dtype, pairs.row_start.dtype) == \
        (torch.int32, torch.int32, torch.float32, torch.int32)
    assert pairs.struct.row_start == pairs.row_start.data_ptr()
    empty = LoraPairs.from_spans([(), ()], [1, 2])
    assert empty.num_pairs == 0 and empty.row_start.tolist() == [0, 0, 0, 0]


def test_pairs_from_row_table():
    slots = torch.tensor([[0, -1], [-1, -1], [3, 1], [2, 2]])
    weights = torch.tensor([[0.5, 9.0], [9.0, 9.0], [1.0, -2.0], [0.0, 0.25]])
    pairs = LoraPairs.from_row_table(slots, weights)
    assert pairs.pair_row.tolist() == [0, 2, 2, 3, 3]
    assert pairs.pair_slot.tolist() == [0, 3, 1, 2, 2]
    assert pairs.pair_weight.tolist() == [0.5, 1.0, -2.0, 0.0, 0.25]
    assert pairs.row_start.tolist() == [0, 1, 1, 3, 5]
    single = LoraPairs.from_row_table(torch.tensor([2, -1, 0]))  # [T]: one pair per row, weight 1
    assert single.pair_row.tolist() == [0, 2] and single.pair_slot.tolist() == [2, 0]
    assert single.pair_weight.tolist() == [1.0, 1.0] and single.row_start.tolist() == [0, 1, 1, 2]
    # the same rows as spans
    spans = LoraPairs.from_spans([((0, 0.5),), (), ((3, 1.0), (1, -2.0)), ((2, 0.0), (2, 0.25))], [1, 1, 1, 1])
    for name in ("pair_row", "pair_slot", "pair_weight", "row_start"):
        assert torch.equal(getattr(spans, name), getattr(pairs, name)), name


# -- instruction set --------------------------------------------------------------------


def test_active_isa_honours_the_environment(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    assert active_isa() == detected_isa() in ISAS
    monkeypatch.setenv(ISA_ENV, "  ")
    assert active_isa() == detected_isa()
    for isa in ISAS:
        monkeypatch.setenv(ISA_ENV, isa)
        assert active_isa() == ISAS[min(ISAS.index(isa), ISAS.index(detected_isa()))]
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert active_isa() == "avx2"
    monkeypatch.setattr(nf4_lora, "detected_isa", lambda: "avx2")  # never wider than the CPU runs
    monkeypatch.setenv(ISA_ENV, "avx512_bf16")
    assert active_isa() == "avx2"
    monkeypatch.setenv(ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="sse2"):
        active_isa()


def test_the_forced_isa_is_the_default_of_a_call(monkeypatch):
    call, _ = make_case(QKV, QKV_PARTS, torch.bfloat16, "r8", "composed", True).rows(7)
    explicit = run_kernel(call, "avx2")
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert torch.equal(run_kernel(call, None), explicit)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slot_ranks_skip_only_zero_rows(dtype, isa, one_thread):
    """Slots whose adapters fill fewer rows than the buffers' rank (zero past it): the kernel
    told each slot's rank gives the reference's result (it skips only zero rows), and the
    same bits as without the ranks in float32."""
    (x, weight, bias, parts, tables), expected = make_case(QKV, QKV_PARTS, dtype, "padded", "zipf", True).rows(40)
    used = torch.tensor([1 + s % 16 for s in range(parts[0].a.shape[0])], dtype=torch.int32)  # "padded" ranks
    ranked = [LoraPart(p.col_start, p.col_end, p.a, p.bt, used) for p in parts]
    got = nf4_lora_linear(x, weight, bias, FusedLora(ranked), tables, isa=isa)
    assert_matches(got, expected, dtype, f"slot ranks {isa} {dtype}")
    if dtype == torch.float32:
        assert torch.equal(got, nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, isa=isa))
    with pytest.raises(ValueError, match="slot_ranks"):
        FusedLora([LoraPart(p.col_start, p.col_end, p.a, p.bt, used.long()) for p in parts])
