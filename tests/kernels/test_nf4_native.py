"""The project's own NF4 kernels against their references: the AVX2/OpenMP dequantize
kernel (bit for bit against bitsandbytes and the pure-torch formula), fused row-wise
weights, the NF4 path plan (a rule of CPU flags and dtype), and the fallback when the
kernels cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from loraquilt.kernels.native_build import loaded_openmp_runtimes
from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.cpu import dequantize_nf4_into, nf4_linear_cpu
from loraquilt.kernels.nf4.dispatch import FUSED_MAX_ROWS, PATHS, NF4Plan, plan_nf4
from loraquilt.kernels.nf4.native import native_kernel
from loraquilt.kernels.nf4.reference import nf4_linear_reference
from loraquilt.kernels.nf4.weight import NF4_BLOCKSIZE, DequantScratch, NF4Weight, can_concat

needs_native = pytest.mark.skipif(native_kernel() is None, reason="native NF4 kernel not built on this CPU")

SHAPES = [(64, 64), (130, 64), (192, 576), (576, 576), (960, 576), (1536, 576), (576, 1536), (96, 2048),
          (7, 64), (3, 50)]  # the last: 150 values, a partial tail block


def torch_dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The formula in plain torch: code book lookup per nibble (high nibble first) x block scale."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type("nf4", device="cpu")  # [16] float32
    packed = weight.packed.view(-1)
    nibbles = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).reshape(-1)[: weight.numel].long()
    scales = weight.absmax.repeat_interleave(NF4_BLOCKSIZE)[: weight.numel]
    return (code[nibbles] * scales).to(dtype).view(weight.shape)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_dequantize_is_bit_identical(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    weight = NF4Weight.quantize(torch.randn(*shape, generator=gen).to(dtype))
    native = dequantize_nf4_into(weight, torch.empty(shape, dtype=dtype), "native")
    assert torch.equal(native, torch_dequantize(weight, dtype))
    if weight.numel % NF4_BLOCKSIZE == 0:  # bitsandbytes' C kernel wants whole blocks
        assert torch.equal(native, dequantize_nf4_into(weight, torch.empty(shape, dtype=dtype), "bnb"))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 32, 133])
@pytest.mark.parametrize("shape", [(192, 576), (960, 576), (576, 1536)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_path_linear_matches_bitsandbytes(dtype, rows, shape):
    gen = torch.Generator().manual_seed(rows + shape[0])
    weight = NF4Weight.quantize(torch.randn(*shape, generator=gen).to(dtype))
    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    for b in (None, bias):
        got = nf4_linear_cpu(x, weight, b, DequantScratch(), "native")
        assert torch.equal(got, nf4_linear_reference(x, weight, b))


def test_concat_rows_is_bit_identical_to_the_parts():
    gen = torch.Generator().manual_seed(3)
    parts = [NF4Weight.quantize(torch.randn(out, 128, generator=gen)) for out in (64, 16, 16)]
    assert can_concat(parts)
    fused = NF4Weight.concat_rows(parts)
    assert fused.shape == (96, 128)
    dense = dequantize_nf4_into(fused, torch.empty(96, 128))
    expected = torch.cat([dequantize_nf4_into(p, torch.empty(p.shape)) for p in parts])
    assert torch.equal(dense, expected)
    x = torch.randn(5, 128, generator=gen)
    assert torch.equal(nf4_linear_reference(x, fused, None),
                       torch.cat([nf4_linear_reference(x, p, None) for p in parts], dim=1))


def test_concat_rows_refuses_blocks_that_would_straddle_parts():
    odd = [NF4Weight.quantize(torch.randn(3, 50)), NF4Weight.quantize(torch.randn(3, 50))]  # 150 values
    assert not can_concat(odd)
    with pytest.raises(ValueError, match="multiple of 64"):
        NF4Weight.concat_rows(odd)
    assert not can_concat([NF4Weight.quantize(torch.randn(64, 64)), NF4Weight.quantize(torch.randn(64, 128))])


ROW_COUNTS = [1, 2, 7, 16, 32, 133, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 512, 4096, 10**6]
AVX2 = frozenset({"avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
WITH_AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}
FLAGS = {"avx2": AVX2, "avx512": AVX512, "avx512_bf16": AVX512_BF16, "amx": WITH_AMX}


def expected_fallback(dtype: torch.dtype) -> str:
    return "dequant_native" if native_kernel() is not None and dtype != torch.float16 else "dequant_bnb"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plan_is_stable(dtype):
    """A fixed rule, no timing: ten plans on this machine are equal, so every start picks
    the same path for every row count (and gives the same greedy tokens)."""
    plans = [plan_nf4(dtype) for _ in range(10)]
    assert all(plan == plans[0] for plan in plans)
    assert all(plan.path_for(rows) == plans[0].path_for(rows) for plan in plans for rows in ROW_COUNTS)
    assert {plans[0].path_for(rows) for rows in ROW_COUNTS} <= set(PATHS)
    assert plans[0].fallback == expected_fallback(dtype) and plans[0].describe()
    assert plans[0].isa in ("", *nf4_lora.ISAS)


@pytest.mark.parametrize("cpu", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plan_takes_the_fused_kernel_up_to_long_prefills(dtype, cpu):
    """Both dtypes, whatever the CPU: fused up to FUSED_MAX_ROWS rows, then dequantize + GEMM.
    float32 multiplies with FMAs (AVX-512 where the CPU has more); bf16 takes the widest."""
    plan = plan_nf4(dtype, FLAGS[cpu], fused_available=True)
    assert plan.fused_max_rows == FUSED_MAX_ROWS and plan.fallback == expected_fallback(dtype)
    for rows in ROW_COUNTS:
        assert plan.path_for(rows) == ("fused" if rows <= FUSED_MAX_ROWS else plan.fallback), rows
    widest = nf4_lora.isa_for_flags(FLAGS[cpu])
    assert widest == cpu
    assert plan.isa == (widest if dtype == torch.bfloat16 or cpu in ("avx2", "avx512") else "avx512")
    assert plan.describe().startswith(f"fused NF4+LoRA kernel ({plan.isa}) for steps of <= {FUSED_MAX_ROWS} rows")


@pytest.mark.parametrize("cpu", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plan_without_the_fused_kernel_takes_the_fallback_everywhere(dtype, cpu):
    plan = plan_nf4(dtype, FLAGS[cpu], fused_available=False)
    assert plan.fused_max_rows == 0 and plan.isa == ""
    assert plan.fallback == expected_fallback(dtype)
    assert all(plan.path_for(rows) == plan.fallback for rows in ROW_COUNTS)
    assert plan.describe().startswith(f"{plan.fallback} (")
    # no fused kernel for float16 either, even where it is built
    float16 = plan_nf4(torch.float16, FLAGS[cpu], fused_available=True)
    assert float16.fused_max_rows == 0 and float16.path_for(1) == "dequant_bnb"


def test_plan_isa_on_this_machine_follows_the_forced_instruction_set(monkeypatch):
    monkeypatch.setenv(nf4_lora.ISA_ENV, "avx2")
    for dtype in (torch.float32, torch.bfloat16):
        assert plan_nf4(dtype, fused_available=True).isa == "avx2"


def test_path_for_boundaries():
    plan = NF4Plan(32, "dequant_native", "avx2", "test")
    assert plan.path_for(1) == plan.path_for(31) == plan.path_for(32) == "fused"
    assert plan.path_for(33) == plan.path_for(10**9) == "dequant_native"
    assert plan.describe() == "fused NF4+LoRA kernel (avx2) for steps of <= 32 rows, else dequant_native (test)"
    never = NF4Plan(0, "dequant_bnb", "", "no fused kernel")
    assert never.path_for(1) == never.path_for(10**9) == "dequant_bnb"
    assert never.describe() == "dequant_bnb (no fused kernel)"
    assert PATHS == ("fused", "dequant_native", "dequant_bnb")


@needs_native
def test_one_openmp_runtime_in_the_process():
    runtimes = loaded_openmp_runtimes()
    assert len(runtimes) == 1, runtimes


def test_fallback_when_the_native_kernel_is_off_warns_once_and_stays_exact(tmp_path):
    """LORAQUILT_NATIVE_KERNELS=0 stands in for a CPU or machine where it cannot be built;
    a missing compiler takes the same branch (CC set to a compiler that does not exist and
    PATH without one)."""
    script = (
        "import torch\n"
        "from loraquilt.kernels.nf4.weight import NF4Weight, DequantScratch\n"
        "from loraquilt.kernels.nf4.cpu import nf4_linear_cpu\n"
        "from loraquilt.kernels.nf4.reference import nf4_linear_reference\n"
        "from loraquilt.kernels.nf4.native import native_kernel\n"
        "from loraquilt.kernels.nf4 import fused_lora as nf4_lora\n"
        "from loraquilt.kernels.nf4.dispatch import plan_nf4\n"
        "w = NF4Weight.quantize(torch.randn(192, 576)); x = torch.randn(7, 576)\n"
        "assert native_kernel() is None and native_kernel() is None\n"
        "assert not nf4_lora.available() and not nf4_lora.available()\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    plan = plan_nf4(dtype)\n"
        "    assert (plan.fused_max_rows, plan.fallback) == (0, 'dequant_bnb'), plan\n"
        "    assert plan.path_for(1) == plan.path_for(4096) == 'dequant_bnb'\n"
        "assert torch.equal(nf4_linear_cpu(x, w, None, DequantScratch()), nf4_linear_reference(x, w, None))\n"
        "print('ok')\n"
    )
    no_compiler = {**os.environ, "CC": "no-such-cc", "PATH": str(tmp_path),
                   "LORAQUILT_CACHE": str(tmp_path / "cache")}
    for env in (no_compiler,):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        # one line per kernel library (the dequantize kernel, the fused NF4 + LoRA kernel)
        assert len(warnings) == 2 and all("no C compiler" in line for line in warnings), result.stderr
        assert sum("dequantize kernel instead" in line for line in warnings) == 1, result.stderr
        assert sum("dequantize + GEMM instead" in line for line in warnings) == 1, result.stderr
    off = {**os.environ, "LORAQUILT_NATIVE_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=off, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
