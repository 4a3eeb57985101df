"""bitsandbytes' CUDA NF4 path through loraquilt: `nf4_linear` (backend auto on CUDA: bnb
`matmul_4bit`, whose fused kernels or dequantize + F.linear bnb picks by shape) against an
explicit dequantize + matmul, and `NF4Linear` on CUDA.

Criterion: the truth is x @ W_dq.T + b in float64 on the same rounded operands (x, bias and
the dequantized weight W_dq in the compute dtype); the largest error must stay below a
dtype-keyed fraction of the output's RMS (the output of N(0, 1) inputs grows as sqrt(in),
so an absolute tolerance would not fit every shape). A wrong layout or scale is off by
about the RMS itself.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from _gpu import DEVICE, GPU
from loraquilt.kernels.nf4.dispatch import nf4_linear
from loraquilt.kernels.nf4.reference import nf4_linear_reference
from loraquilt.kernels.nf4.weight import DequantScratch, NF4Weight
from loraquilt.server.model.nf4 import NF4Linear

pytestmark = GPU

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# max |error| / RMS(output): output rounding (< 1 ulp at ~5 RMS) plus kernels that round
# the dequantized weight or the partial sums differently from dequantize + F.linear
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
SHAPES = [(64, 64), (576, 576), (1536, 576), (576, 1536), (96, 2048), (2048, 2048)]  # (out, in)
# bnb's CUDA dispatch: fused kernels for small M (always <= 4; < 8 in fp32; a per-arch
# heuristic for bf16/fp16 up to 1536), dequantize + F.linear past 1536 rows
ROWS = [1, 3, 7, 33, 300, 2000]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _assert_matches_truth(actual, x, dense, bias, dtype):
    truth = x.double() @ dense.double().t()  # [T, out]
    if bias is not None:
        truth = truth + bias.double()
    assert actual.shape == truth.shape and actual.dtype == dtype and actual.device == truth.device
    assert torch.isfinite(actual).all()
    rms = truth.pow(2).mean().sqrt().item()
    err = (actual.double() - truth).abs().max().item()
    assert err <= REL_TOL[dtype] * rms, f"max error {err:.3g} > {REL_TOL[dtype]} x RMS {rms:.3g}"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_nf4_linear_auto_matches_dequantize_matmul(dtype, shape, rows):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1] + rows)
    weight = NF4Weight.quantize(torch.randn(*shape, generator=gen).to(dtype).to(DEVICE))
    assert weight.packed.device.type == DEVICE
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=gen).to(dtype).to(DEVICE)
    dense = bnbf.dequantize_4bit(weight.packed.view(-1, 1), weight.state).to(dtype)  # [out, in]
    scratch = DequantScratch()
    for b in (None, bias):
        _assert_matches_truth(nf4_linear(x, weight, b, scratch), x, dense, b, dtype)
        _assert_matches_truth(nf4_linear_reference(x, weight, b), x, dense, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_nf4linear_on_cuda(dtype):
    """The engine's projection module, built from a weight on the device."""
    gen = torch.Generator().manual_seed(5)
    original = torch.randn(1536, 576, generator=gen)
    layer = NF4Linear(original.to(DEVICE), torch.randn(1536, generator=gen).to(DEVICE), dtype)
    assert layer.weight.packed.device.type == DEVICE and layer.bias.dtype == dtype
    dense = layer.dequantized()  # [out, in], the values the forward multiplies by
    assert dense.device.type == DEVICE and dense.dtype == dtype
    assert (dense.float().cpu() - original).abs().mean() < 0.1  # NF4 error on N(0, 1) values
    # 4 bits per weight plus the scales (double quantization: ~0.13 bits more)
    assert layer.quantized_bytes() < 0.6 * layer.num_params
    for rows in (1, 7, 300):
        x = torch.randn(rows, 576, generator=gen).to(dtype).to(DEVICE)
        _assert_matches_truth(layer(x), x, dense, layer.bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_fused_nf4linear_on_cuda(dtype):
    """q/k/v fused row-wise, as the loader does: the concatenated weight (plain float32
    scales, no double quantization: another bitsandbytes path) dequantizes to the parts'
    values bit for bit, and its forward matches them."""
    gen = torch.Generator().manual_seed(13)
    parts = [NF4Linear(torch.randn(out, 576, generator=gen).to(DEVICE),
                       torch.randn(out, generator=gen).to(DEVICE), dtype)
             for out in (576, 192, 192)]
    fused = NF4Linear.fuse(parts)
    assert fused is not None and fused.weight.packed.device.type == DEVICE
    dense = fused.dequantized()  # [960, 576]
    assert torch.equal(dense, torch.cat([part.dequantized() for part in parts]))
    for rows in (1, 7, 300):
        x = torch.randn(rows, 576, generator=gen).to(dtype).to(DEVICE)
        _assert_matches_truth(fused(x), x, dense, fused.bias, dtype)


def test_nf4linear_quantizes_like_bnb_linear4bit():
    """Same codes and scales as transformers' 4-bit layer (bnb Linear4bit, NF4, double
    quantization, float32 compute) quantizing the same weight on the device, and the same
    forward: the engine and the transformers + PEFT peer share one quantized base."""
    gen = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(576, 1536, generator=gen), torch.randn(576, generator=gen)
    layer = NF4Linear(weight.to(DEVICE), bias.to(DEVICE), torch.float32)

    peer = bnb.nn.Linear4bit(1536, 576, bias=True, compute_dtype=torch.float32,
                             compress_statistics=True, quant_type="nf4")
    peer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64,
                                    compress_statistics=True, quant_type="nf4")
    peer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    peer = peer.to(DEVICE).eval()  # quantizes here
    peer.support_avx512bf16_for_cpu = False  # (CPU dry run only) keep the fp32 path

    state = peer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(peer.weight.data.view(-1), layer.weight.packed.view(-1))
    assert torch.equal(absmax.float(), layer.weight.absmax)

    x = torch.randn(33, 1536, generator=gen).to(DEVICE)
    with torch.no_grad():
        expected = peer(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
