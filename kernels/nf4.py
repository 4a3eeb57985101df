"""NF4 linear layers in bitsandbytes' layout (blocksize 64, NF4 code book).

Reference: `bitsandbytes.matmul_4bit`, which on CPU allocates a fresh dequantized weight
at every call (megabytes of page faults per projection) and dequantizes the nested
absmax every time. CPU fast path: the per-block absmax is kept dequantized (float32)
from load time, and the weight is dequantized with bitsandbytes' own C kernel into one
scratch buffer reused by every projection, then a single GEMM. Same arithmetic, so the
result is bit-identical to the reference, at about half the cost per decode step.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

NF4_BLOCKSIZE = 64


@dataclass(frozen=True)
class NF4Weight:
    """packed: [out*in/2] uint8 (two codes per byte, bitsandbytes order)
    absmax:  [out*in/64] float32 per-block scale (double quantization already undone)
    shape:   (out, in)
    state:   the bitsandbytes QuantState (kept for the CUDA path and for the reference)"""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    state: object

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> NF4Weight:
        """weight: [out, in] float; quantized on its device (blocksize 64, double quant)."""
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE,
                                           compress_statistics=True, quant_type="nf4",
                                           quant_storage=torch.uint8)
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return cls(packed.view(-1), absmax.float().contiguous(), tuple(weight.shape), state)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def concat_rows(cls, parts: list[NF4Weight]) -> NF4Weight:
        """One weight whose rows are the parts' rows in order (q/k/v, gate/up: same `in`).

        Semantics: dequantize(concat_rows(parts)) == cat([dequantize(p) for p in parts], 0),
        bit for bit: each part's 64-value blocks and float32 block scales are kept as they
        are, which needs every part's size to be a multiple of the block (`can_concat`).
        The result's state holds the float32 scales (no double quantization)."""
        if not can_concat(parts):
            raise ValueError("NF4 weights concatenate only with equal in_features and "
                             f"out*in a multiple of {NF4_BLOCKSIZE}: {[p.shape for p in parts]}")
        from bitsandbytes.functional import QuantState

        packed = torch.cat([p.packed for p in parts])  # [sum(out)*in/2]
        absmax = torch.cat([p.absmax for p in parts]).contiguous()  # [sum(out)*in/64]
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        first = parts[0].state
        state = QuantState(absmax=absmax, shape=torch.Size(shape), code=first.code,
                           blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=first.dtype)
        return cls(packed, absmax, shape, state)


def can_concat(parts: list[NF4Weight]) -> bool:
    """Whether `NF4Weight.concat_rows(parts)` keeps every block inside one part."""
    return bool(parts) and all(p.shape[1] == parts[0].shape[1] and p.numel % NF4_BLOCKSIZE == 0
                               for p in parts)


class DequantScratch:
    """One reusable buffer per (device, dtype) for dequantized weights, and named float32
    CPU buffers for the fused kernel (`get`). Not thread-safe: one per model, used by its
    forward only."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._named: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        """A float32 CPU buffer of at least `numel` values, kept under `name`."""
        buffer = self._named.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=torch.float32)
            self._named[name] = buffer
        return buffer

    def view(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        numel = shape[0] * shape[1]
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


def nf4_linear_reference(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Semantics: y = x @ dequantize_nf4(W).T + bias, exactly as bitsandbytes computes it.

    x: [T, in] -> [T, out]"""
    return bnb.matmul_4bit(x, weight.packed.view(-1, 1).t(), quant_state=weight.state, bias=bias)


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
    dequantizer: `native` = the project's AVX2/OpenMP kernel (`kernels/csrc`), `bnb` =
    bitsandbytes' C kernel, `auto` = native where it is built and the dtype is f32/bf16."""
    if dequantizer not in DEQUANTIZERS:
        raise ValueError(f"unknown dequantizer {dequantizer!r}; choose one of {DEQUANTIZERS}")
    if out.device.type == "cpu" and dequantizer != "bnb" and out.dtype in (torch.float32, torch.bfloat16):
        from loraquilt.kernels.nf4_native import native_kernel

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


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
               scratch: DequantScratch, backend: str = "auto") -> torch.Tensor:
    """`auto`: bitsandbytes' own kernels on CUDA, the scratch path on CPU."""
    if backend == "reference" or (backend == "auto" and x.device.type != "cpu"):
        return nf4_linear_reference(x, weight, bias)
    if backend in ("auto", "torch"):
        return nf4_linear_cpu(x, weight, bias, scratch)
    raise ValueError(f"unknown NF4 backend {backend!r}; choose auto, torch or reference")
