"""The compiled NF4 dequantize kernel (`nf4_dequant.c`, beside this file): AVX2 over
OpenMP threads, bit-identical to bitsandbytes' values, into float32 or bfloat16.

Built and loaded by `kernels/native_build.py`; `native_kernel()` returns None (after one
warning line on stderr) where it cannot be built, and callers use bitsandbytes' C
dequantize kernel instead.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

from loraquilt.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("nf4_dequant.c")


@dataclass(frozen=True)
class NativeKernel:
    library: ctypes.CDLL
    path: Path
    openmp: bool  # built against the process's OpenMP runtime (else one thread)

    def dequantize_f32(self, packed_ptr: int, absmax_ptr: int, out_ptr: int, numel: int) -> None:
        self.library.nf4_dequantize_f32(packed_ptr, absmax_ptr, out_ptr, numel)

    def dequantize_bf16(self, packed_ptr: int, absmax_ptr: int, out_ptr: int, numel: int) -> None:
        self.library.nf4_dequantize_bf16(packed_ptr, absmax_ptr, out_ptr, numel)




@functools.cache
def native_kernel() -> NativeKernel | None:
    """The compiled kernel, built on first call; None (after one warning line) if it cannot be."""
    argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    built = load_native(SOURCE, "nf4", "using bitsandbytes' NF4 dequantize kernel instead",
                        {"nf4_dequantize_f32": (argtypes, None), "nf4_dequantize_bf16": (argtypes, None)})
    return None if built is None else NativeKernel(*built)
