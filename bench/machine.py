"""A few seconds of micro-benchmarks describing the machine a benchmark ran on.

Memory bandwidth bounds batch-1 decoding (every step streams the weights); fp32 matmul
throughput bounds prefill and large batches. Reporting both next to tokens/s lets results
from different machines be compared.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median_seconds(run: Callable[[], None], repeats: int = 5, inner: int = 1) -> float:
    """Median wall time of ``inner`` calls of ``run`` divided by ``inner``, after one warm-up."""
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            run()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else whatever ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth_gb_s(megabytes: int = 512) -> float:
    """GB/s of copying one large fp32 tensor into another, counting bytes read + written."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / seconds / 1e9


def matmul_gflops(m: int, k: int, n: int, inner: int = 1) -> float:
    """GFLOP/s of an fp32 [m, k] x [k, n] matmul (2 m k n flops)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    out = torch.empty(m, n)
    seconds = _median_seconds(lambda: torch.matmul(a, b, out=out), inner=inner)
    return 2 * m * k * n / seconds / 1e9


def measure_machine(log: Callable[[str], None] = _stderr) -> dict:
    """Memory bandwidth, fp32 matmul throughput and the software/hardware identity.

    Takes about 1-2 s. The copy briefly holds 1 GiB, which raises the process's peak RSS:
    measure peak memory of anything else before calling this, or call it in a child process.
    """
    started = time.perf_counter()
    with torch.inference_mode():
        result = {
            "memory_bandwidth_gb_s": round(copy_bandwidth_gb_s(), 2),
            "fp32_matmul_gflops": round(matmul_gflops(2048, 2048, 2048), 1),
            "fp32_matmul_gflops_decode": round(matmul_gflops(32, 576, 1536, inner=50), 1),
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "torch": torch.__version__,
        }
    log(
        f"machine: {result['memory_bandwidth_gb_s']} GB/s copy, {result['fp32_matmul_gflops']} GFLOP/s "
        f"fp32 matmul ({result['fp32_matmul_gflops_decode']} at decode shape), {result['threads']} threads "
        f"[{time.perf_counter() - started:.1f} s]"
    )
    return result
