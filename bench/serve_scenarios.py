"""The scenarios of `loraquilt bench serve`, each run on every system that applies.

Throughput scenarios alternate the systems run by run (loraquilt, peft, loraquilt_auto,
peft_default, then again), so a noisy spell of the machine hits every system alike; each
system reports its median run and every run's tokens/s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from loraquilt.bench.peers import ENGINES
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, PEERS, PEFT_DEFAULT, Systems

THROUGHPUT = ("distinct", "same", "base", "recipe_distinct", "recipe_same")
OTHER = ("sequential", "many", "hotload", "latency", "accuracy", "prefix", "high_concurrency", "echo", "logprobs")
KV_SCENARIOS = ("prefix", "high_concurrency")  # bench/serve_kv.py: servers of their own
STRUCTURED_SCENARIOS = ("structured",)  # bench/serve_structured.py: one server of its own
LOGPROB_SCENARIOS = ("echo", "logprobs")  # bench/serve_logprobs.py: one server of their own
KIND_SCENARIOS = ("merge", "dora", "alora")  # bench/serve_kinds.py: servers of their own
SCENARIOS = THROUGHPUT + OTHER + STRUCTURED_SCENARIOS + KIND_SCENARIOS

Progress = Callable[[str], None]
PEER_WARMUP_ROWS = 4
PEER_HOTLOAD_REPEATS = 5


def plans(batch: int) -> dict[str, tuple[str, list]]:
    """scenario -> (adapter kind, adapter index per request or None for the base model)."""
    return {
        "distinct": ("heavy", list(range(batch))),
        "same": ("heavy", [0] * batch),
        "base": ("heavy", [None] * batch),
        "recipe_distinct": ("recipe", list(range(batch))),
        "recipe_same": ("recipe", [0] * batch),
    }


def adapter_names(kind: str, assignment: list) -> list[str | None]:
    return [None if a is None else f"{kind}-{a}" for a in assignment]


def median_run(results: list):
    """The run with the median tokens/s (the upper one of an even count), and every run's
    tokens/s in the order they ran."""
    ordered = sorted(results, key=lambda r: r.tokens_per_s)
    return ordered[len(ordered) // 2], [r.tokens_per_s for r in results]


def summary(result) -> dict:
    out = {"tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
           "generated_tokens": result.generated_tokens}
    for key in ("latency_p50_ms", "latency_p99_ms", "server_rss_mb", "step_ms", "peak_rss_mb", "prompt_tokens"):
        value = getattr(result, key, None)
        if value is not None:
            out[key] = value
    return out


def run_throughput(systems: Systems, names: list[str], prompts: list[str], new_tokens: int, repeats: int,
                   scenarios: dict, tokens: dict, progress: Progress) -> None:
    """Each scenario in `names`: a 2-token warm-up per system, then `repeats` rounds of every
    system one after another. A server's warm-up sends every request (it puts the adapters
    onto the device); a peer's takes the first PEER_WARMUP_ROWS rows only (its one-time work
    was done when it loaded, and a full batch's padded prefill costs most of a run)."""
    measured = systems.measured
    for name in names:
        adapters = adapter_names(*plans(len(prompts))[name])
        for system in measured:
            rows = PEER_WARMUP_ROWS if system in PEERS else len(prompts)
            systems.throughput(system, prompts[:rows], adapters[:rows], 2)
        runs: dict[str, list] = {system: [] for system in measured}
        for repeat in range(repeats):
            for system in measured:
                runs[system].append(systems.throughput(system, prompts, adapters, new_tokens))
            progress(f"{name} run {repeat + 1}/{repeats}: " + ", ".join(
                f"{system} {runs[system][-1].tokens_per_s:.1f} tok/s ({runs[system][-1].wall_s:.1f} s)"
                for system in measured))
        for system in measured:
            result, tps = median_run(runs[system])
            scenarios[name][system] = {**summary(result), "runs_tokens_per_s": tps}
            tokens.setdefault(system, {})[name] = result.token_ids
        copy_shared_auto(systems, scenarios[name], tokens, name)


def copy_shared_auto(systems: Systems, entry: dict, tokens: dict | None = None, name: str | None = None) -> None:
    """A shared auto server: loraquilt_auto's figures are loraquilt's."""
    if systems.auto_shared and LQ in entry:
        entry[LQ_AUTO] = {**entry[LQ], "same_as": LQ}
        if tokens is not None and name in tokens.get(LQ, {}):
            tokens.setdefault(LQ_AUTO, {})[name] = tokens[LQ][name]


def run_plot(systems: Systems, points: tuple[int, ...], prompts: list[str], new_tokens: int,
             scenarios: dict, progress: Progress) -> dict[str, dict[int, float]]:
    """Tokens/s against the number of distinct heavy adapters in the batch (request i on
    heavy-(i mod n)); n = 1 and n = B reuse `same` and `distinct` when they ran. One run per
    point and system; not for peft_default (its runs are the slowest where bf16 is emulated,
    and the exact peer already shows PEFT's curve), nor for the peer engines."""
    batch = len(prompts)
    skip = {PEFT_DEFAULT, *ENGINES}
    plotted = [system for system in systems.measured if system not in skip]
    plot: dict[str, dict[int, float]] = {system: {} for system in systems.present if system not in skip}
    for n in points:
        reuse = {1: "same", batch: "distinct"}.get(n)
        adapters = [f"heavy-{i % n}" for i in range(batch)]
        for system in plotted:
            known = scenarios.get(reuse, {}).get(system) if reuse else None
            if known:
                plot[system][n] = known["tokens_per_s"]
                continue
            if system not in PEERS:
                systems.throughput(system, prompts, adapters, 2)  # adapters onto the device
            plot[system][n] = systems.throughput(system, prompts, adapters, new_tokens).tokens_per_s
        if systems.auto_shared and LQ in plot:
            plot[LQ_AUTO] = plot[LQ]
        progress(f"plot {n} distinct adapters: " + ", ".join(
            f"{system} {values[n]:.1f}" for system, values in plot.items() if n in values) + " tok/s")
    return plot


def run_sequential(systems: Systems, prompts: list[str], new_tokens: int, timed: int, scenarios: dict,
                   progress: Progress) -> None:
    """PEFT one request at a time with set_adapter (the first `timed` requests, extrapolated)."""
    for system, peer in systems.peers.items():
        progress(f"{system} sequential (set_adapter per request)")
        result = peer.sequential(prompts, [f"heavy-{i}" for i in range(len(prompts))], new_tokens,
                                 max_requests=timed)
        scenarios["sequential"][system] = {**summary(result), "notes": result.notes}


def run_many(systems: Systems, root: Path, folders: list[Path], picks: list[int], prompts: list[str],
             new_tokens: int, pool_size: int, scenarios: dict, tokens: dict, progress: Progress) -> None:
    """4·B requests over many registered adapters (zipf picks), on each server."""
    many_prompts = [prompts[i % len(prompts)] for i in range(len(picks))]
    for system in systems.distinct_servers():
        server = systems.servers[system]
        progress(f"{system} many: registering {len(folders)} adapters")
        for index, folder in enumerate(folders):
            server.register(f"many-{index}", str(folder.relative_to(root)))
        progress(f"{system} many: {len(picks)} requests, zipf(1.1) over {len(folders)} adapters")
        result = server.throughput(many_prompts, [f"many-{p}" for p in picks], new_tokens)
        scenarios["many"][system] = {**summary(result), "adapters": len(folders),
                                     "distinct_weight_files": pool_size,
                                     "distinct_adapters_requested": len(set(picks))}
        tokens.setdefault(system, {})["many"] = result.token_ids
    copy_shared_auto(systems, scenarios["many"], tokens, "many")


def run_hotload(systems: Systems, root: Path, hot: list[Path], prompt: str, repeats: int, scenarios: dict,
                progress: Progress) -> None:
    """RegisterAdapter -> first token on each server (beside the first token on heavy-0,
    already on the device), load_adapter -> first token on each peer."""
    for system in systems.distinct_servers():
        progress(f"{system} hotload (and first token on a warm adapter)")
        scenarios["hotload"][system] = systems.servers[system].hotload(
            [str(f.relative_to(root)) for f in hot], prompt, warm_adapter="heavy-0")
    copy_shared_auto(systems, scenarios["hotload"])
    for system, peer in systems.peers.items():
        # fewer repeats on the peers: each load_adapter walks the whole PEFT model (~6 s per
        # repeat with 64 adapters loaded, on 2 cores), and its spread is small beside that
        count = min(repeats, PEER_HOTLOAD_REPEATS)
        progress(f"{system} hotload (load_adapter + first token, {count} repeats)")
        scenarios["hotload"][system] = {**peer.hotload(hot, prompt, count), "repeats": count}


def run_latency(systems: Systems, prompts: list[str], new_tokens: int, seconds: float, seed: int,
                scenarios: dict, progress: Progress) -> None:
    """Poisson arrivals at 50% and 80% of each server's `distinct` capacity (measured here
    with one run when `distinct` was not among the scenarios)."""
    adapters = [f"heavy-{i}" for i in range(len(prompts))]
    for system in systems.distinct_servers():
        server = systems.servers[system]
        capacity = scenarios["distinct"].get(system, {}).get("tokens_per_s")
        if capacity is None:
            server.throughput(prompts, adapters, 2)
            capacity = server.throughput(prompts, adapters, new_tokens).tokens_per_s
        for fraction in (0.5, 0.8):
            rate = capacity * fraction / new_tokens
            progress(f"{system} latency at {int(fraction * 100)}% of capacity ({rate:.2f} req/s)")
            scenarios["latency"].setdefault(system, {})[f"{int(fraction * 100)}pct"] = server.open_loop(
                prompts, adapters, new_tokens, rate, seconds, seed)
    copy_shared_auto(systems, scenarios["latency"])
