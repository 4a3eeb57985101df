"""Ground truth of an NF4 projection: bitsandbytes' own `matmul_4bit` (on CPU it allocates
a fresh dequantized weight at every call and dequantizes the nested absmax every time)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from loraquilt.kernels.nf4.weight import NF4Weight


def nf4_linear_reference(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Semantics: y = x @ dequantize_nf4(W).T + bias, exactly as bitsandbytes computes it.

    x: [T, in] -> [T, out]"""
    return bnb.matmul_4bit(x, weight.packed.view(-1, 1).t(), quant_state=weight.state, bias=bias)
