"""The fused NF4 + LoRA CPU kernel without LoRA against bitsandbytes, and the weight values
it multiplies by: bitsandbytes' dequantize, bit for bit."""

import functools

import pytest
import torch
from nf4_lora_cases import DTYPES, ISA_PARAMS, ROWS, SHAPES, assert_matches, nf4_weight

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.cpu import dequantize_nf4_into
from loraquilt.kernels.nf4.fused_lora import dequantize_like_kernel, nf4_lora_linear
from loraquilt.kernels.nf4.reference import nf4_linear_reference

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")


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
