"""The CPU NF4 path (scratch dequantization + one GEMM) against bitsandbytes' matmul_4bit."""

import pytest
import torch

from loraquilt.kernels.nf4.cpu import dequantize_nf4_into, nf4_linear_cpu
from loraquilt.kernels.nf4.dispatch import nf4_linear
from loraquilt.kernels.nf4.reference import nf4_linear_reference
from loraquilt.kernels.nf4.weight import DequantScratch, NF4Weight

SHAPES = [(64, 64), (130, 64), (192, 576), (576, 576), (1536, 576), (576, 1536), (96, 2048)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_bit_identical_to_bitsandbytes(dtype, shape, rows):
    gen = torch.Generator().manual_seed(shape[0] + rows)
    weight = NF4Weight.quantize(torch.randn(*shape, generator=gen).to(dtype))
    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    scratch = DequantScratch()
    for b in (None, bias):
        assert torch.equal(nf4_linear_cpu(x, weight, b, scratch), nf4_linear_reference(x, weight, b))


def test_scratch_is_reused_across_shapes_without_leaking_values():
    scratch = DequantScratch()
    big = NF4Weight.quantize(torch.randn(1536, 576))
    small = NF4Weight.quantize(torch.randn(64, 128))
    x_big, x_small = torch.randn(4, 576), torch.randn(4, 128)
    expected_small = nf4_linear_reference(x_small, small, None)
    nf4_linear_cpu(x_big, big, None, scratch)  # grows the buffer
    assert torch.equal(nf4_linear_cpu(x_small, small, None, scratch), expected_small)
    first = scratch.view((64, 128), torch.float32, torch.device("cpu"))
    assert first.data_ptr() == scratch.view((10, 10), torch.float32, torch.device("cpu")).data_ptr()


def test_dequantize_matches_bitsandbytes_and_stays_close_to_the_original():
    import bitsandbytes.functional as bnbf

    original = torch.randn(256, 192)
    weight = NF4Weight.quantize(original)
    dense = dequantize_nf4_into(weight, torch.empty(256, 192))
    assert torch.equal(dense, bnbf.dequantize_4bit(weight.packed.view(-1, 1), weight.state))
    assert (dense - original).abs().mean() < 0.1  # NF4 error on N(0, 1) values


def test_backend_choice():
    weight = NF4Weight.quantize(torch.randn(64, 64))
    x = torch.randn(2, 64)
    scratch = DequantScratch()
    assert torch.equal(nf4_linear(x, weight, None, scratch, "torch"), nf4_linear(x, weight, None, scratch, "reference"))
    with pytest.raises(ValueError, match="unknown NF4 backend"):
        nf4_linear(x, weight, None, scratch, "fast")
