"""NF4 projections: weights quantized once at load time with bitsandbytes.

Blocksize 64, double quantization. The forward pass is `kernels.nf4.nf4_linear`:
bitsandbytes' own `matmul_4bit` on CUDA; on CPU the same dequantize-then-GEMM arithmetic
(bit-identical) into a scratch buffer the whole model shares, with the per-block absmax
held in float32 (0.56 bytes per parameter instead of 0.52, for half the step time).
"""

from __future__ import annotations

import torch
from torch import nn

from loraquilt.kernels.nf4 import DequantScratch, NF4Weight, nf4_linear


class NF4Linear(nn.Module):
    """y = x @ W.T + b with W held as NF4 (blocksize 64, double quantization)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 scratch: DequantScratch | None = None):
        """weight: [out, in] (any float dtype, any device; quantized on its device)
        bias:   [out] or None, kept in compute_dtype
        scratch: dequantization buffer shared by every projection of one model"""
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear weight must be 2-D, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = NF4Weight.quantize(weight.to(compute_dtype))
        self.on_cpu = weight.device.type == "cpu"
        if self.on_cpu:  # keep the float32 absmax only: the state becomes a plain (non-nested) one
            state = self.weight.state
            state.absmax, state.nested, state.state2, state.offset = self.weight.absmax, False, None, None
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.scratch = scratch or DequantScratch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]"""
        return nf4_linear(x, self.weight, self.bias, self.scratch)

    def dequantized(self) -> torch.Tensor:
        """[out, in] in compute dtype: the exact values the forward multiplies by."""
        from loraquilt.kernels.nf4 import dequantize_nf4_into

        out = torch.empty(self.weight.shape, dtype=self.compute_dtype, device=self.weight.packed.device)
        return dequantize_nf4_into(self.weight, out)

    def quantized_bytes(self) -> int:
        """Bytes held for the weight: packed codes plus the scales in the form kept."""
        weight, state = self.weight, self.weight.state
        total = weight.packed.numel() * weight.packed.element_size()
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += state.state2.code.numel() * state.state2.code.element_size()
        return total + state.code.numel() * state.code.element_size()

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, bias={self.bias is not None}"
