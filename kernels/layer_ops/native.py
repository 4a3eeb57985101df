"""The compiled CPU per-layer operations (`layer_ops.c`, beside this file): residual add +
RMSNorm, and rotary embedding of q and k in place, each one call (a chain of 7-12 small
torch ops otherwise: at decode sizes the ops' fixed costs, not their arithmetic, are what
a step pays).

Built and loaded by `kernels/native_build.py`; `available()` is False (after one warning
line) where it cannot be built, and callers use the torch versions (`reference.py`).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from loraquilt.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("layer_ops.c")
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    built = load_native(SOURCE, "layer_ops", "using torch for RMSNorm and rotary", {
        "layer_add_rms_norm": ([i64, p, p, p, p, i64, i64, ctypes.c_float], None),
        "layer_rotary": ([i64, p, i64, i64, p, i64, i64, p, p, i64, i64], None),
    })
    return None if built is None else built[0]


def available() -> bool:
    return _library() is not None


def _cpu_same_dtype(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in DTYPES and all(t.dtype == first.dtype for t in tensors)
            and available())


def _rows_of_heads(x: torch.Tensor) -> bool:
    """x: [T, heads, D] whose heads lie side by side in rows of stride(0) values."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def supports_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether `add_rms_norm_native` takes these: contiguous CPU tensors of one dtype of DTYPES."""
    tensors = (residual, weight) if delta is None else (residual, weight, delta)
    return _cpu_same_dtype(*tensors) and all(t.is_contiguous() for t in tensors)


def add_rms_norm_native(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """Semantics: `reference.add_rms_norm_reference` (residual updated in place).

    residual: [T, hidden] (updated), delta: [T, hidden] or None, weight: [hidden] -> [T, hidden]
    (see `supports_add_rms_norm`)"""
    rows, hidden = residual.shape
    out = torch.empty_like(residual)  # [T, hidden]
    _library().layer_add_rms_norm(int(residual.dtype == torch.bfloat16), residual.data_ptr(),
                                  None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                  rows, hidden, eps)
    return out


def supports_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rotary_native_` takes these: CPU tensors of one dtype of DTYPES, each of q and
    k rows of side-by-side heads (column views of one fused output do), contiguous cos and
    sin, an even head size."""
    return (_cpu_same_dtype(q, k, cos, sin) and _rows_of_heads(q) and _rows_of_heads(k) and cos.is_contiguous()
            and sin.is_contiguous() and q.shape[2] % 2 == 0)


def rotary_native_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Semantics: q, k = `reference.rotary_reference` of each, written in place.

    q: [T, H, D], k: [T, KVH, D], cos/sin: [T, D] (see `supports_rotary`)"""
    _library().layer_rotary(int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(),
                            k.stride(0), k.shape[1], cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[2])
