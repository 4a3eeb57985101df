"""`loraquilt torture`: a soak test of a real `loraquilt serve` process on loopback.

Concurrent clients send greedy requests (base, stable adapters, 2-adapter mixes, cycled
adapters, a few deliberately bad ones) while a cycler registers and unregisters
`cycles` distinct adapters. Every answer is checked against the single-request answer
for its weights, computed first on the same server one request at a time. At the end
the server must hold no leaked adapter slot, no running request and no KV block, and its
RSS must not have grown past the limit since warm-up. The KV pool is kept small
(`kv_cache_positions` in blocks of `kv_block_size`), so that sequences are preempted and
recomputed under the traffic; a run without a preemption fails. JSON out; exit code 1 unless it passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PROGRESS_PREFIX = "[torture"


@dataclass(frozen=True)
class TortureConfig:
    clients: int = 64
    cycles: int = 1000  # distinct adapters registered then unregistered during traffic
    duration_s: float = 600.0  # traffic stops at this bound even if cycles remain
    stable_adapters: int = 16  # registered for the whole run; mixes pair them up
    pool_size: int = 32  # weight folders behind the cycled adapters
    live_cycled: int = 16  # cycled adapters registered at once
    cycle_patience_s: float = 60.0  # unregister a cycled adapter no request got a token from after this
    max_new_tokens: int = 8
    prompts: int = 16
    prompts_per_target: int = 2  # prompts sent with the base, each stable adapter and mix (one reference each)
    max_batch_size: int = 32
    max_active_adapters: int = 32  # device slots
    max_cpu_adapters: int = 64
    max_seq_len: int = 128
    kv_cache_positions: int = 256  # the server's KV pool: far fewer than the batch wants, so it preempts
    kv_block_size: int = 4
    # float32: greedy answers are independent of the batch a request ran in (the contract
    # checked here); in bfloat16 a row's rounding depends on its batch's shapes, so its
    # greedy answer may differ from the single-request one where two logits are close
    dtype: str = "float32"
    warmup_cycle_fraction: float = 0.1  # warm-up ends after this share of cycles...
    warmup_s: float = 30.0  # ...and this much traffic time
    rss_growth_limit_pct: float = 5.0
    progress_every_s: float = 10.0
    request_timeout_s: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.clients, self.cycles, self.pool_size, self.live_cycled, self.max_new_tokens,
               self.prompts, self.prompts_per_target) < 1:
            raise ValueError("clients, cycles, pool_size, live_cycled, max_new_tokens, prompts and "
                             "prompts_per_target must be >= 1")
        if self.stable_adapters < 0 or self.duration_s <= 0:
            raise ValueError("stable_adapters must be >= 0 and duration_s > 0")
        if self.kv_cache_positions < self.max_seq_len:
            raise ValueError("kv_cache_positions must hold one request of max_seq_len")
        if self.max_active_adapters < 2:
            raise ValueError("max_active_adapters must be >= 2 (a mix pins two slots)")

    @classmethod
    def quick(cls) -> TortureConfig:
        return cls(clients=8, cycles=40, duration_s=300.0, stable_adapters=4, pool_size=8, live_cycled=4,
                   cycle_patience_s=20.0, prompts=8, max_batch_size=8, max_active_adapters=6,
                   max_cpu_adapters=16, kv_cache_positions=128, warmup_s=1.0, progress_every_s=5.0, request_timeout_s=60.0)


def _progress(message: str) -> None:
    print(f"{PROGRESS_PREFIX} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_torture(model: str | None, config: TortureConfig, workdir: Path, quick: bool,
                port: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from loraquilt.bench.serve_kv import kv_cache_mb
    from loraquilt.bench.serve_systems import resolve_auto_dtype
    from loraquilt.bench.server_side import ServedLoraQuilt, free_port
    from loraquilt.bench.torture_traffic import build_plan
    from loraquilt.bench.workload import ModelShapes, build_tiny_model, make_prompts, write_adapter
    from loraquilt.server.model.sources import resolve_model

    started = time.perf_counter()
    source = resolve_model(model)
    model_folder, served_model = source.folder, (None if model is None else source.folder)
    if quick:
        model_folder = served_model = build_tiny_model(workdir / "tiny-model", source.folder, seed=config.seed)
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_folder), config.prompts, seed=config.seed,
                           min_tokens=8, max_tokens=32)
    plan = build_plan(prompts, config.stable_adapters, config.pool_size, config.prompts_per_target,
                      config.max_new_tokens, config.seed)
    with tempfile.TemporaryDirectory(prefix="adapters-", dir=workdir) as adapter_root:
        root = Path(adapter_root)
        shapes = ModelShapes.from_folder(model_folder)
        _progress(f"writing {config.stable_adapters} stable and {config.pool_size} pool adapters "
                  f"(rank 8, q_proj/v_proj) under {root}")
        for index in range(config.stable_adapters):
            write_adapter(root / f"stable-{index}", shapes, "recipe", config.seed * 100_003 + index)
        for index in range(config.pool_size):
            write_adapter(root / f"pool-{index}", shapes, "recipe", config.seed * 100_003 + 50_000 + index)
        dtype = resolve_auto_dtype()[0] if config.dtype == "auto" else config.dtype
        kv_mb = kv_cache_mb(model_folder, 1, config.kv_cache_positions, dtype) * 1.0001  # whole blocks
        _progress(f"starting loraquilt serve --dtype {config.dtype} (KV pool {config.kv_cache_positions} positions "
                  f"in blocks of {config.kv_block_size}: {kv_mb:.2f} MiB)")
        server = ServedLoraQuilt(
            served_model, root, port=port or free_port(), max_batch_size=config.max_batch_size,
            max_active_adapters=config.max_active_adapters, max_cpu_adapters=config.max_cpu_adapters,
            max_seq_len=config.max_seq_len, log=_progress, metrics_port=free_port(),
            extra_args=("--default-max-new-tokens", str(config.max_new_tokens), "--kv-cache-mb", f"{kv_mb:.6f}",
                        "--kv-block-size", str(config.kv_block_size), "--dtype", config.dtype))
        try:
            results = _torture(server, plan, config)
            failures = verdict(results, config)
        except Exception as error:  # still a report: what broke, and the server's last words
            _progress(f"the run broke off: {type(error).__name__}: {error}")
            results = {"passed": None, "error": f"{type(error).__name__}: {error}",
                       "server_log_tail": list(server.stderr_tail)}
            failures = [f"the run broke off: {results['error']}"]
        finally:
            server.stop()
    results["passed"] = not failures
    results["failures"] = failures
    results["settings"] = {**asdict(config), "model": "tiny random Llama (quick)" if quick else source.name,
                           "model_folder": str(model_folder), "greedy": True, "ignore_eos": True,
                           "adapter_shape": "rank 8, alpha 16, q_proj/v_proj"}
    results["wall_s"] = time.perf_counter() - started
    return results


def _torture(server, plan, config: TortureConfig) -> dict:
    from loraquilt.bench.torture_traffic import CycledAdapters, Tally, TrafficClients
    from loraquilt.client import LoraQuiltClient

    rss_start = server.memory_mb()[0]
    for target in plan.stable:
        server.register(target.adapter, target.adapter)
    references, reference_s = _references(server, plan)

    tally = Tally()
    cycled = CycledAdapters(server.client, [f"pool-{k}" for k in range(plan.pool_size)], config.live_cycled,
                            config.cycle_patience_s, tally)
    traffic_client = LoraQuiltClient(server.target, timeout=config.request_timeout_s)
    traffic = TrafficClients(traffic_client, plan, references, cycled, tally, config.seed)
    stop = traffic.stop
    _progress(f"traffic: {config.clients} clients, {config.cycles} register/unregister cycles "
              f"({config.live_cycled} live at a time), at most {config.duration_s:.0f} s")
    begin = time.monotonic()
    clients = traffic.start(config.clients)
    cycler = threading.Thread(target=cycled.run, args=(config.cycles, stop), name="torture-cycler", daemon=True)
    cycler.start()
    warmup_cycles = max(1, round(config.cycles * config.warmup_cycle_fraction))
    rss_warm, warm_at, samples, stop_reason = None, None, [], "cycles done"
    next_report = begin + config.progress_every_s
    # traffic runs until the cycles are done and for at least twice the warm-up time, so
    # that RSS growth after the warm-up is measured even when the cycles go fast
    while cycler.is_alive() or time.monotonic() - begin < 2 * config.warmup_s:
        cycler.join(timeout=0.5) if cycler.is_alive() else time.sleep(0.5)
        now = time.monotonic()
        if server.process.poll() is not None:
            stop_reason = f"server exited with code {server.process.returncode}"
            break
        if now - begin >= config.duration_s:
            stop_reason = "duration bound"
            break
        if rss_warm is None and cycled.counts.done >= warmup_cycles and now - begin >= config.warmup_s:
            rss_warm, warm_at = server.memory_mb()[0], now - begin
            _progress(f"warm-up over after {warm_at:.0f} s: server RSS {rss_warm:.0f} MB")
        if now >= next_report:
            rss = server.memory_mb()[0]
            samples.append([round(now - begin, 1), round(rss, 1)])
            _progress(f"{now - begin:.0f} s: {tally.line()}, cycles {cycled.counts.done}/{config.cycles}, "
                      f"server RSS {rss:.0f} MB")
            next_report = now + config.progress_every_s
    stop.set()
    cycler.join()
    for thread in clients:
        thread.join(timeout=config.request_timeout_s + 10)
    duration = time.monotonic() - begin
    traffic_client.close()
    _progress(f"traffic stopped ({stop_reason}) after {duration:.0f} s: {tally.line()}, "
              f"cycles {cycled.counts.done}/{config.cycles}")
    if server.process.poll() is not None:
        raise RuntimeError(f"loraquilt serve died during the run ({stop_reason})")

    end = _settle(server)
    rss_end, rss_peak = server.memory_mb()
    warmup_reached = rss_warm is not None
    if not warmup_reached:  # a run too short to warm up: compare against the end of traffic
        rss_warm = rss_end
    registered = sorted(a.name for a in server.client.list_adapters())
    summary = tally.summary()
    return {
        "passed": None,  # filled in by the verdict
        "requests": summary["requests"],
        "ok": summary["ok"],
        "errors_by_status": summary["errors_by_status"],
        "deliberate_by_cause": summary["deliberate_by_cause"],
        "mismatches": summary["mismatches"],
        "latency_ms": summary["latency_ms"],
        "rss_mb": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end,
                   "growth_pct": (rss_end - rss_warm) / rss_warm * 100, "peak": rss_peak,
                   "warmup_reached": warmup_reached, "warmup_at_s": warm_at, "samples": samples},
        "cycles_done": cycled.counts.done,
        "cycles": asdict(cycled.counts),
        "leaked_slots": end["slots_used"] - end["device_adapters"],
        "server_at_end": {**end, "registered_adapters": registered},
        "duration_s": duration,
        "stop_reason": stop_reason,
        "by_kind": summary["by_kind"],
        "streamed": summary["streamed"],
        "unexpected_examples": summary["unexpected_examples"],
        "mismatch_examples": summary["mismatch_examples"],
        "references": {"count": len(references), "seconds": reference_s},
        "expected_registered": sorted(t.adapter for t in plan.stable),
    }


def _references(server, plan) -> tuple[dict, float]:
    """Greedy answers per (weights, prompt), one request at a time on the same server."""
    from loraquilt.bench.torture_traffic import Target, send

    started = time.perf_counter()
    _progress(f"computing {len(plan.reference_jobs())} single-request references")
    targets = {"base": Target("base", "base")}
    targets.update({t.weights: t for t in plan.stable + plan.mixes})
    references = {}
    for key in plan.prompt_choices:  # base, stable, mixes, then the pool folders
        temporary = key.startswith("pool-")
        if temporary:  # a pool folder under a name of its own, registered just for this
            server.register(f"reference-{key}", key)
            targets[key] = Target("cycled", key, adapter=f"reference-{key}")
        for index in plan.prompt_choices[key]:
            token_ids, finish = send(server.client, targets[key], plan.prompts[index], plan.max_new_tokens,
                                     stream=False)
            if finish != "length" or len(token_ids) != plan.max_new_tokens:
                raise RuntimeError(f"reference {key} prompt {index}: finish {finish!r}, {len(token_ids)} tokens")
            references[(key, index)] = token_ids
        if temporary:
            server.unregister(f"reference-{key}")
    return references, time.perf_counter() - started


def _settle(server, timeout_s: float = 60.0) -> dict:
    """Wait until no request runs or waits, then read the server's slot and request gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = server.scrape_metrics()

        def gauge(name: str, **labels) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        state = {"running_requests": gauge("loraquilt_running_requests"),
                 "kv_cache_usage_ratio": gauge("loraquilt_kv_cache_usage_ratio"),
                 "preemptions": gauge("loraquilt_preemptions_total"),
                 "prefix_cache_hit_tokens": gauge("loraquilt_prefix_cache_hits_total"),
                 "prefix_cache_query_tokens": gauge("loraquilt_prefix_cache_queries_total"),
                 "waiting_requests": gauge("loraquilt_waiting_requests"),
                 "slots_used": gauge("loraquilt_adapter_slots", state="used"),
                 "slots_free": gauge("loraquilt_adapter_slots", state="free"),
                 "device_adapters": gauge("loraquilt_adapters", tier="device")}
        if (state["running_requests"] == 0 and state["waiting_requests"] == 0) or time.monotonic() > deadline:
            return {key: value if key == "kv_cache_usage_ratio" else int(value) for key, value in state.items()}
        time.sleep(0.5)


def verdict(results: dict, config: TortureConfig) -> list[str]:
    """Why the run failed; empty when it passed."""
    failures = []
    unexpected = results["errors_by_status"]["unexpected"]
    if unexpected:
        failures.append(f"unexpected errors: {unexpected}")
    if results["mismatches"]:
        failures.append(f"{results['mismatches']} greedy answers differ from their single-request answers")
    if results["ok"] == 0:
        failures.append("no request was answered")
    if results["cycles_done"] != config.cycles:
        failures.append(f"{results['cycles_done']} of {config.cycles} cycles done ({results['stop_reason']})")
    rss = results["rss_mb"]
    if not rss["warmup_reached"]:
        failures.append("traffic stopped before the warm-up ended: no RSS growth measured")
    elif rss["growth_pct"] > config.rss_growth_limit_pct:
        failures.append(f"server RSS grew {rss['growth_pct']:.1f}% after warm-up "
                        f"(limit {config.rss_growth_limit_pct}%)")
    if results["leaked_slots"]:
        failures.append(f"{results['leaked_slots']} adapter slots held by unregistered adapters")
    end = results["server_at_end"]
    if end["kv_cache_usage_ratio"]:
        failures.append(f"KV blocks still held with no request in the server ({end['kv_cache_usage_ratio']:.1%})")
    if not end["preemptions"]:
        failures.append("no sequence was preempted: the small KV pool was never exhausted")
    if end["running_requests"] or end["waiting_requests"]:
        failures.append(f"requests left in the server: {end['running_requests']} running, "
                        f"{end['waiting_requests']} waiting")
    if end["registered_adapters"] != results["expected_registered"]:
        failures.append(f"registered at the end: {end['registered_adapters']}, expected only the stable ones")
    return failures


# -- CLI ------------------------------------------------------------------------------------

def add_torture_parser(commands, name: str, help_text: str) -> None:
    from loraquilt.server.engine_args import add_engine_arguments

    parser = commands.add_parser(name, help=help_text, description=__doc__.split("\n\n")[1])
    parser.add_argument("--json", metavar="PATH", required=True, help="write the results here")
    add_engine_arguments(parser, ("model",))
    parser.add_argument("--quick", action="store_true", help="tiny random model, small scale (a smoke run)")
    parser.add_argument("--clients", type=int, metavar="N", help="concurrent client threads (64; quick 8)")
    parser.add_argument("--cycles", type=int, metavar="N",
                        help="adapters registered then unregistered (1000; quick 40)")
    parser.add_argument("--duration", type=float, dest="duration_s", metavar="SECONDS",
                        help="upper bound on the traffic phase in seconds (600)")
    parser.add_argument("--adapters", type=int, dest="stable_adapters", metavar="N",
                        help="adapters registered for the whole run (16; quick 4)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per request (8)")
    # passed on to the server it starts; unset: TortureConfig's
    add_engine_arguments(parser, ("max_active_adapters", "dtype"), unset=("max_active_adapters", "dtype"),
                         metavar={"max_active_adapters": "N"}, help={
                             "max_active_adapters": "the server's device slots (32; quick 6)",
                             "dtype": "the server's compute dtype (float32: answers must equal the single-request "
                                      "ones exactly; in bfloat16 close logits may flip with the batch)"})
    parser.add_argument("--kv-cache-positions", type=int, metavar="N",
                        help="the server's KV pool in positions (256: small, so that sequences are preempted)")
    parser.add_argument("--port", type=int, help="the server's gRPC port (default: a free one)")
    parser.add_argument("--workdir", type=Path, help="where the tiny model and adapters go (default: a cache folder)")
    parser.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import default_cache_dir

    config = TortureConfig.quick() if args.quick else TortureConfig()
    overrides = {key: getattr(args, key) for key in ("clients", "cycles", "duration_s", "stable_adapters",
                                                      "max_new_tokens", "max_active_adapters", "dtype",
                                                      "kv_cache_positions")}
    config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
    workdir = args.workdir or default_cache_dir() / ("torture-quick" if args.quick else "torture")
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_torture(args.model, config, workdir, args.quick, args.port)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if "error" not in results:
        _summarise(results)
    for failure in results["failures"]:
        _progress(f"failure: {failure}")
    _progress(f"wrote {args.json} in {results['wall_s']:.0f} s")
    return 0 if results["passed"] else 1


def _summarise(results: dict) -> None:
    rss = results["rss_mb"]
    _progress(f"{'PASSED' if results['passed'] else 'FAILED'}: {results['requests']} requests, ok {results['ok']}, "
              f"errors {results['errors_by_status']}, mismatches {results['mismatches']}, "
              f"p50/p99 {results['latency_ms']['p50']:.0f}/{results['latency_ms']['p99']:.0f} ms, "
              f"RSS {rss['start']:.0f} -> {rss['after_warmup']:.0f} -> {rss['end']:.0f} MB "
              f"({rss['growth_pct']:+.1f}%), cycles {results['cycles_done']}, leaked slots {results['leaked_slots']}, "
              f"preemptions {results['server_at_end']['preemptions']}, prefix cache hits "
              f"{results['server_at_end']['prefix_cache_hit_tokens']}/{results['server_at_end']['prefix_cache_query_tokens']}"
              " tokens")
