"""`loraquilt bench kernels`: LoRA delta cost per backend against the base Linear it rides on.

One run, one process: every case times its LoRA delta and a plain fp32 Linear on the same
rows in alternating blocks, so each ratio `median_us / base_linear_us` compares figures
taken under the same machine load. The end-to-end cost inside the model (cache misses
between projections included) is what `loraquilt bench serve` measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from loraquilt.kernels.lora.cpu import STRATEGIES, lora_add_cpu_
from loraquilt.kernels.lora.dispatch import lora_add_
from loraquilt.kernels.lora.segments import build_lora_meta


@dataclass(frozen=True)
class KernelBenchConfig:
    rows: int = 32
    features: int = 2048
    rank: int = 16
    num_slots: int = 32
    iters: int = 200
    reference_iters: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rows, self.features, self.rank, self.num_slots, self.iters) < 1:
            raise ValueError("rows, features, rank, num_slots and iters must be >= 1")


# (name, distinct adapters, pairs per row)
CASES = (
    ("one_adapter", 1, 1),
    ("four_adapters", 4, 1),
    ("distinct_adapters", 32, 1),
    ("composition_2", 32, 2),
)


def _slots_for(num_adapters: int, pairs_per_row: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row t uses adapters (t + k) % num_adapters for k < pairs_per_row, equal weights.

    Rows are interleaved (row t and t+1 differ), the order a scheduler sees before it
    groups anything."""
    t = torch.arange(rows).unsqueeze(1)  # [T, 1]
    k = torch.arange(pairs_per_row).unsqueeze(0)  # [1, K]
    slots = (t + k) % num_adapters  # [T, K]
    weights = torch.full(slots.shape, 1.0 / pairs_per_row)  # [T, K]
    return slots, weights


def _time_pair(first, second, iters: int, block: int = 10) -> tuple[float, float]:
    """Median microseconds per call of two callables, timed in alternating blocks.

    Each block runs `block` calls of one callable back to back, so a kernel is timed with
    its own operands in cache (a microbenchmark of the kernel, not of the cache misses of
    whatever ran before it); alternating the blocks exposes both to the same machine load.
    """
    for _ in range(3):
        first(), second()
    a_times, b_times = [], []
    for _ in range(max(1, iters // block)):
        for fn, times in ((first, a_times), (second, b_times)):
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(a_times) * 1e6, statistics.median(b_times) * 1e6


def run_kernel_bench(config: KernelBenchConfig, log=print) -> dict:
    torch.manual_seed(config.seed)
    dtype = torch.float32
    features, rank = config.features, config.rank
    x = torch.randn(config.rows, features, dtype=dtype)  # [T, in]
    lora_a = torch.randn(config.num_slots, rank, features, dtype=dtype) * 0.02  # [S, R, in]
    lora_b = torch.randn(config.num_slots, features, rank, dtype=dtype) * 0.02  # [S, out, R]
    base = torch.nn.Linear(features, features, bias=False, dtype=dtype)
    y = torch.empty(config.rows, features, dtype=dtype)  # [T, out]

    def base_linear():
        torch.nn.functional.linear(x, base.weight, out=y)

    cases, strategies = [], []
    with torch.inference_mode():
        for name, num_adapters, pairs_per_row in CASES:
            slots, weights = _slots_for(num_adapters, pairs_per_row, config.rows)
            meta = build_lora_meta(slots, weights, num_slots=config.num_slots)
            for backend, iters in (("torch", config.iters), ("reference", config.reference_iters)):
                base_us, lora_us = _time_pair(
                    base_linear, lambda: lora_add_(y, x, lora_a, lora_b, meta, backend), iters
                )
                cases.append({
                    "name": name, "backend": backend, "num_adapters": num_adapters,
                    "pairs_per_row": pairs_per_row, "median_us": round(lora_us, 2),
                    "base_linear_us": round(base_us, 2),
                })
                log(f"{name:<18} {backend:<9} {lora_us:10.1f} us  base {base_us:8.1f} us  "
                    f"ratio {lora_us / base_us:.3f}")
            for strategy in STRATEGIES:
                base_us, lora_us = _time_pair(
                    base_linear,
                    lambda: lora_add_cpu_(y, x, lora_a, lora_b, meta, strategy=strategy),
                    config.iters,
                )
                strategies.append({
                    "name": name, "strategy": strategy, "median_us": round(lora_us, 2),
                    "base_linear_us": round(base_us, 2),
                })
            meta_us = statistics.median(
                _timed(lambda: build_lora_meta(slots, weights, num_slots=config.num_slots))
                for _ in range(50)
            ) * 1e6
            strategies.append({"name": name, "strategy": "build_lora_meta", "median_us": round(meta_us, 2)})
    return {
        "cases": cases,
        "torch_strategies": strategies,
        "config": {"rows": config.rows, "in_features": features, "out_features": features,
                   "rank": rank, "num_slots": config.num_slots, "dtype": "float32",
                   "iters": config.iters, "reference_iters": config.reference_iters},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--iters", type=int, default=KernelBenchConfig.iters)
    parser.add_argument("--seed", type=int, default=KernelBenchConfig.seed)
    parser.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    config = KernelBenchConfig(iters=args.iters, seed=args.seed)
    results = run_kernel_bench(config, log=lambda line: print(line, file=sys.stderr))
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    else:
        print(text)
    return 0
