"""The fused NF4 + LoRA CPU kernel's interface: what it supports and refuses, a step of no
rows, its pair tables (LoraPairs) and the choice of instruction set."""

import subprocess
import sys

import pytest
import torch
from nf4_lora_cases import QKV, QKV_PARTS, make_case, run_kernel, slot_buffers

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.fused_lora import (
    ISA_ENV, ISAS, MAX_PARTS, FusedLora, LoraPairs, LoraPart, active_isa, detected_isa, nf4_lora_linear, supports,
)
from loraquilt.kernels.nf4.weight import NF4Weight

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")


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
