"""Which NF4 projection path runs each weight shape on this CPU, measured at load time.

Paths (every one computes y = x @ dequantize_nf4(W).T + b):
- `dequant_native`: the project's AVX2/OpenMP dequantize kernel into the shared scratch
  buffer, then one oneDNN GEMM in the compute dtype (bit-identical to bitsandbytes).
- `dequant_bnb`: the same with bitsandbytes' C dequantize kernel (bit-identical too).
- `bnb_fused`: bitsandbytes' fused NF4 GEMM for AVX512-BF16 CPUs (what `Linear4bit`
  uses in eval mode there). bf16 only; it rounds the block scales to bf16, so it is a
  candidate only when the model computes in bf16 and the CPU has avx512_bf16. It needs
  its own repacked copy of the weight (+0.5 bytes per parameter where it is chosen).

Each distinct (out, in) shape is timed for decode steps (DECODE_ROWS rows) and prefill
steps (PREFILL_ROWS rows); a projection then takes the faster path for its row count.
In float32 both candidates are bit-identical, so the choice never changes results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from loraquilt.kernels.nf4 import DequantScratch, NF4Weight, nf4_linear_cpu

DECODE_ROWS = 32  # steps with at most this many rows use the decode choice
PREFILL_ROWS = 256
PATHS = ("dequant_native", "dequant_bnb", "bnb_fused")


@dataclass(frozen=True)
class NF4PathChoice:
    """decode / prefill: the path for steps with <= DECODE_ROWS rows / more rows.
    timings_us: {"decode" | "prefill": {path: µs per call}} as measured."""

    decode: str = "dequant_native"
    prefill: str = "dequant_native"
    timings_us: dict = field(default_factory=dict, compare=False)

    def path_for(self, rows: int) -> str:
        return self.decode if rows <= DECODE_ROWS else self.prefill

    @property
    def paths(self) -> set[str]:
        return {self.decode, self.prefill}


class BnbFusedWeight:
    """A weight repacked for bitsandbytes' fused AVX512-BF16 NF4 kernel."""

    def __init__(self, weight: NF4Weight):
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState(absmax=weight.absmax.clone(), shape=torch.Size(weight.shape),
                                code=weight.state.code, blocksize=weight.state.blocksize,
                                quant_type="nf4", dtype=torch.bfloat16)
        self.packed, self.state = bnbf._convert_weight_packed_for_cpu(weight.packed.clone(), state)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [T, in] bf16 -> [T, out] bf16"""
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.packed, quant_state=self.state, bias=bias)


def bnb_fused_available(dtype: torch.dtype) -> bool:
    """bitsandbytes registers its fused CPU kernel only on CPUs with AVX512-BF16."""
    if dtype != torch.bfloat16:
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - an older bitsandbytes without it
        return False


def candidate_paths(dtype: torch.dtype) -> list[str]:
    from loraquilt.kernels.nf4_native import native_kernel

    paths = ["dequant_bnb"]
    if dtype in (torch.float32, torch.bfloat16) and native_kernel() is not None:
        paths.insert(0, "dequant_native")
    if bnb_fused_available(dtype):
        paths.append("bnb_fused")
    return paths


def run_path(path: str, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
             scratch: DequantScratch, fused: BnbFusedWeight | None = None) -> torch.Tensor:
    """x: [T, in] -> [T, out] by the named path."""
    if path == "bnb_fused":
        if fused is None:
            raise ValueError("bnb_fused needs the weight repacked (BnbFusedWeight)")
        return fused.linear(x, bias)
    dequantizer = {"dequant_native": "native", "dequant_bnb": "bnb"}.get(path)
    if dequantizer is None:
        raise ValueError(f"unknown NF4 path {path!r}; choose one of {PATHS}")
    return nf4_linear_cpu(x, weight, bias, scratch, dequantizer)


def _median_us(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call costs, caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e6)
    return sorted(samples)[len(samples) // 2]


def plan_nf4_paths(shapes: Iterable[tuple[int, int]], dtype: torch.dtype, *, repeats: int = 5,
                   seed: int = 0) -> dict[tuple[int, int], NF4PathChoice]:
    """Time every candidate path on a random NF4 weight of each (out, in) shape, for decode
    and prefill row counts, and keep the fastest of each. A candidate that fails, or whose
    result is off by more than the dtype's rounding, is dropped."""
    generator = torch.Generator().manual_seed(seed)
    paths = candidate_paths(dtype)
    scratch = DequantScratch()
    plans: dict[tuple[int, int], NF4PathChoice] = {}
    for shape in dict.fromkeys(shapes):
        weight = NF4Weight.quantize((torch.randn(*shape, generator=generator) * 0.02).to(dtype))
        fused = repack_for_bnb_fused(weight) if "bnb_fused" in paths else None
        timings: dict[str, dict[str, float]] = {}
        for kind, rows in (("decode", DECODE_ROWS), ("prefill", PREFILL_ROWS)):
            x = torch.randn(rows, shape[1], generator=generator).to(dtype)
            expected = run_path(paths[0], x, weight, None, scratch).float()
            timings[kind] = {}
            for path in paths:
                try:
                    got = run_path(path, x, weight, None, scratch, fused).float()
                except Exception:  # noqa: BLE001 - e.g. a kernel this bitsandbytes lacks
                    continue
                if not _close(got, expected, dtype):
                    continue
                timings[kind][path] = _median_us(lambda: run_path(path, x, weight, None, scratch, fused),
                                                 repeats)
        pick = {kind: min(times, key=times.get) for kind, times in timings.items()}
        plans[shape] = NF4PathChoice(pick["decode"], pick["prefill"], timings)
    return plans


def repack_for_bnb_fused(weight: NF4Weight) -> BnbFusedWeight | None:
    try:
        return BnbFusedWeight(weight)
    except Exception:  # noqa: BLE001 - shapes its packing does not take (out % 32 != 0)
        return None


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return torch.equal(got, expected)
    scale = expected.abs().max().clamp_min(1e-6)
    return bool(((got - expected).abs().max() / scale) < 0.05)


def describe_plans(plans: dict[tuple[int, int], NF4PathChoice]) -> str:
    """One line: shape -> decode/prefill paths with their µs."""
    parts = []
    for (out_features, in_features), choice in plans.items():
        decode = choice.timings_us.get("decode", {}).get(choice.decode, 0.0)
        prefill = choice.timings_us.get("prefill", {}).get(choice.prefill, 0.0)
        parts.append(f"{out_features}x{in_features}: decode {choice.decode} {decode:.0f}us, "
                     f"prefill {choice.prefill} {prefill:.0f}us")
    return "; ".join(parts)
