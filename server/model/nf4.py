"""NF4 projections: weights quantized once at load time with bitsandbytes.

Blocksize 64, double quantization (the per-block absmax values are themselves quantized
to 8 bits in blocks of 256): about 0.52 bytes per parameter. The forward pass is
bitsandbytes' own `matmul_4bit`, the same call `bnb.nn.Linear4bit` makes, so a model
loaded here computes exactly what transformers + bitsandbytes compute for the same
weights.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

NF4_BLOCKSIZE = 64


class NF4Linear(nn.Module):
    """y = x @ W.T + b with W held as NF4 (blocksize 64, double quantization)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        """weight: [out, in] (any float dtype, any device; quantized on its device)
        bias:   [out] or None, kept in compute_dtype"""
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear weight must be 2-D, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        packed, quant_state = bnbf.quantize_4bit(
            weight.to(compute_dtype).contiguous(),
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
        self.register_buffer("packed", packed, persistent=False)  # [out*in/2, 1] uint8
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]"""
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.quant_state, bias=self.bias)

    def dequantized(self) -> torch.Tensor:
        """[out, in] in compute dtype: the exact values the forward multiplies by."""
        return bnbf.dequantize_4bit(self.packed, self.quant_state).to(self.compute_dtype)

    def quantized_bytes(self) -> int:
        """Bytes of the packed weight plus its quantization statistics (bias excluded)."""
        state = self.quant_state
        total = self.packed.numel() * self.packed.element_size()
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += state.state2.code.numel() * state.state2.code.element_size()
        total += state.code.numel() * state.code.element_size()
        return total

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, bias={self.bias is not None}"
