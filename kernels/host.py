"""What this machine is, read without torch: CPU feature flags, CPU model name, and the
per-user cache folder (compiled kernels, the embedded model, bench adapters).

At the bottom of the package (`kernels/` imports nothing above it), so the kernel builder,
the model loader, the benchmarks and the CLI all read the same facts. Torch-free on
purpose: the CLI consults it while parsing arguments, and the kernel builder before it
decides what to build (`loraquilt.kernels` itself imports nothing at package level)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CACHE_ENV = "LORAQUILT_CACHE"


def cache_root() -> Path:
    """``$LORAQUILT_CACHE`` if set, else ``~/.cache/loraquilt``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraquilt"


def _cpuinfo_field(name: str, cpuinfo: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (Linux); None where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them; empty where they cannot be read."""
    return frozenset((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU model name, else whatever ``platform`` knows."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()
