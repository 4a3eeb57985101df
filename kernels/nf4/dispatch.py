"""The one place that picks an NF4 projection path.

`nf4_linear`: bitsandbytes' own kernels (the reference) on CUDA, dequantize + GEMM on CPU.

`plan_nf4`: which CPU path runs a step of a given row count: a fixed rule of the
instruction set and the compute dtype, never a timing, so every start of a server on one
machine picks the same plan (and gives the same greedy tokens).

Paths (every one computes y = x @ dequantize_nf4(W).T + b, plus the step's LoRA deltas):
- `fused`: the project's NF4 GEMM with the LoRA delta in the same call
  (`fused_lora.py`): the packed weight read once, decoded in cache, no scratch
  weight written, one call per projection group.
- `dequant_native`: the project's dequantize kernel into a scratch buffer, then one
  oneDNN GEMM in the compute dtype (bit-identical to bitsandbytes in float32), and the
  LoRA deltas by `kernels.lora.lora_add_`. Taken for long prefills where the GEMM library's
  blocking (AMX tiles for bf16 on CPUs with them) beats the fused kernel's.
- `dequant_bnb`: the same with bitsandbytes' C dequantize kernel, where the native kernels
  could not be built.

The rules, from one projection call timed per row count (Intel Xeon with AMX, 2026-12, one
thread; SmolLM2's shapes and a 1B model's 5632x2048): float32: the fused kernel is 1.2-3.6x
faster than dequantize + GEMM up to 64 rows and about even at 160. bf16 on a CPU with AMX
tiles: the fused kernel on tiles is 2.3-3x faster than dequantize + oneDNN's AMX GEMM at
24-64 rows and still faster at 160. Beyond FUSED_MAX_ROWS (a long prefill in one step)
dequantize + GEMM. On AVX512-BF16 CPUs without AMX (AMD Zen 4/5) the fused kernel uses
`vdpbf16ps` (not measured on this project's machines yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraquilt.kernels.nf4 import fused_lora
from loraquilt.kernels.nf4.cpu import nf4_linear_cpu
from loraquilt.kernels.nf4.native import native_kernel
from loraquilt.kernels.nf4.reference import nf4_linear_reference
from loraquilt.kernels.nf4.weight import DequantScratch, NF4Weight

PATHS = ("fused", "dequant_native", "dequant_bnb")
# steps with more rows than this (long prefills) go to dequantize + oneDNN
FUSED_MAX_ROWS = 160


@dataclass(frozen=True)
class NF4Plan:
    """fused_max_rows: steps of at most this many rows take `fused`, longer ones `fallback`.
    isa: the fused kernel's instruction set; reason: why, in words (logged at start)."""

    fused_max_rows: int
    fallback: str
    isa: str
    reason: str

    def path_for(self, rows: int) -> str:
        return "fused" if 0 < self.fused_max_rows and rows <= self.fused_max_rows else self.fallback

    def describe(self) -> str:
        if self.fused_max_rows <= 0:
            return f"{self.fallback} ({self.reason})"
        return (f"fused NF4+LoRA kernel ({self.isa}) for steps of <= {self.fused_max_rows} rows, "
                f"else {self.fallback} ({self.reason})")


def plan_nf4(dtype: torch.dtype, flags: frozenset[str] | None = None, fused_available: bool | None = None,
             why_not_fused: str = "the fused kernel is not built here") -> NF4Plan:
    """The plan for a compute dtype on a CPU with these flags (default: this machine's, and
    `$LORAQUILT_NF4_ISA` when set)."""
    fallback = "dequant_native" if native_kernel() is not None and dtype in (torch.float32, torch.bfloat16) \
        else "dequant_bnb"
    if fused_available is None:
        fused_available = fused_lora.available()
    if not fused_available or dtype not in fused_lora.DTYPES:
        why = why_not_fused if not fused_available else f"no fused kernel for {dtype}"
        return NF4Plan(0, fallback, "", why)
    isa = fused_lora.active_isa() if flags is None else fused_lora.isa_for_flags(flags)
    if dtype == torch.float32 and isa in ("avx512_bf16", "amx"):
        isa = "avx512"  # float32 multiplies with FMAs whatever bf16 units the CPU has
    return NF4Plan(FUSED_MAX_ROWS, fallback, isa, f"{str(dtype).removeprefix('torch.')} on {isa}")


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
               scratch: DequantScratch, backend: str = "auto") -> torch.Tensor:
    """`auto`: bitsandbytes' own kernels on CUDA, the scratch path on CPU."""
    if backend == "reference" or (backend == "auto" and x.device.type != "cpu"):
        return nf4_linear_reference(x, weight, bias)
    if backend in ("auto", "torch"):
        return nf4_linear_cpu(x, weight, bias, scratch)
    raise ValueError(f"unknown NF4 backend {backend!r}; choose auto, torch or reference")
