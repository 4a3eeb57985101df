"""Which compute dtype the model runs in, chosen at run time from what the hardware does well.

`auto` = bfloat16 on CUDA and on CPUs with native bf16 dot products (AVX512-BF16 or AMX),
float32 elsewhere: on a CPU without them a bf16 GEMM is emulated and runs several times
slower than fp32 (measured 3-5x on one such machine), while with them it runs ~4x faster.
float32 is the exact path (what the equivalence tests against transformers + PEFT pin).

The commands take `--dtype` with the environment variable `LORAQUILT_DTYPE` as default
(the flag is DeviceConfig.dtype's, server/model/device.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraquilt.kernels.host import cpu_flags

if TYPE_CHECKING:  # torch is imported only when a dtype is resolved (CLI parsing stays light)
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ENV = "LORAQUILT_DTYPE"
# CPU flags (as /proc/cpuinfo names them) that give native bf16 dot products
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """Which of NATIVE_BF16_FLAGS this CPU has."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def resolve_compute_dtype(spec: str, device: "torch.device",
                          flags: frozenset[str] | None = None) -> "tuple[torch.dtype, str]":
    """(dtype, why) for a dtype spec on a device.

    spec:  auto, float32, bfloat16 or float16
    flags: CPU flags to decide from (default: this machine's)"""
    import torch

    if spec not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {spec!r}")
    if spec != "auto":
        return getattr(torch, spec), f"--dtype {spec} asked for"
    if device.type == "cuda":
        return torch.bfloat16, "auto: bfloat16 on CUDA"
    found = native_bf16_flags(flags)
    if found:
        return torch.bfloat16, f"auto: the CPU has native bf16 dot products ({', '.join(found)})"
    return torch.float32, ("auto: the CPU has no native bf16 dot products (no avx512_bf16 or "
                           "amx_bf16), so bf16 would be emulated and slower than float32")


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")
