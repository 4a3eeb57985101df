"""What `loraquilt bench serve` derives from its measurements and how it shows them: ratios,
compute-bound fractions, greedy agreement, the table and the plot."""

from __future__ import annotations

import platform
from pathlib import Path

from loraquilt.bench.flops import FlopModel, RequestWork, compute_bound_fraction, workload_flops
from loraquilt.bench.peers.report import engine_ratios, print_engine_table
from loraquilt.bench.serve_scenarios import THROUGHPUT, plans
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, PEFT, PEFT_DEFAULT

SYSTEM_DTYPE = {LQ: "float32", PEFT: "float32"}  # LQ_AUTO: settings.auto_dtype


def same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = list(zip(a, b))
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 0.0


def identical_fractions(tokens: dict, a: str, b: str) -> dict[str, float]:
    """Share of requests whose greedy tokens are identical between systems a and b, per scenario."""
    return {name: same_tokens(tokens[a][name], tokens[b][name])
            for name in tokens.get(b, {}) if name in tokens.get(a, {})}


def add_compute_bound(scenarios: dict, flop_model: FlopModel, prompt_tokens: list[int], new_tokens: int,
                      machine: dict, auto_dtype: str, many_count: int | None) -> None:
    """`workload_gflop`, `compute_bound_fraction` and the rate it was taken against
    (`compute_bound_rate`, `compute_bound_rate_gflops`; see `compute_bound_rate`), and
    `compute_bound_fraction_square` (vs the 2048^3 GEMM rate) for the loraquilt systems and
    the exact peer, in every throughput scenario and `many`, in each system's dtype."""
    batch = len(prompt_tokens)
    works: dict[str, list[RequestWork]] = {}
    for name, (kind, assignment) in plans(batch).items():
        works[name] = [RequestWork(prompt_tokens[i], new_tokens, None if a is None else kind)
                       for i, a in enumerate(assignment)]
    if many_count:
        works["many"] = [RequestWork(prompt_tokens[i % batch], new_tokens, "heavy") for i in range(many_count)]
    dtypes = {**SYSTEM_DTYPE, LQ_AUTO: auto_dtype}
    for name, work in works.items():
        flops = workload_flops(flop_model, work)
        for system, dtype in dtypes.items():
            entry = scenarios.get(name, {}).get(system)
            if not entry or not entry.get("wall_s"):
                continue
            prefix = "bf16" if dtype == "bfloat16" else "fp32"
            rate_name, rate = compute_bound_rate(machine, prefix)
            entry["workload_gflop"] = flops / 1e9
            entry["compute_bound_fraction"] = compute_bound_fraction(flops, entry["wall_s"], rate)
            entry["compute_bound_rate"] = rate_name
            entry["compute_bound_rate_gflops"] = rate
            entry["compute_bound_fraction_square"] = compute_bound_fraction(
                flops, entry["wall_s"], machine.get(f"{prefix}_matmul_gflops"))


def compute_bound_rate(machine: dict, prefix: str) -> tuple[str, float | None]:
    """The GEMM rate (its key in the results' `machine`, GFLOP/s) a run in dtype `prefix`
    ("fp32", "bf16") is measured against: the model's own weight shapes at the decode batch's
    rows (`machine.model_gemm`, measured in the same run) when present, else the 2048^3 rate.
    Prefill GEMMs have more rows, so they can run nearer the 2048^3 rate than this."""
    model_rate = machine.get("model_gemm", {}).get(f"{prefix}_gflops")
    if model_rate:
        return f"model_gemm.{prefix}_gflops", model_rate
    return f"{prefix}_matmul_gflops", machine.get(f"{prefix}_matmul_gflops")


def ratios(scenarios: dict) -> dict:
    def tps(name: str, system: str) -> float | None:
        return scenarios.get(name, {}).get(system, {}).get("tokens_per_s")

    def ratio(a, b):
        return None if a is None or not b else a / b

    def pair(prefix: str, ours: str, theirs: str) -> dict:
        lq = lambda name: tps(name, ours)  # noqa: E731
        peer = lambda name: tps(name, theirs)  # noqa: E731
        p = theirs
        return {
            f"{prefix}distinct_vs_{p}_distinct": ratio(lq("distinct"), peer("distinct")),
            f"{prefix}distinct_vs_{p}_sequential": ratio(lq("distinct"), peer("sequential")),
            f"{prefix}distinct_vs_{p}_base": ratio(lq("distinct"), peer("base")),
            f"{prefix}base_vs_{p}_base": ratio(lq("base"), peer("base")),
            f"{prefix}same_vs_{p}_same": ratio(lq("same"), peer("same")),
            f"{prefix}recipe_distinct_vs_{p}_recipe_distinct": ratio(lq("recipe_distinct"), peer("recipe_distinct")),
            f"{prefix}same_over_base": ratio(lq("same"), lq("base")),
            f"{prefix}recipe_same_over_base": ratio(lq("recipe_same"), lq("base")),
            f"{prefix}recipe_distinct_over_recipe_same": ratio(lq("recipe_distinct"), lq("recipe_same")),
            f"{prefix}distinct_over_same": ratio(lq("distinct"), lq("same")),
            f"{prefix}many_over_distinct": ratio(lq("many"), lq("distinct")),
        }

    hot = scenarios.get("hotload", {}).get(LQ, {})
    half = scenarios.get("latency", {}).get(LQ, {}).get("50pct", {})
    prefix = scenarios.get("prefix", {}).get(LQ, {})
    on, off = prefix.get("cache_on", {}), prefix.get("cache_off", {})
    structured = scenarios.get("structured", {}).get(LQ, {})
    crowd = scenarios.get("high_concurrency", {}).get(LQ, {})
    echo = scenarios.get("echo", {}).get(LQ, {})
    scored = scenarios.get("logprobs", {}).get(LQ, {})
    merge, dora, alora = (scenarios.get(name, {}).get(LQ, {}) for name in ("merge", "dora", "alora"))
    return {
        **pair("", LQ, PEFT),
        **pair("auto_", LQ_AUTO, PEFT_DEFAULT),
        "auto_distinct_over_float32_distinct": ratio(tps("distinct", LQ_AUTO), tps("distinct", LQ)),
        "auto_base_over_float32_base": ratio(tps("base", LQ_AUTO), tps("base", LQ)),
        "peft_default_base_over_peft_base": ratio(tps("base", PEFT_DEFAULT), tps("base", PEFT)),
        "peft_default_distinct_over_peft_distinct": ratio(tps("distinct", PEFT_DEFAULT), tps("distinct", PEFT)),
        "hotload_over_warm_ttft": ratio(hot.get("p50_ms"), hot.get("warm_ttft_p50_ms")),
        "latency_50pct_itl_p99_over_p50": ratio(half.get("itl_p99_ms"), half.get("itl_p50_ms")),
        "prefix_ttft_p50_on_over_off": ratio(on.get("ttft_p50_ms"), off.get("ttft_p50_ms")),
        "prefix_tokens_per_s_on_over_off": ratio(on.get("tokens_per_s"), off.get("tokens_per_s")),
        "high_concurrency_over_slots32": ratio(crowd.get("tokens_per_s"), crowd.get("slots32_tokens_per_s")),
        "echo_over_prefill": echo.get("echo_over_prefill"),  # the median of its rounds' ratios
        "logprobs_over_plain": scored.get("logprobs_over_plain"),
        "structured_over_unconstrained": ratio(structured.get("tokens_per_s"),
                                               structured.get("unconstrained_tokens_per_s")),
        "merge_over_single": merge.get("merge_over_single"),  # medians of their rounds' (turns') ratios
        "dora_over_plain": dora.get("dora_over_plain"),
        "alora_over_base_ttft": alora.get("alora_over_base"),
        "plain_over_alora_ttft": alora.get("plain_over_alora"),
        **engine_ratios(scenarios),  # per throughput scenario: {"loraquilt_auto_vs_vllm": ..., ...}
    }


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from loraquilt import __version__

    return {"loraquilt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    scenarios = results["scenarios"]
    systems = (LQ, PEFT, LQ_AUTO, PEFT_DEFAULT)
    rows = [("scenario", "loraquilt", "peft", "ratio", "loraquilt_auto", "peft_default", "ratio", "auto cbf")]

    def tps(name, system):
        return scenarios.get(name, {}).get(system, {}).get("tokens_per_s")

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    for name in (*THROUGHPUT, "sequential", "many"):
        if not scenarios.get(name):
            continue
        lq, peft, auto, default = (tps(name, s) for s in systems)
        cbf = scenarios[name].get(LQ_AUTO, {}).get("compute_bound_fraction")
        rows.append((f"{name} tok/s", _fmt(lq), _fmt(peft), ratio(lq, peft), _fmt(auto), _fmt(default),
                     ratio(auto, default), _fmt(cbf, ".3f")))
    hot = scenarios.get("hotload", {})
    if hot:
        p50 = [_fmt(hot.get(s, {}).get("p50_ms")) for s in systems]
        rows.append(("hotload p50 ms", p50[0], p50[1], "-", p50[2], p50[3], "-", "-"))
        warm = [_fmt(hot.get(s, {}).get("warm_ttft_p50_ms")) for s in (LQ, LQ_AUTO)]
        rows.append(("warm ttft p50 ms", warm[0], "-", "-", warm[1], "-", "-", "-"))
    latency = scenarios.get("latency", {})
    for label in ("50pct", "80pct"):
        cells = {s: latency.get(s, {}).get(label) for s in (LQ, LQ_AUTO)}
        if not any(cells.values()):
            continue
        for metric in ("ttft", "itl"):
            text = {s: f"{st[f'{metric}_p50_ms']:.0f}/{st[f'{metric}_p99_ms']:.0f}" if st else "-"
                    for s, st in cells.items()}
            rows.append((f"latency {label} {metric} p50/p99 ms", text[LQ], "-", "-", text[LQ_AUTO], "-", "-", "-"))
    prefix = scenarios.get("prefix", {}).get(LQ, {})
    if prefix:
        on, off = prefix["cache_on"], prefix["cache_off"]
        rows.append(("prefix ttft p50 ms on/off", f"{on['ttft_p50_ms']:.0f}/{off['ttft_p50_ms']:.0f}", "-",
                     ratio(on["ttft_p50_ms"], off["ttft_p50_ms"]), "-", "-", "-", "-"))
        rows.append(("prefix tok/s on/off", f"{on['tokens_per_s']:.1f}/{off['tokens_per_s']:.1f}", "-",
                     ratio(on["tokens_per_s"], off["tokens_per_s"]), "-", "-", "-", "-"))
    crowd = scenarios.get("high_concurrency", {}).get(LQ, {})
    if crowd:
        rows.append((f"high_concurrency tok/s paged/32 slots ({crowd['requests']} req)",
                     f"{crowd['tokens_per_s']:.1f}/{crowd['slots32_tokens_per_s']:.1f}", "-",
                     ratio(crowd["tokens_per_s"], crowd["slots32_tokens_per_s"]), "-", "-", "-", "-"))
    echo = scenarios.get("echo", {}).get(LQ, {})
    if echo:
        rows.append((f"echo wall s echo/prefill ({echo['prompts']} x {echo['prompt_tokens'][1]} tokens)",
                     f"{echo['wall_s']:.2f}/{echo['prefill_wall_s']:.2f}", "-",
                     f"{echo['echo_over_prefill']:.2f}x", "-", "-", "-", "-"))
    scored = scenarios.get("logprobs", {}).get(LQ, {})
    if scored:
        rows.append(("logprobs 5 tok/s with/without",
                     f"{scored['tokens_per_s']:.1f}/{scored['plain_tokens_per_s']:.1f}", "-",
                     f"{scored['logprobs_over_plain']:.2f}x", "-", "-", "-", "-"))
    structured = scenarios.get("structured", {}).get(LQ, {})
    if structured:
        rows.append((f"structured tok/s with/without ({structured['constrained_requests']} of "
                     f"{structured['requests']} req, valid {structured['structured_valid_fraction']:.0%})",
                     f"{structured['tokens_per_s']:.1f}/{structured['unconstrained_tokens_per_s']:.1f}", "-",
                     ratio(structured["tokens_per_s"], structured["unconstrained_tokens_per_s"]), "-", "-", "-", "-"))
    merge = scenarios.get("merge", {}).get(LQ, {})
    if merge:
        rows.append((f"merge ties tok/s merged/single (first request {merge['first_request_s']:.2f} s)",
                     f"{merge['tokens_per_s']:.1f}/{merge['single_tokens_per_s']:.1f}", "-",
                     f"{merge['merge_over_single']:.2f}x", "-", "-", "-", "-"))
    dora = scenarios.get("dora", {}).get(LQ, {})
    if dora:
        rows.append(("dora tok/s DoRA/plain (distinct)", f"{dora['tokens_per_s']:.1f}/{dora['plain_tokens_per_s']:.1f}",
                     "-", f"{dora['dora_over_plain']:.2f}x", "-", "-", "-", "-"))
    alora = scenarios.get("alora", {}).get(LQ, {})
    if alora:
        p50 = alora["ttft_p50_ms"]
        rows.append((f"alora ttft p50 ms aLoRA/base/plain ({alora['history_tokens']} tokens, {alora['turns']} turns)",
                     f"{p50['alora']:.0f}/{p50['base']:.0f}/{p50['plain']:.0f}", "-",
                     f"{alora['alora_over_base']:.2f}x base, {alora['plain_over_alora']:.1f}x faster than plain",
                     "-", "-", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    accuracy = results.get("accuracy", {}).get("bf16_vs_fp32")
    if accuracy:
        print(f"bf16 vs fp32 logits over {accuracy['prompts']} prompts: max |diff| "
              f"{accuracy['max_abs_logit_diff']:.4f}, top-1 agreement {accuracy['top1_agreement']:.3f}")
    settings = results["settings"]
    print(f"auto dtype: {settings['auto_dtype']} ({settings['auto_dtype_reason']})"
          + ("; loraquilt_auto = loraquilt" if settings.get("auto_same_as_float32") else ""))
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in results["ratios"].items()
                                 if isinstance(v, (int, float))))
    print_engine_table(results)


def draw_plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'loraquilt[bench]'") from None
    figure, axis = plt.subplots(figsize=(6, 4))
    for system, points in results["plot"].items():
        if not points:
            continue
        xs = sorted(int(n) for n in points)
        axis.plot(xs, [points[str(n)] for n in xs], marker="o", label=system)
    axis.set_xlabel("distinct adapters in the batch")
    axis.set_ylabel("generated tokens/s")
    axis.set_xscale("log", base=2)
    axis.set_title(f"B={results['settings']['batch']}, T={results['settings']['new_tokens']}, "
                   f"{results['settings']['model']}")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
