"""The fused NF4 + LoRA CPU kernel (`kernels/nf4/nf4_lora_gemm.c`) against its pure-torch
reference (`nf4_lora_linear_reference`): shapes (outputs not a multiple of the 16-row panel,
projection parts side by side), row counts, ranks (padded ones included, and slots told
their ranks), adapter mixes (composition, negative and zero weights, rows without
adapters, one slot, a slot per row, zipf), parts without pairs, bias, both dtypes and every
instruction set the CPU runs; and the reference against a loop over the raw row tables."""

import pytest
import torch
from nf4_lora_cases import (
    DTYPES, ISA_PARAMS, MIXES, NUM_SLOTS, QKV, QKV_PARTS, RANKS, ROWS, SHAPES, assert_matches, make_case,
    nf4_weight, row_table, run_kernel, slot_buffers,
)

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.cpu import dequantize_nf4_into
from loraquilt.kernels.nf4.fused_lora import (
    FusedLora, LoraPairs, LoraPart, PairsArgs, nf4_lora_linear, nf4_lora_linear_reference,
)

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")


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
