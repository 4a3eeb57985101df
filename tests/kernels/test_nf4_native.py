"""The project's own NF4 kernels against their references: the AVX2/OpenMP dequantize
kernel (bit for bit against bitsandbytes and the pure-torch formula), fused row-wise
weights, the per-shape path plan, and the fallback when the kernel cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from loraquilt.kernels.nf4 import (
    NF4_BLOCKSIZE, DequantScratch, NF4Weight, can_concat, dequantize_nf4_into, nf4_linear_cpu,
    nf4_linear_reference,
)
from loraquilt.kernels.nf4_native import loaded_openmp_runtimes, native_kernel
from loraquilt.kernels.nf4_plan import (
    DECODE_ROWS, PATHS, ROW_KINDS, WEIGHT_MAJOR, NF4PathChoice, candidate_paths, plan_nf4_paths, run_path,
)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 32, 133])
@pytest.mark.parametrize("shape", [(192, 576), (1728, 576), (576, 1536), (130, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_weight_major_paths_match_bitsandbytes_to_rounding(dtype, rows, shape):
    """(W @ x.T).T: the same products in another summation order, so equal to the
    reference within the dtype's rounding (not bit for bit), row-major, with the bias."""
    gen = torch.Generator().manual_seed(rows * 3 + shape[0])
    weight = NF4Weight.quantize(torch.randn(*shape, generator=gen).to(dtype))
    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for path in (p for p in WEIGHT_MAJOR if p in candidate_paths(dtype)):
        for b in (None, bias):
            got = run_path(path, x, weight, b, DequantScratch())
            expected = nf4_linear_reference(x, weight, b)
            assert got.shape == (rows, shape[0]) and got.is_contiguous() and got.dtype == dtype
            scale = expected.abs().max().float()
            assert float((got.float() - expected.float()).abs().max()) <= tolerance * scale, (path, b is None)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plan_picks_a_measured_candidate_per_shape_and_row_kind(dtype):
    shapes = [(192, 576), (576, 576), (192, 576)]
    plans = plan_nf4_paths(shapes, dtype, repeats=1)
    assert set(plans) == {(192, 576), (576, 576)}
    for choice in plans.values():
        assert choice.paths <= set(candidate_paths(dtype))
        for kind, _ in ROW_KINDS:
            assert choice.by_kind[kind] in choice.timings_us[kind]
            assert all(us > 0 for us in choice.timings_us[kind].values())
    exact = plan_nf4_paths(shapes, dtype, repeats=1, exact_only=True)
    assert all(not (choice.paths & set(WEIGHT_MAJOR)) for choice in exact.values())


def test_path_choice_by_rows():
    choice = NF4PathChoice({"decode": "dequant_native", "chunk": "dequant_native_wm", "prefill": "dequant_bnb"})
    assert choice.path_for(1) == choice.path_for(DECODE_ROWS) == "dequant_native"
    assert choice.path_for(DECODE_ROWS + 1) == choice.path_for(ROW_KINDS[1][1]) == "dequant_native_wm"
    assert choice.path_for(ROW_KINDS[1][1] + 1) == choice.path_for(10**6) == "dequant_bnb"
    assert choice.replacing("dequant_native_wm", "dequant_native").by_kind["chunk"] == "dequant_native"
    assert set(WEIGHT_MAJOR) <= set(PATHS)
    weight = NF4Weight.quantize(torch.randn(64, 64))
    with pytest.raises(ValueError, match="unknown NF4 path"):
        run_path("fast", torch.randn(2, 64), weight, None, DequantScratch())
    with pytest.raises(ValueError, match="unknown NF4 path"):
        run_path("fast_wm", torch.randn(2, 64), weight, None, DequantScratch())
    with pytest.raises(ValueError, match="repacked"):
        run_path("bnb_fused", torch.randn(2, 64), weight, None, DequantScratch())


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
        "from loraquilt.kernels.nf4 import NF4Weight, dequantize_nf4_into, nf4_linear_cpu, nf4_linear_reference, DequantScratch\n"
        "from loraquilt.kernels.nf4_native import native_kernel\n"
        "from loraquilt.kernels.nf4_plan import candidate_paths\n"
        "w = NF4Weight.quantize(torch.randn(192, 576)); x = torch.randn(7, 576)\n"
        "assert native_kernel() is None and native_kernel() is None\n"
        "assert candidate_paths(torch.float32) == ['dequant_bnb', 'dequant_bnb_wm']\n"
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
        assert len(warnings) == 1 and "no C compiler" in warnings[0], result.stderr
    off = {**os.environ, "LORAQUILT_NATIVE_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=off, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
