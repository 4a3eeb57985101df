"""The CPU path of an NF4 projection: dequantize into one scratch buffer reused by every
projection, then a single GEMM. The per-block absmax is kept dequantized (float32) from
load time (`weight.py`) and the weight is dequantized with the project's kernel
(`native.py`) or bitsandbytes' own C kernel: same arithmetic as the reference
(`reference.py`), so the result is bit-identical, at about half the cost per decode step.
"""

from __future__ import annotations

import ctypes
import functools

import bitsandbytes.functional as bnbf
import torch

from loraquilt.kernels.nf4.native import native_kernel
from loraquilt.kernels.nf4.weight import NF4_BLOCKSIZE, DequantScratch, NF4Weight


@functools.cache
def _c_dequantizer(dtype: torch.dtype):
    """bitsandbytes' CPU NF4 dequantize kernel for this output dtype, if the library has it
    (looked up once per dtype: this sits on the path of every projection)."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:  # pragma: no cover - bitsandbytes without its CPU library
        return None
    name = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
            torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
            torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}.get(dtype)
    return getattr(lib, name, None) if name else None


DEQUANTIZERS = ("auto", "native", "bnb")


def dequantize_nf4_into(weight: NF4Weight, out: torch.Tensor, dequantizer: str = "auto") -> torch.Tensor:
    """Semantics: out[o, i] = NF4_CODE[code(o, i)] * absmax[(o*in + i) // 64], rounded to
    out's dtype (round to nearest even) — bitsandbytes' values, bit for bit.

    out: [out, in] contiguous CPU tensor (float32, bfloat16 or float16), overwritten.
    dequantizer: `native` = the project's AVX2/OpenMP kernel (`native.py`), `bnb` =
    bitsandbytes' C kernel, `auto` = native where it is built and the dtype is f32/bf16."""
    if dequantizer not in DEQUANTIZERS:
        raise ValueError(f"unknown dequantizer {dequantizer!r}; choose one of {DEQUANTIZERS}")
    if out.device.type == "cpu" and dequantizer != "bnb" and out.dtype in (torch.float32, torch.bfloat16):
        native = native_kernel()
        if native is not None:
            run = native.dequantize_f32 if out.dtype == torch.float32 else native.dequantize_bf16
            run(weight.packed.data_ptr(), weight.absmax.data_ptr(), out.data_ptr(), weight.numel)
            return out
        if dequantizer == "native":
            raise RuntimeError("the native NF4 kernel is not available (see the warning above)")
    kernel = _c_dequantizer(out.dtype)
    if kernel is None or out.device.type != "cpu":
        out.copy_(bnbf.dequantize_4bit(weight.packed.view(-1, 1), weight.state).to(out.dtype))
        return out
    rows, cols = weight.shape
    kernel(ctypes.c_void_p(weight.packed.data_ptr()), ctypes.c_void_p(weight.absmax.data_ptr()),
           ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(NF4_BLOCKSIZE),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


def nf4_linear_cpu(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
                   scratch: DequantScratch, dequantizer: str = "auto") -> torch.Tensor:
    """Semantics: as `nf4_linear_reference` (dequantize, then one GEMM `x @ W.T`), bit for
    bit.

    x: [T, in] -> [T, out]"""
    dense = dequantize_nf4_into(weight, scratch.view(weight.shape, x.dtype, x.device), dequantizer)  # [out, in]
    if bias is None:
        return torch.mm(x, dense.t())
    return torch.addmm(bias, x, dense.t())
