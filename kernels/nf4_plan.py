"""Which NF4 projection path runs each weight shape on this CPU, measured at load time.

Paths (every one computes y = x @ dequantize_nf4(W).T + b):
- `dequant_native`: the project's AVX2/OpenMP dequantize kernel into the shared scratch
  buffer, then one oneDNN GEMM in the compute dtype (bit-identical to bitsandbytes).
- `dequant_bnb`: the same with bitsandbytes' C dequantize kernel (bit-identical too).
- `dequant_native_wm` / `dequant_bnb_wm`: the same dequantized weight in a weight-major
  GEMM, `(W @ x.T).T`: the same products summed in another order (equal within float32
  rounding, not bit for bit); with MKL it is often much faster for a few rows.
- `bnb_fused`: bitsandbytes' fused NF4 GEMM for AVX512-BF16 CPUs (what `Linear4bit`
  uses in eval mode there). bf16 only; it rounds the block scales to bf16, so it is a
  candidate only when the model computes in bf16 and the CPU has avx512_bf16. It needs
  its own repacked copy of the weight (+0.5 bytes per parameter where it is chosen).

Each distinct (out, in) shape is timed at the row counts of ROW_KINDS (decode steps,
chunked-prefill steps, long prefills); a projection then takes the fastest path for the
row count of each step.
In float32 the candidates agree to float32 rounding (the activation-major ones bit for bit
with bitsandbytes); `exact_only` keeps to those bit-identical ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from loraquilt.kernels.nf4 import DequantScratch, NF4Weight, nf4_linear_cpu

# (kind, rows timed): a step with up to that many rows takes that kind's path (the last
# kind's beyond). decode: a full decode batch; chunk: a default chunked-prefill step (128
# prompt tokens beside 32 decodes); prefill: a long prompt in one step.
ROW_KINDS = (("decode", 32), ("chunk", 160), ("prefill", 512))
DECODE_ROWS = ROW_KINDS[0][1]
PATHS = ("dequant_native", "dequant_native_wm", "dequant_bnb", "dequant_bnb_wm", "bnb_fused")
WEIGHT_MAJOR = ("dequant_native_wm", "dequant_bnb_wm")


@dataclass(frozen=True)
class NF4PathChoice:
    """by_kind: {kind of ROW_KINDS: path}, the path for steps of that many rows.
    timings_us: {kind: {path: µs per call}} as measured."""

    by_kind: dict = field(default_factory=lambda: {kind: "dequant_native" for kind, _ in ROW_KINDS})
    timings_us: dict = field(default_factory=dict, compare=False)

    def path_for(self, rows: int) -> str:
        for kind, limit in ROW_KINDS:
            if rows <= limit:
                return self.by_kind[kind]
        return self.by_kind[ROW_KINDS[-1][0]]

    def replacing(self, path: str, by: str) -> NF4PathChoice:
        """The same choice with `path` swapped for `by` wherever it was picked."""
        return NF4PathChoice({k: by if p == path else p for k, p in self.by_kind.items()}, self.timings_us)

    @property
    def paths(self) -> set[str]:
        return set(self.by_kind.values())


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

    paths = ["dequant_bnb", "dequant_bnb_wm"]
    if dtype in (torch.float32, torch.bfloat16) and native_kernel() is not None:
        paths[:0] = ["dequant_native", "dequant_native_wm"]
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
    dequantizer = {"dequant_native": "native", "dequant_bnb": "bnb"}.get(path.removesuffix("_wm"))
    if dequantizer is None or path not in PATHS:
        raise ValueError(f"unknown NF4 path {path!r}; choose one of {PATHS}")
    return nf4_linear_cpu(x, weight, bias, scratch, dequantizer, weight_major=path in WEIGHT_MAJOR)


def _median_us(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call costs, caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e6)
    return sorted(samples)[len(samples) // 2]


def plan_nf4_paths(shapes: Iterable[tuple[int, int]], dtype: torch.dtype, *, repeats: int = 5,
                   seed: int = 0, exact_only: bool = False) -> dict[tuple[int, int], NF4PathChoice]:
    """Time every candidate path on a random NF4 weight of each (out, in) shape, for decode
    and prefill row counts, and keep the fastest of each. A candidate that fails, or whose
    result is off by more than the dtype's rounding, is dropped. exact_only: only the paths
    bit-identical to bitsandbytes (no weight-major GEMM)."""
    generator = torch.Generator().manual_seed(seed)
    paths = [p for p in candidate_paths(dtype) if not (exact_only and p in WEIGHT_MAJOR)]
    scratch = DequantScratch()
    plans: dict[tuple[int, int], NF4PathChoice] = {}
    for shape in dict.fromkeys(shapes):
        weight = NF4Weight.quantize((torch.randn(*shape, generator=generator) * 0.02).to(dtype))
        fused = repack_for_bnb_fused(weight) if "bnb_fused" in paths else None
        timings: dict[str, dict[str, float]] = {}
        for kind, rows in ROW_KINDS:
            x = torch.randn(rows, shape[1], generator=generator).to(dtype)
            expected = run_path(paths[0], x, weight, None, scratch).float()
            timings[kind] = {}
            for path in paths:
                try:
                    got = run_path(path, x, weight, None, scratch, fused).float()
                except Exception:  # noqa: BLE001 - e.g. a kernel this bitsandbytes lacks
                    continue
                if not _close(got, expected, dtype, exact=path not in WEIGHT_MAJOR):
                    continue
                timings[kind][path] = _median_us(lambda: run_path(path, x, weight, None, scratch, fused),
                                                 repeats)
        pick = {kind: min(times, key=times.get) for kind, times in timings.items()}
        plans[shape] = NF4PathChoice(pick, timings)
    return plans


def repack_for_bnb_fused(weight: NF4Weight) -> BnbFusedWeight | None:
    try:
        return BnbFusedWeight(weight)
    except Exception:  # noqa: BLE001 - shapes its packing does not take (out % 32 != 0)
        return None


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, exact: bool) -> bool:
    """Whether a candidate's result may stand for the first path's: bit for bit for an
    exact float32 path, else within the dtype's rounding of the largest output."""
    if dtype == torch.float32 and exact:
        return torch.equal(got, expected)
    scale = expected.abs().max().clamp_min(1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    return bool(((got - expected).abs().max() / scale) < tolerance)


def describe_plans(plans: dict[tuple[int, int], NF4PathChoice]) -> str:
    """One line: shape -> the path per row kind with its µs."""
    parts = []
    for (out_features, in_features), choice in plans.items():
        kinds = ", ".join(f"{kind} {path} {choice.timings_us.get(kind, {}).get(path, 0.0):.0f}us"
                          for kind, path in choice.by_kind.items())
        parts.append(f"{out_features}x{in_features}: {kinds}")
    return "; ".join(parts)
