"""The per-layer operations around the projections: residual add + RMSNorm, and rotary
embedding of q and k in place. On CPU each is one call of the compiled
`kernels/csrc/layer_ops.c` (a chain of 7-12 small torch ops otherwise: at decode sizes the
ops' fixed costs, not their arithmetic, are what a step pays); the torch versions here are
both the reference and the path elsewhere (CUDA, float16, no compiler).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "layer_ops.c"
DTYPES = (torch.float32, torch.bfloat16)


def _warn(message: str) -> None:
    print(f"loraquilt: warning: {message}; using torch for RMSNorm and rotary", file=sys.stderr, flush=True)


@functools.cache
def _library() -> ctypes.CDLL | None:
    from loraquilt.kernels.nf4_native import build_native_library

    built = build_native_library(SOURCE, "layer_ops", _warn)
    if built is None:
        return None
    library = built[0]
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.layer_add_rms_norm.argtypes = [i64, p, p, p, p, i64, i64, ctypes.c_float]
    library.layer_add_rms_norm.restype = None
    library.layer_rotary.argtypes = [i64, p, i64, i64, p, i64, i64, p, p, i64, i64]
    library.layer_rotary.restype = None
    return library


def available() -> bool:
    return _library() is not None


def _native(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in DTYPES and all(t.dtype == first.dtype for t in tensors)
            and available())


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


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`add_rms_norm_reference` in one native call where it applies."""
    tensors = (residual, weight) if delta is None else (residual, weight, delta)
    if not (_native(*tensors) and all(t.is_contiguous() for t in tensors)):
        return add_rms_norm_reference(residual, delta, weight, eps)
    rows, hidden = residual.shape
    out = torch.empty_like(residual)
    _library().layer_add_rms_norm(int(residual.dtype == torch.bfloat16), residual.data_ptr(),
                                  None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                  rows, hidden, eps)
    return out


# -- rotary embedding ---------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Semantics: x * cos + rotate_half(x) * sin, per head (a new tensor).

    x: [T, heads, D]; cos, sin: [T, D]"""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _rows_of_heads(x: torch.Tensor) -> bool:
    """x: [T, heads, D] whose heads lie side by side in rows of stride(0) values."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` of q and k: in place where the native call applies (q and k may
    be column views of one fused projection output), else new tensors.

    q: [T, H, D], k: [T, KVH, D], cos/sin: [T, D] -> (q, k) rotated"""
    if not (_native(q, k, cos, sin) and _rows_of_heads(q) and _rows_of_heads(k) and cos.is_contiguous()
            and sin.is_contiguous() and q.shape[2] % 2 == 0):
        return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    _library().layer_rotary(int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(),
                            k.stride(0), k.shape[1], cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[2])
    return q, k
