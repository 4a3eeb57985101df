"""The per-layer operations around the projections, in torch: residual add + RMSNorm, and
rotary embedding. The semantics and ground truth of the native versions (`native.py`),
and the path wherever those do not apply (CUDA, float16, no compiler)."""

from __future__ import annotations

import torch


# -- residual add + RMSNorm ---------------------------------------------------------------

def add_rms_norm_reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """Semantics (transformers' LlamaRMSNorm after the residual add), residual updated in place:
        residual += delta
        out = weight * (float(residual) * rsqrt(mean(float(residual)^2) + eps)).to(dtype)

    residual: [T, hidden] (updated), delta: [T, hidden] or None, weight: [hidden] -> [T, hidden]"""
    if delta is not None:
        residual.add_(delta)
    x32 = residual.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(residual.dtype)


# -- rotary embedding ---------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Semantics: x * cos + rotate_half(x) * sin, per head (a new tensor).

    x: [T, heads, D]; cos, sin: [T, D]"""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
