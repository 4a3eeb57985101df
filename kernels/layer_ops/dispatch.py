"""The one place that picks how the per-layer operations run: the compiled call where it
takes the tensors (`native.py`), the torch version otherwise (`reference.py`)."""

from __future__ import annotations

import torch

from loraquilt.kernels.layer_ops import native
from loraquilt.kernels.layer_ops.reference import add_rms_norm_reference, rotary_reference


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`add_rms_norm_reference` (residual += delta, then RMSNorm), in one native call where it
    applies.

    residual: [T, hidden] (updated), delta: [T, hidden] or None, weight: [hidden] -> [T, hidden]"""
    if native.supports_add_rms_norm(residual, delta, weight):
        return native.add_rms_norm_native(residual, delta, weight, eps)
    return add_rms_norm_reference(residual, delta, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` of q and k: in place where the native call applies (q and k may
    be column views of one fused projection output), else new tensors.

    q: [T, H, D], k: [T, KVH, D], cos/sin: [T, D] -> (q, k) rotated"""
    if native.supports_rotary(q, k, cos, sin):
        native.rotary_native_(q, k, cos, sin)
        return q, k
    return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
