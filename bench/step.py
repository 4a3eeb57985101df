"""`loraquilt bench step`: what one decode step costs inside the engine, per scenario.

One engine in this process; B requests decode together (base model, all on one adapter,
every request on its own adapter); each scenario runs `repeats` times, scenarios
alternating. Reported per scenario: the median decode-only step (all B rows decoding, no
prefill in the step) in µs, the tokens/s that step time gives, and the torch operators
one decode step dispatches (counted with the torch profiler; the project's native
kernels are single calls outside that count, reported as `native_calls`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCENARIOS = ("base", "same", "distinct")


@dataclass(frozen=True)
class StepBenchConfig:
    batch: int = 24
    new_tokens: int = 32
    repeats: int = 3
    seed: int = 0


def _progress(message: str) -> None:
    sys.stderr.write(f"[bench step {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _decode_steps(engine, requests, batch: int) -> list[float]:
    """Submit the requests, step until done; the durations of the steps that ran all
    `batch` rows as decodes (after every prompt was prefilled)."""
    sequences = [engine.add_request(request) for request in requests]
    durations = []
    while engine.has_work():
        decoding = sum(1 for seq in sequences if seq.prefilled and not seq.finished)
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        if decoding == batch:
            durations.append(elapsed)
    return durations


def count_ops(engine, requests) -> dict:
    """Torch operators dispatched by one decode step (the third step of these requests)."""
    from torch.profiler import ProfilerActivity, profile

    for request in requests:
        engine.add_request(request)
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    while engine.has_work():
        engine.step()
    events = prof.key_averages()
    aten = {e.key: e.count for e in events if e.key.startswith("aten::")}
    # view-like bookkeeping ops cost no kernel launch; count them apart
    views = {"aten::as_strided", "aten::view", "aten::slice", "aten::select", "aten::unsqueeze",
             "aten::transpose", "aten::t", "aten::alias", "aten::expand", "aten::narrow", "aten::reshape",
             "aten::_reshape_alias", "aten::detach", "aten::lift_fresh"}
    return {"aten_ops": sum(aten.values()), "aten_compute_ops": sum(n for k, n in aten.items() if k not in views),
            "top": dict(sorted(aten.items(), key=lambda kv: -kv[1])[:12])}


def run_step_bench(model: str | None, dtype: str, config: StepBenchConfig, workdir: Path) -> dict:
    import torch

    from loraquilt.host import cpu_flags, cpu_model
    from loraquilt.bench.workload import build_adapters, make_prompts
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.sources import resolve_model
    from loraquilt.server.model.weights import DeviceConfig
    from loraquilt.server.request import Request, SamplingParams

    engine = Engine(EngineConfig(model=model, device=DeviceConfig(dtype=dtype), max_batch_size=max(32, config.batch),
                                 max_active_adapters=max(32, config.batch), max_seq_len=512, progress=False))
    folder = resolve_model(model).folder
    _progress(f"model {engine.model_name}, {str(engine.model.dtype).removeprefix('torch.')}; NF4 plan: "
              f"{engine.model.nf4_paths}")
    adapters = build_adapters(folder, workdir / "adapters", "heavy", config.batch, seed=config.seed + 1)
    for index, path in enumerate(adapters):
        engine.register_adapter(f"heavy-{index}", path)
    prompts = make_prompts(engine.tokenizer, config.batch, seed=config.seed)
    names = {"base": [None] * config.batch, "same": ["heavy-0"] * config.batch,
             "distinct": [f"heavy-{i}" for i in range(config.batch)]}

    def requests(scenario: str, new_tokens: int) -> list:
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        return [Request(prompt=p, adapter=a, sampling=sampling) for p, a in zip(prompts, names[scenario])]

    _decode_steps(engine, requests("distinct", 4), config.batch)  # warm-up: first calls, slots
    steps: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for repeat in range(config.repeats):
        for scenario in SCENARIOS:
            steps[scenario] += _decode_steps(engine, requests(scenario, config.new_tokens), config.batch)
        _progress(f"round {repeat + 1}/{config.repeats}: " + ", ".join(
            f"{s} {statistics.median(steps[s]) * 1e6:.0f} us" for s in SCENARIOS))
    scenarios = {}
    for scenario in SCENARIOS:
        step_us = statistics.median(steps[scenario]) * 1e6
        scenarios[scenario] = {"decode_step_us": step_us, "decode_tokens_per_s": config.batch / step_us * 1e6,
                               "steps_timed": len(steps[scenario]), **count_ops(engine, requests(scenario, 6))}
    base = scenarios["base"]["decode_step_us"]
    return {"scenarios": scenarios,
            "ratios": {f"{s}_vs_base": base / scenarios[s]["decode_step_us"] for s in SCENARIOS if s != "base"},
            "settings": {**asdict(config), "model": engine.model_name, "dtype": str(engine.model.dtype),
                         "nf4_plan": engine.model.nf4_paths, "threads": torch.get_num_threads()},
            "machine": {"cpu": cpu_model(), "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from loraquilt.server.engine_args import add_engine_arguments

    parser.add_argument("--json", metavar="PATH", required=True, help="write the results here")
    add_engine_arguments(parser, ("model", "dtype"))
    parser.add_argument("--batch", type=int, default=StepBenchConfig.batch, help="requests decoding together")
    parser.add_argument("--new-tokens", type=int, default=StepBenchConfig.new_tokens)
    parser.add_argument("--repeats", type=int, default=StepBenchConfig.repeats, help="rounds over the scenarios")
    parser.add_argument("--workdir", type=Path, help="where adapters are written (default: a cache folder)")
    parser.set_defaults(run=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import default_cache_dir

    config = StepBenchConfig(batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats)
    workdir = args.workdir or default_cache_dir() / "bench-step"
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_step_bench(args.model, args.dtype, config, workdir)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["scenarios"].items():
        print(f"{name:9s} {entry['decode_step_us'] / 1e3:8.1f} ms/step  {entry['decode_tokens_per_s']:7.0f} tok/s  "
              f"{entry['aten_compute_ops']:5d} torch ops/step")
    return 0
