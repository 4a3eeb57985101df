"""A few seconds of micro-benchmarks describing the machine a benchmark ran on.

Memory bandwidth bounds batch-1 decoding (every step streams the weights); matmul
throughput (fp32 and bf16, the two compute dtypes of `--dtype`) bounds prefill and large
batches. Reporting them next to tokens/s lets results from different machines be compared.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from loraquilt.host import cpu_model


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median_seconds(run: Callable[[], None], repeats: int = 5, inner: int = 1,
                    budget_s: float = 3.0) -> float:
    """Median wall time of ``inner`` calls of ``run`` divided by ``inner``, after one warm-up;
    stops after ``budget_s`` seconds of samples (at least one), so a slow case (bf16 on a CPU
    without native bf16 can be 20x slower than fp32) stays a few seconds."""
    run()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats and (not samples or spent < budget_s):
        started = time.perf_counter()
        for _ in range(inner):
            run()
        elapsed = time.perf_counter() - started
        spent += elapsed
        samples.append(elapsed / inner)
    return statistics.median(samples)


def copy_bandwidth_gb_s(megabytes: int = 512, budget_s: float = 3.0) -> float:
    """GB/s of copying one large fp32 tensor into another, counting bytes read + written."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source), budget_s=budget_s)
    return 2 * source.numel() * 4 / seconds / 1e9


def matmul_gflops(m: int, k: int, n: int, inner: int = 1, dtype: torch.dtype = torch.float32,
                  budget_s: float = 3.0) -> float:
    """GFLOP/s of ``x[m, k] @ w[n, k].T`` (2 m k n flops) in ``dtype``: the layout of a
    Linear layer's weight, which is what every projection and the lm_head multiply by (in
    bf16 on a CPU without native bf16, the [k, n]-contiguous layout runs ~20x slower)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(x, w.t(), out=out), inner=inner, budget_s=budget_s)
    return 2 * m * k * n / seconds / 1e9


def gemm_mix_gflops(rows: int, shapes: list[tuple[int, int, int]], dtype: torch.dtype = torch.float32,
                    budget_s: float = 1.0) -> tuple[float, dict[str, float]]:
    """The GEMM rate of a forward made of these weights at ``rows`` rows: every (out, in,
    count) timed as ``x[rows, in] @ w[out, in].T``, the rate = sum of count x flops over sum
    of count x seconds. Returns it and the rate per shape (``"32x2048->5632"``). Two passes
    over the shapes, the faster kept per shape: a moment of other work on the machine slows
    one pass (a single slow shape would drag the whole mix down)."""
    best = [0.0] * len(shapes)
    for _ in range(2):
        for index, (out, in_, _count) in enumerate(shapes):
            rate = matmul_gflops(rows, in_, out, inner=_inner_calls(rows, in_, out), dtype=dtype,
                                 budget_s=budget_s / 2)
            best[index] = max(best[index], rate)
    flops = seconds = 0.0
    per_shape: dict[str, float] = {}
    for (out, in_, count), rate in zip(shapes, best):
        per_shape[f"{rows}x{in_}->{out}"] = round(rate, 1)
        flops += count * 2 * rows * in_ * out
        seconds += count * 2 * rows * in_ * out / (rate * 1e9)
    return flops / seconds / 1e9, per_shape


def _inner_calls(m: int, k: int, n: int) -> int:
    """Calls per sample, so that a sample lasts ~10 ms at 100 GFLOP/s (small GEMMs are
    otherwise timed below the clock's resolution)."""
    return max(1, round(1e9 / (2 * m * k * n)))


def measure_model_gemm(shapes: list[tuple[int, int, int]], rows: int, log: Callable[[str], None] = _stderr,
                       quick: bool = False) -> dict:
    """fp32 and bf16 GEMM rates at a model's weight shapes (``FlopModel.token_gemms``) and
    ``rows`` rows (the decode batch): the rates its compute-bound fractions are taken
    against. ~1 s per shape and dtype (quick: ~0.3 s)."""
    started = time.perf_counter()
    budget = 0.3 if quick else 1.0
    result: dict = {"rows": rows, "shapes": [list(shape) for shape in shapes], "shape_fields": "out, in, count"}
    with torch.inference_mode():
        for prefix, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate, per_shape = gemm_mix_gflops(rows, shapes, dtype, budget)
            result[f"{prefix}_gflops"] = round(rate, 1)
            result[f"{prefix}_gflops_per_shape"] = per_shape
    log(f"model GEMMs at {rows} rows: {result['fp32_gflops']} GFLOP/s fp32, {result['bf16_gflops']} bf16 "
        f"[{time.perf_counter() - started:.1f} s]")
    return result


def measure_model_gemm_apart(shapes: list[tuple[int, int, int]], rows: int, quick: bool) -> dict:
    """`measure_model_gemm` in a child process (its weights would raise the peak RSS of a
    process that reports one)."""
    code = ("import json; from loraquilt.bench.machine import measure_model_gemm; "
            "from loraquilt.bench.serve import _progress; "
            f"print(json.dumps(measure_model_gemm({shapes!r}, {rows}, log=_progress, quick={quick})))")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_machine(log: Callable[[str], None] = _stderr, quick: bool = False) -> dict:
    """Memory bandwidth, fp32 and bf16 matmul throughput (at 2048^3 and at the decode shape
    32 x 576 -> 1536) and the software/hardware identity.

    Takes about 2-10 s; quick (a smoke run): a 128 MiB copy and at most ~0.5 s of samples
    per case. The copy briefly holds 1 GiB, which raises the process's peak RSS:
    measure peak memory of anything else before calling this, or call it in a child process.
    """
    started = time.perf_counter()
    budget = 0.5 if quick else 3.0
    bf16 = torch.bfloat16
    with torch.inference_mode():
        result = {
            "memory_bandwidth_gb_s": round(copy_bandwidth_gb_s(128 if quick else 512, budget), 2),
            "fp32_matmul_gflops": round(matmul_gflops(2048, 2048, 2048, budget_s=budget), 1),
            "fp32_matmul_gflops_decode": round(matmul_gflops(32, 576, 1536, inner=50, budget_s=budget), 1),
            "bf16_matmul_gflops": round(matmul_gflops(2048, 2048, 2048, dtype=bf16, budget_s=budget), 1),
            "bf16_matmul_gflops_decode": round(matmul_gflops(32, 576, 1536, inner=50, dtype=bf16, budget_s=budget), 1),
            "matmul_layout": "x[m, k] @ w[n, k].T (a Linear weight)",
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "torch": torch.__version__,
        }
    log(
        f"machine: {result['memory_bandwidth_gb_s']} GB/s copy, {result['fp32_matmul_gflops']} GFLOP/s "
        f"fp32 matmul ({result['fp32_matmul_gflops_decode']} at decode shape), {result['bf16_matmul_gflops']} "
        f"bf16 ({result['bf16_matmul_gflops_decode']}), {result['threads']} threads "
        f"[{time.perf_counter() - started:.1f} s]"
    )
    return result
