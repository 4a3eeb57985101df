"""`loraquilt bench serve`: throughput, latency and hot-load, loraquilt against
transformers + PEFT on the same NF4 base, in one run on this machine.

loraquilt runs as a real `loraquilt serve` process driven over gRPC; the peer runs in
this process. Both get the same prompts, adapters (seeded PEFT folders), greedy
decoding and exactly T new tokens per request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraquilt.bench.workload import build_adapters, build_tiny_model, make_prompts, zipf_choices

THROUGHPUT = ("distinct", "same", "base", "recipe_distinct", "recipe_same")


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 32  # B requests per throughput scenario
    new_tokens: int = 32  # T
    many_adapters: int = 1000
    many_pool: int = 64  # distinct weight files behind the many adapters (hard links)
    many_requests_per_batch: int = 8  # 8·B requests
    max_active_adapters: int = 32
    hotload_repeats: int = 20
    sequential_timed: int = 4  # PEFT sequential: requests timed, rest extrapolated
    latency_seconds: float = 20.0
    plot_points: tuple[int, ...] = (1, 4, 16, 32)
    repeats: int = 3  # throughput scenarios: median of this many runs, per system
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(batch=8, new_tokens=8, many_adapters=40, many_pool=8, many_requests_per_batch=2,
                   max_active_adapters=8, hotload_repeats=3, sequential_timed=2, latency_seconds=3.0,
                   plot_points=(1, 4, 8), repeats=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = list(zip(a, b))
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 0.0


def run_bench(model: str | None, config: BenchConfig, workdir: Path, quick: bool) -> dict:
    from transformers import AutoTokenizer

    from loraquilt.bench.machine import measure_machine
    from loraquilt.bench.peft_peer import PeftPeer
    from loraquilt.bench.server_side import ServedLoraQuilt
    from loraquilt.server.model.sources import resolve_model

    started = time.perf_counter()
    _progress("measuring the machine (memory bandwidth, fp32 GEMM)")
    machine = measure_machine(log=_progress)
    source = resolve_model(model)
    model_folder = source.folder
    if quick:
        model_folder = build_tiny_model(workdir / "tiny-model", source.folder, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    B, T = config.batch, config.new_tokens
    prompts = make_prompts(tokenizer, B, seed=config.seed)
    root = workdir / "adapters"
    _progress(f"writing seeded adapters under {root}")
    heavy = build_adapters(model_folder, root, "heavy", B, seed=config.seed + 1)
    recipe = build_adapters(model_folder, root, "recipe", B, seed=config.seed + 2)
    hot = build_adapters(model_folder, root / "hot", "heavy", config.hotload_repeats, seed=config.seed + 3)
    pool = build_adapters(model_folder, root / "pool", "heavy", config.many_pool, seed=config.seed + 4)
    many = _link_many(root / "many", pool, config.many_adapters)

    scenarios: dict[str, dict] = {name: {} for name in (*THROUGHPUT, "sequential", "many", "hotload", "latency")}
    plot: dict[str, dict[int, float]] = {"loraquilt": {}, "peft": {}}
    tokens: dict[str, dict[str, list[list[int]]]] = {"loraquilt": {}, "peft": {}}

    # -- loraquilt ----------------------------------------------------------------------------
    _progress("starting loraquilt serve")
    server = ServedLoraQuilt(model_folder, root, port=_free_port(), max_batch_size=B,
                             max_active_adapters=config.max_active_adapters,
                             max_cpu_adapters=max(256, 2 * B), max_seq_len=256, log=_progress)
    try:
        for index, folder in enumerate(heavy):
            server.register(f"heavy-{index}", str(folder.relative_to(root)))
        for index, folder in enumerate(recipe):
            server.register(f"recipe-{index}", str(folder.relative_to(root)))
        plans = _plans(B)
        server.throughput(prompts[:2], [None, "heavy-0"], 2)  # warm-up: first forward, allocator
        for name, (kind, assignment) in plans.items():
            adapters = [None if a is None else f"{kind}-{a}" for a in assignment]
            server.throughput(prompts, adapters, 2)  # warm-up: adapters onto the device
            _progress(f"loraquilt {name}")
            result, runs = _median_run(lambda: server.throughput(prompts, adapters, T), config.repeats)
            scenarios[name]["loraquilt"] = {**_summary(result), "runs_tokens_per_s": runs}
            tokens["loraquilt"][name] = result.token_ids
        for n in config.plot_points:
            adapters = [f"heavy-{i % n}" for i in range(B)]
            server.throughput(prompts, adapters, 2)
            plot["loraquilt"][n] = server.throughput(prompts, adapters, T).tokens_per_s
        capacity = scenarios["distinct"]["loraquilt"]["tokens_per_s"]

        _progress(f"loraquilt many: registering {len(many)} adapters")
        for index, folder in enumerate(many):
            server.register(f"many-{index}", str(folder.relative_to(root)))
        picks = zipf_choices(config.many_requests_per_batch * B, len(many), 1.1, config.seed + 5)
        _progress(f"loraquilt many: {len(picks)} requests, zipf(1.1) over {len(many)} adapters")
        many_prompts = [prompts[i % B] for i in range(len(picks))]
        result = server.throughput(many_prompts, [f"many-{p}" for p in picks], T)
        scenarios["many"]["loraquilt"] = {**_summary(result), "adapters": len(many),
                                          "distinct_weight_files": len(pool),
                                          "distinct_adapters_requested": len(set(picks))}

        _progress("loraquilt hotload")
        scenarios["hotload"]["loraquilt"] = server.hotload([str(f.relative_to(root)) for f in hot], prompts[0])
        for fraction in (0.5, 0.8):
            rate = capacity * fraction / T
            _progress(f"loraquilt latency at {int(fraction * 100)}% of capacity ({rate:.2f} req/s)")
            scenarios["latency"].setdefault("loraquilt", {})[f"{int(fraction * 100)}pct"] = server.open_loop(
                prompts, [f"heavy-{i}" for i in range(B)], T, rate, config.latency_seconds, config.seed + 6)
        rss, peak = server.memory_mb()
        server_memory = {"rss_mb": rss, "peak_rss_mb": peak}
    finally:
        server.stop()

    # -- transformers + PEFT ------------------------------------------------------------------
    _progress("loading transformers + PEFT peer")
    peer = PeftPeer(model_folder, log=_progress)
    _progress("peft base")
    peer.throughput(prompts, [None] * B, 2)  # warm-up, as for loraquilt
    result, runs = _median_run(lambda: peer.throughput(prompts, [None] * B, T), config.repeats)
    scenarios["base"]["peft"] = {**_summary(result), "runs_tokens_per_s": runs}
    tokens["peft"]["base"] = result.token_ids
    peer.load_adapters(heavy + recipe, [f"heavy-{i}" for i in range(B)] + [f"recipe-{i}" for i in range(B)])
    for name, (kind, assignment) in _plans(B).items():
        if name == "base":
            continue
        _progress(f"peft {name}")
        names = [f"{kind}-{a}" for a in assignment]
        peer.throughput(prompts, names, 2)  # warm-up
        result, runs = _median_run(lambda: peer.throughput(prompts, names, T), config.repeats)
        scenarios[name]["peft"] = {**_summary(result), "runs_tokens_per_s": runs}
        tokens["peft"][name] = result.token_ids
    for n in config.plot_points:
        plot["peft"][n] = (scenarios["same"]["peft"]["tokens_per_s"] if n == 1 else
                           peer.throughput(prompts, [f"heavy-{i % n}" for i in range(B)], T).tokens_per_s)
    _progress("peft sequential (set_adapter per request)")
    result = peer.sequential(prompts, [f"heavy-{i}" for i in range(B)], T, max_requests=config.sequential_timed)
    scenarios["sequential"]["peft"] = {**_summary(result), "notes": result.notes}
    _progress("peft hotload (load_adapter + first token)")
    scenarios["hotload"]["peft"] = peer.hotload(hot, prompts[0], config.hotload_repeats)

    identical = {name: _same_tokens(tokens["loraquilt"][name], tokens["peft"][name])
                 for name in tokens["peft"] if name in tokens["loraquilt"]}
    return {
        "scenarios": scenarios,
        "ratios": _ratios(scenarios),
        "identical_greedy_fraction": identical,
        "plot": {system: {str(n): v for n, v in points.items()} for system, points in plot.items()},
        "server_memory": server_memory,
        "machine": machine,
        "settings": {**asdict(config), "model": source.name if not quick else "tiny random Llama (quick)",
                     "model_folder": str(model_folder), "compute_dtype": "float32", "greedy": True,
                     "peer": "transformers + PEFT + bitsandbytes NF4 (double quant), fp32 compute",
                     "peer_exact_fp32": True},
        "versions": _versions(),
        "wall_seconds": time.perf_counter() - started,
    }


def _median_run(run, repeats: int):
    """Run `repeats` times; the run with the median tokens/s, and every run's tokens/s."""
    results = sorted((run() for _ in range(max(1, repeats))), key=lambda r: r.tokens_per_s)
    return results[len(results) // 2], [r.tokens_per_s for r in results]


def _plans(batch: int) -> dict[str, tuple[str, list]]:
    """scenario -> (adapter kind, adapter index per request or None for the base model)."""
    return {
        "distinct": ("heavy", list(range(batch))),
        "same": ("heavy", [0] * batch),
        "base": ("heavy", [None] * batch),
        "recipe_distinct": ("recipe", list(range(batch))),
        "recipe_same": ("recipe", [0] * batch),
    }


def _link_many(folder: Path, pool: list[Path], count: int) -> list[Path]:
    """`count` adapter folders whose files are hard links into the pool (round robin):
    distinct adapters to the server, without writing `count` weight files."""
    folders = []
    for index in range(count):
        target = folder / f"many-{index}"
        if not (target / "adapter_model.safetensors").exists():
            target.mkdir(parents=True, exist_ok=True)
            source = pool[index % len(pool)]
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if (target / name).exists():
                    (target / name).unlink()
                os.link(source / name, target / name)
        folders.append(target)
    return folders


def _summary(result) -> dict:
    summary = {"tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
               "generated_tokens": result.generated_tokens}
    for key in ("latency_p50_ms", "latency_p99_ms", "server_rss_mb", "step_ms", "peak_rss_mb"):
        value = getattr(result, key, None)
        if value is not None:
            summary[key] = value
    return summary


def _ratios(scenarios: dict) -> dict:
    def tps(name: str, system: str) -> float | None:
        return scenarios.get(name, {}).get(system, {}).get("tokens_per_s")

    def ratio(a, b):
        return None if a is None or not b else a / b

    lq = lambda name: tps(name, "loraquilt")  # noqa: E731
    peft = lambda name: tps(name, "peft")  # noqa: E731
    return {
        "distinct_vs_peft_distinct": ratio(lq("distinct"), peft("distinct")),
        "distinct_vs_peft_sequential": ratio(lq("distinct"), peft("sequential")),
        "distinct_vs_peft_base": ratio(lq("distinct"), peft("base")),
        "base_vs_peft_base": ratio(lq("base"), peft("base")),
        "same_over_base": ratio(lq("same"), lq("base")),
        "recipe_same_over_base": ratio(lq("recipe_same"), lq("base")),
        "recipe_distinct_over_recipe_same": ratio(lq("recipe_distinct"), lq("recipe_same")),
        "distinct_over_same": ratio(lq("distinct"), lq("same")),
        "many_over_distinct": ratio(lq("many"), lq("distinct")),
    }


def _versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from loraquilt import __version__

    return {"loraquilt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def print_table(results: dict) -> None:
    rows = [("scenario", "loraquilt tok/s", "peft tok/s", "ratio")]
    for name in (*THROUGHPUT, "sequential", "many"):
        lq = results["scenarios"][name].get("loraquilt", {}).get("tokens_per_s")
        peft = results["scenarios"][name].get("peft", {}).get("tokens_per_s")
        ratio = f"{lq / peft:.2f}x" if lq and peft else "-"
        rows.append((name, f"{lq:.1f}" if lq else "-", f"{peft:.1f}" if peft else "-", ratio))
    hot = results["scenarios"]["hotload"]
    rows.append(("hotload p50 ms", f"{hot['loraquilt']['p50_ms']:.1f}", f"{hot['peft']['p50_ms']:.1f}", "-"))
    for label, stats in results["scenarios"]["latency"].get("loraquilt", {}).items():
        rows.append((f"latency {label} ttft p50/p99 ms",
                     f"{stats['ttft_p50_ms']:.0f}/{stats['ttft_p99_ms']:.0f}", "-", "-"))
        rows.append((f"latency {label} itl p50/p99 ms",
                     f"{stats['itl_p50_ms']:.0f}/{stats['itl_p99_ms']:.0f}", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in results["ratios"].items() if v is not None))


def draw_plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'loraquilt[bench]'") from None
    figure, axis = plt.subplots(figsize=(6, 4))
    for system, points in results["plot"].items():
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", required=True, help="write the results here")
    parser.add_argument("--plot", metavar="PATH.png", help="tokens/s against distinct adapters")
    parser.add_argument("--model", help="HF folder, .gguf or hub id (default: embedded SmolLM2)")
    parser.add_argument("--quick", action="store_true", help="tiny model, small N (a smoke run)")
    parser.add_argument("--workdir", type=Path, help="where adapters are written (default: a cache folder)")
    parser.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import default_cache_dir

    config = BenchConfig.quick() if args.quick else BenchConfig()
    workdir = args.workdir or default_cache_dir() / ("bench-quick" if args.quick else "bench")
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_bench(args.model, config, workdir, args.quick)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    if args.plot:
        draw_plot(results, Path(args.plot))
    _progress(f"wrote {args.json} in {results['wall_seconds']:.0f} s")
    return 0
