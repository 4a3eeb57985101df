"""`loraquilt bench scaleout`: adapter-affinity routing on Ray Serve, on loopback.

One run, four phases over the same zipf traffic on `adapters` adapters (greedy):
  one_replica                   1 replica with every core;
  replicas                      N replicas (cores split between them), routed by adapter;
  replicas_hot_keys_not_spread  the same without spreading hot keys over replicas;
  replicas_no_affinity          N replicas routed without the key (Ray picks freely).
Per phase: completion tokens/s, the affinity hit rate (requests whose routing key was
already resident on the replica that served them, read from the replicas' own
`loraquilt_routing_total` counters, warm-up excluded), routing-key loads per replica, and
whether the greedy answers equal the one-replica phase's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# phase -> (several replicas?, routed by adapter?, hot keys spread over replicas?)
PHASES = {
    "one_replica": (False, True, True),
    "replicas": (True, True, True),
    "replicas_hot_keys_not_spread": (True, True, False),
    "replicas_no_affinity": (True, False, False),
}


@dataclass(frozen=True)
class ScaleoutBenchConfig:
    replicas: int = 2
    adapters: int = 64
    zipf_exponent: float = 1.0
    requests: int = 384  # timed, per phase
    warmup_requests: int = 128
    clients: int = 32
    max_new_tokens: int = 16
    max_adapters_per_replica: int = 32  # 2 replicas x 32 hold all 64 keys only when routed by adapter
    max_active_adapters: int = 32
    max_batch_size: int = 32
    prompts: int = 16
    seed: int = 0


QUICK = dict(requests=160, warmup_requests=64, clients=16, max_new_tokens=8, max_adapters_per_replica=16)


def _progress(message: str) -> None:
    print(f"[bench scaleout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_scaleout_bench(model: str | None, config: ScaleoutBenchConfig, workdir: Path, quick: bool) -> dict:
    from ray import serve
    from transformers import AutoTokenizer

    from loraquilt.bench.server_side import free_port
    from loraquilt.bench.workload import ModelShapes, build_tiny_model, make_prompts, write_adapter, zipf_choices
    from loraquilt.scaleout.app import start_scaleout
    from loraquilt.scaleout.config import ReplicaConfig, ScaleoutConfig
    from loraquilt.server.model.sources import resolve_model

    started = time.perf_counter()
    source = resolve_model(model)
    folder = source.folder
    if quick:
        folder = build_tiny_model(workdir / "tiny-model", source.folder, seed=config.seed)
    prompts = make_prompts(AutoTokenizer.from_pretrained(folder), config.prompts, seed=config.seed,
                           min_tokens=8, max_tokens=24)
    total = config.warmup_requests + config.requests
    picks = zipf_choices(total, config.adapters, config.zipf_exponent, config.seed)
    traffic = [(prompts[i % len(prompts)], f"adapter-{pick}") for i, pick in enumerate(picks)]
    cores = os.cpu_count() or 1
    results: dict = {"phases": {}}
    with tempfile.TemporaryDirectory(prefix="adapters-", dir=workdir) as adapter_root:
        root = Path(adapter_root)
        shapes = ModelShapes.from_folder(folder)
        _progress(f"writing {config.adapters} rank-8 adapters under {root}")
        for index in range(config.adapters):
            write_adapter(root / f"adapter-{index}", shapes, "recipe", config.seed * 100_003 + index)
        base = ReplicaConfig(model=str(folder), adapter_root=root,
                             max_adapters_per_replica=config.max_adapters_per_replica,
                             max_batch_size=config.max_batch_size, max_active_adapters=config.max_active_adapters,
                             max_seq_len=256)
        running, port = None, free_port()  # Serve's gRPC proxy keeps its first port
        try:
            for phase, (several, affinity, spread) in PHASES.items():
                replicas = config.replicas if several else 1
                if running is not None:
                    serve.delete(running.config.app_name)
                _progress(f"{phase}: starting {replicas} replica(s)")
                running = start_scaleout(ScaleoutConfig(
                    replicas=replicas, port=port, affinity=affinity, spread_hot_keys=spread,
                    replica=replace(base, threads=max(1, cores // replicas))), log=_progress)
                _register_all(running.target, config.adapters)
                _progress(f"{phase}: {config.warmup_requests} warm-up and {config.requests} timed requests, "
                          f"{config.clients} clients")
                results["phases"][phase] = _phase(running, traffic, config)
                summary = results["phases"][phase]
                _progress(f"{phase}: {summary['tokens_per_s']:.1f} tokens/s, affinity hit rate "
                          f"{summary['affinity_hit_rate']:.2f}, key loads {summary['key_loads_per_replica']}")
        finally:
            if running is not None:
                running.shutdown()
    reference = results["phases"]["one_replica"].pop("answers")
    for phase in list(PHASES)[1:]:
        answers = results["phases"][phase].pop("answers")
        same = sum(answers[i] == reference[i] for i in range(len(reference)))
        results["phases"][phase]["same_greedy_tokens_as_one_replica"] = same / len(reference)
    one, many = results["phases"]["one_replica"], results["phases"]["replicas"]
    results["ratios"] = {
        "tokens_per_s_replicas_over_one": many["tokens_per_s"] / one["tokens_per_s"],
        "tokens_per_s_affinity_over_none": many["tokens_per_s"] / results["phases"]["replicas_no_affinity"]["tokens_per_s"],
        "tokens_per_s_spread_over_not_spread":
            many["tokens_per_s"] / results["phases"]["replicas_hot_keys_not_spread"]["tokens_per_s"],
    }
    results["settings"] = {**asdict(config), "model": "tiny random Llama (quick)" if quick else source.name,
                           "cores": cores, "greedy": True, "ignore_eos": True,
                           "adapter_shape": "rank 8, alpha 16, q_proj/v_proj"}
    results["wall_s"] = time.perf_counter() - started
    return results


def _register_all(target: str, count: int) -> None:
    from loraquilt.client import LoraQuiltClient

    with LoraQuiltClient(target, timeout=120) as client:
        for index in range(count):
            client.register_adapter(f"adapter-{index}", f"adapter-{index}")


def _phase(running, traffic: list[tuple[str, str]], config: ScaleoutBenchConfig) -> dict:
    from loraquilt.client import LoraQuiltClient

    client = LoraQuiltClient(running.target, timeout=600)

    def ask(item: tuple[str, str]) -> tuple[int, ...]:
        prompt, adapter = item
        return tuple(client.generate(prompt, adapter=adapter, max_new_tokens=config.max_new_tokens,
                                     ignore_eos=True).token_ids)

    try:
        with ThreadPoolExecutor(config.clients) as pool:
            warm = list(pool.map(ask, traffic[:config.warmup_requests]))
            time.sleep(6.0)  # every replica has reported its metrics endpoint (health checks)
            before = routing_counts(running)
            begin = time.perf_counter()
            timed = list(pool.map(ask, traffic[config.warmup_requests:]))
            seconds = time.perf_counter() - begin
            after = routing_counts(running)
    finally:
        client.close()
    hits = sum(after[r]["hit"] - before.get(r, {}).get("hit", 0) for r in after)
    misses = sum(after[r]["miss"] - before.get(r, {}).get("miss", 0) for r in after)
    return {
        "replicas": len(after),
        "tokens_per_s": sum(len(t) for t in timed) / seconds,
        "timed_seconds": seconds,
        "affinity_hit_rate": hits / max(1, hits + misses),
        "hits": hits, "misses": misses,
        "key_loads_per_replica": sorted(int(after[r]["loads"]) for r in after),
        "key_loads_timed_per_replica": sorted(int(after[r]["loads"] - before.get(r, {}).get("loads", 0))
                                              for r in after),
        "requests_per_replica": sorted(int(after[r]["hit"] + after[r]["miss"]) for r in after),
        "answers": warm + timed,
    }


def routing_counts(running) -> dict[str, dict[str, float]]:
    """Per replica: routing hits, misses and key loads, from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for replica, report in running.replica_reports().items():
        try:
            text = urllib.request.urlopen(report["metrics"], timeout=10).read().decode()
        except OSError:  # a replica that is gone
            continue
        values = {"hit": 0.0, "miss": 0.0, "loads": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loraquilt_routing_total":
                    values[sample.labels["result"]] += sample.value
                elif sample.name == "loraquilt_routing_key_loads_total":
                    values["loads"] += sample.value
        counts[replica] = values
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from loraquilt.server.engine_args import add_engine_arguments

    parser.add_argument("--json", required=True, type=Path, help="write the results here")
    add_engine_arguments(parser, ("model",))
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer requests")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, help="timed requests per phase (384; quick 160)")
    parser.add_argument("--clients", type=int, help="concurrent clients (32; quick 16)")
    parser.add_argument("--max-adapters-per-replica", type=int, help="routing keys resident per replica (32; quick 16)")
    parser.add_argument("--workdir", type=Path, help="where the tiny model and adapters go (default: a cache folder)")
    parser.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("bench scaleout needs Ray Serve: pip install 'loraquilt[ray]'") from None
    from loraquilt.server.model.sources import default_cache_dir

    overrides = dict(QUICK) if args.quick else {}
    for key in ("requests", "clients", "max_adapters_per_replica"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = ScaleoutBenchConfig(replicas=args.replicas, adapters=args.adapters, **overrides)
    workdir = args.workdir or default_cache_dir() / ("scaleout-quick" if args.quick else "scaleout")
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_scaleout_bench(args.model, config, workdir, args.quick)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for phase, summary in results["phases"].items():
        print(f"{phase:30s} {summary['tokens_per_s']:8.1f} tokens/s  affinity hit rate "
              f"{summary['affinity_hit_rate']:.2f}  key loads per replica {summary['key_loads_per_replica']}")
    print(f"replicas / one replica: {results['ratios']['tokens_per_s_replicas_over_one']:.2f}x tokens/s")
    return 0
