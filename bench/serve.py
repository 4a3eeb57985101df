"""`loraquilt bench serve`: throughput, latency and hot-load, loraquilt against
transformers + PEFT on the same NF4 base, in one run on this machine.

Two pairs of systems (see `serve_systems`): the exact pair, `loraquilt serve --dtype
float32` against PEFT in exact fp32, and the pair as users get them, `--dtype auto` against
PEFT with the user's defaults. loraquilt runs as real `loraquilt serve` processes driven
over gRPC; the peers run in this process. All get the same prompts, adapters (seeded PEFT
folders), greedy decoding and exactly T new tokens per request. The KV-cache scenarios
(`prefix`, `high_concurrency`: see `serve_kv`) compare pairs of float32 servers of their own;
the log-probability scenarios (`echo`, `logprobs`: see `serve_logprobs`) share one.
With `--peers`, vLLM and llama.cpp run the throughput scenarios too (see `bench/peers`).
`structured` (see `serve_structured`) runs on a server of its own, and so do the adapter-kind
scenarios `merge`, `dora` and `alora` (see `serve_kinds`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loraquilt.bench.peers.options import PeerOptions, add_peer_arguments
from loraquilt.bench.serve_report import draw_plot, print_table
from loraquilt.bench.serve_scenarios import KIND_SCENARIOS, KV_SCENARIOS, LOGPROB_SCENARIOS, SCENARIOS, THROUGHPUT
from loraquilt.bench.workload import ModelShapes, build_adapters, build_tiny_model, make_prompts, zipf_choices


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 32  # B requests per throughput scenario
    new_tokens: int = 32  # T
    many_adapters: int = 1000
    many_pool: int = 64  # distinct weight files behind the many adapters (hard links)
    many_requests_per_batch: int = 4  # 4·B requests
    max_active_adapters: int = 32
    hotload_repeats: int = 20
    sequential_timed: int = 4  # PEFT sequential: requests timed, rest extrapolated
    latency_seconds: float = 20.0
    plot_points: tuple[int, ...] = (1, 8, 32)  # 1 and B reuse `same` and `distinct`
    repeats: int = 2  # throughput scenarios: runs per system, interleaved; the median (upper) one is reported
    accuracy_prompts: int = 32  # bench prompts whose bf16 and fp32 logits are compared
    prefix_requests: int = 32  # `prefix`: requests per run, round robin over prefix_adapters heavy adapters
    prefix_adapters: int = 4
    prefix_tokens: int = 384  # each adapter's shared instruction prefix
    prefix_tail_tokens: tuple[int, int] = (16, 64)  # each request's own tail (seeded length)
    concurrency_requests: int = 128  # `high_concurrency`: requests per run
    concurrency_prompt_tokens: tuple[int, int] = (32, 64)
    concurrency_new_tokens: int = 64  # prompt + new <= 128 positions per request
    concurrency_cache_positions: int = 1024  # the KV pool of both servers: 32 sequences of this many positions
    concurrency_max_seq_len: int = 256
    structured_requests: int = 24  # `structured`: requests on distinct adapters, every other one with a JSON schema
    structured_new_tokens: int = 128  # their max_tokens (the unconstrained rows generate exactly this many)
    echo_prompts: int = 24  # `echo`: prompts scored at once
    echo_prompt_tokens: int = 128  # each of exactly this many tokens
    alora_history_tokens: int = 1024  # `alora`: the conversation the base model has read
    alora_turns: int = 8  # adapters answering it in turn
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(batch=8, new_tokens=8, many_adapters=40, many_pool=8, many_requests_per_batch=2,
                   max_active_adapters=8, hotload_repeats=3, sequential_timed=2, latency_seconds=3.0,
                   plot_points=(1, 8), repeats=1, accuracy_prompts=8, prefix_requests=8, prefix_tokens=96,
                   prefix_tail_tokens=(8, 24), concurrency_requests=32, concurrency_prompt_tokens=(16, 32),
                   concurrency_new_tokens=16, echo_prompts=8, echo_prompt_tokens=32, alora_history_tokens=96,
                   alora_turns=3)


def _progress(message: str) -> None:
    # one write per line: servers started side by side report from their own threads
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse_scenarios(text: str) -> tuple[str, ...]:
    """`--scenarios a,b,...`: known names, in the bench's own order; argparse error otherwise."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(SCENARIOS)}")
    return tuple(name for name in SCENARIOS if name in names)


def measure_machine_apart(quick: bool) -> dict:
    """`measure_machine` in a child process, so its 1 GiB copy does not raise the peak RSS
    the in-process peers report."""
    code = ("import json; from loraquilt.bench.machine import measure_machine; "
            "from loraquilt.bench.serve import _progress; "
            f"print(json.dumps(measure_machine(log=_progress, quick={quick})))")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(model: str | None, config: BenchConfig, workdir: Path, quick: bool,
              scenarios_wanted: tuple[str, ...] = SCENARIOS, separate_auto: bool = False,
              peer_options: PeerOptions | None = None, with_peft: bool = True) -> dict:
    from transformers import AutoTokenizer

    from loraquilt.bench import serve_scenarios as run
    from loraquilt.bench.flops import FlopModel
    from loraquilt.bench.machine import measure_model_gemm_apart
    from loraquilt.bench.serve_report import add_compute_bound, identical_fractions, ratios, versions
    from loraquilt.bench.serve_systems import (LQ, LQ_AUTO, ORDER, PEFT, PEFT_DEFAULT, resolve_auto_dtype,
                                                start_systems)
    from loraquilt.server.model.sources import resolve_model

    started = time.perf_counter()
    wanted = set(scenarios_wanted)
    auto_dtype, auto_reason = resolve_auto_dtype()
    _progress(f"--dtype auto resolves to {auto_dtype} here ({auto_reason})")
    _progress("measuring the machine (memory bandwidth, fp32 and bf16 GEMM)")
    machine = measure_machine_apart(quick)
    source = resolve_model(model)
    model_folder = source.folder
    if quick:
        model_folder = build_tiny_model(workdir / "tiny-model", source.folder, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    B, T = config.batch, config.new_tokens
    machine["model_gemm"] = measure_model_gemm_apart(FlopModel.from_folder(model_folder).token_gemms(), B, quick)
    prompts = make_prompts(tokenizer, B, seed=config.seed)
    root = workdir / "adapters" / ModelShapes.from_folder(model_folder).tag
    _progress(f"writing seeded adapters under {root}")
    heavy = build_adapters(model_folder, root, "heavy", B, seed=config.seed + 1)
    recipe = build_adapters(model_folder, root, "recipe", B, seed=config.seed + 2)
    hot = (build_adapters(model_folder, root / "hot", "heavy", config.hotload_repeats, seed=config.seed + 3)
           if "hotload" in wanted else [])
    pool = build_adapters(model_folder, root / "pool", "heavy", config.many_pool, seed=config.seed + 4) \
        if "many" in wanted else []
    many = _link_many(root / "many", pool, config.many_adapters) if pool else []

    throughput = [name for name in THROUGHPUT if name in wanted]
    scenarios: dict[str, dict] = {name: {} for name in SCENARIOS if name != "accuracy"}
    tokens: dict[str, dict[str, list[list[int]]]] = {}
    plot: dict = {}
    memory: dict[str, dict] = {}
    many_requests = 0
    need_servers = bool(wanted & {*THROUGHPUT, "many", "hotload", "latency"})
    need_peers = with_peft and bool(wanted & {*THROUGHPUT, "sequential", "hotload"})
    systems = start_systems(model_folder, root, want_servers=need_servers, want_peers=need_peers,
                            auto_dtype=auto_dtype, separate_auto=separate_auto, max_batch_size=B,
                            max_active_adapters=config.max_active_adapters, log=_progress)
    engines = None
    try:
        if peer_options and peer_options.engines:  # vLLM, llama.cpp: throughput scenarios only
            engines = _start_engines(peer_options, systems, throughput, model_folder, workdir, heavy, recipe, B)
        peer_descriptions = {system: peer.description for system, peer in systems.peers.items()}
        served_dtypes = {system: server.served_dtype() for system, server in systems.servers.items()}
        for system in systems.distinct_servers():
            server = systems.servers[system]
            for index, folder in enumerate(heavy):
                server.register(f"heavy-{index}", str(folder.relative_to(root)))
            for index, folder in enumerate(recipe):
                server.register(f"recipe-{index}", str(folder.relative_to(root)))
            server.throughput(prompts[:2], [None, "heavy-0"], 2)  # warm-up: first forward, allocator
        if "base" in throughput:  # before the peers hold adapters: their plain base model
            run.run_throughput(systems, ["base"], prompts, T, config.repeats, scenarios, tokens, _progress)
        if systems.peers and wanted & {*THROUGHPUT, "sequential"} - {"base"}:
            names = [f"heavy-{i}" for i in range(B)] + [f"recipe-{i}" for i in range(B)]
            for peer in systems.peers.values():
                peer.load_adapters(heavy + recipe, names)
        run.run_throughput(systems, [n for n in throughput if n != "base"], prompts, T, config.repeats,
                           scenarios, tokens, _progress)
        if "distinct" in wanted:
            plot = run.run_plot(systems, config.plot_points, prompts, T, scenarios, _progress)
        if "sequential" in wanted:
            run.run_sequential(systems, prompts, T, config.sequential_timed, scenarios, _progress)
        if "many" in wanted:
            picks = zipf_choices(config.many_requests_per_batch * B, len(many), 1.1, config.seed + 5)
            many_requests = len(picks)
            run.run_many(systems, root, many, picks, prompts, T, len(pool), scenarios, tokens, _progress)
        if "hotload" in wanted:
            run.run_hotload(systems, root, hot, prompts[0], config.hotload_repeats, scenarios, _progress)
        if "latency" in wanted:
            run.run_latency(systems, prompts, T, config.latency_seconds, config.seed + 6, scenarios, _progress)
        for system in systems.distinct_servers():
            rss, peak = systems.servers[system].memory_mb()
            memory[system] = {"rss_mb": rss, "peak_rss_mb": peak}
        peer_engines = {}
        if engines:  # idle check and prompt-token check before they stop; skips into the scenarios
            peer_engines = engines.describe(sum(len(tokenizer(p)["input_ids"]) for p in prompts), scenarios)
            engines.record_skipped(scenarios, throughput)
    finally:
        systems.stop()

    if wanted & set(KV_SCENARIOS):
        _run_kv_scenarios(config, wanted, model_folder, root, heavy, tokenizer, prompts[0], scenarios)
    if wanted & set(LOGPROB_SCENARIOS):
        _run_logprob_scenarios(config, wanted, model_folder, root, heavy, tokenizer, prompts, scenarios)

    if "structured" in wanted:
        _run_structured_scenario(config, model_folder, root, heavy, prompts, scenarios)
    if wanted & set(KIND_SCENARIOS):
        _run_kind_scenarios(config, wanted, model_folder, root, heavy, tokenizer, prompts, scenarios)

    accuracy = {}
    if "accuracy" in wanted:
        from loraquilt.bench.accuracy import bf16_vs_fp32

        _progress(f"accuracy: bf16 vs fp32 prefill logits over {min(B, config.accuracy_prompts)} prompts")
        accuracy["bf16_vs_fp32"] = bf16_vs_fp32(model_folder, prompts[:config.accuracy_prompts], _progress)

    prompt_tokens = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    add_compute_bound(scenarios, FlopModel.from_folder(model_folder), prompt_tokens, T, machine, auto_dtype,
                      many_requests)
    return {
        "scenarios": {name: entry for name, entry in scenarios.items() if entry or name in wanted},
        "ratios": ratios(scenarios),
        "identical_greedy_fraction": identical_fractions(tokens, LQ, PEFT),
        "identical_greedy_fraction_auto": identical_fractions(tokens, LQ_AUTO, PEFT_DEFAULT),
        "peer_engines": peer_engines,
        "accuracy": accuracy,
        "plot": {system: {str(n): v for n, v in points.items()} for system, points in plot.items()},
        "server_memory": memory.get(LQ, {}),
        "server_memory_auto": memory.get(LQ_AUTO, memory.get(LQ, {})),
        "machine": machine,
        "settings": {**asdict(config), "model": source.name if not quick else "tiny random Llama (quick)",
                     "model_folder": str(model_folder), "compute_dtype": "float32", "greedy": True,
                     "scenarios": list(scenarios_wanted),
                     "with_peft": with_peft,
                     "peer": "transformers + PEFT + bitsandbytes NF4 (double quant), fp32 compute",
                     "peer_exact_fp32": True,
                     "peer_default": "transformers + PEFT + bitsandbytes NF4 (double quant), the user's defaults: "
                                     "from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit="
                                     "True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True))",
                     "peer_dtypes": peer_descriptions, "served_dtypes": served_dtypes,
                     "auto_dtype": auto_dtype, "auto_dtype_reason": auto_reason,
                     "auto_same_as_float32": systems.auto_shared,
                     "order_within_repeat": list(ORDER), "prompt_tokens": prompt_tokens},
        "versions": versions(),
        "wall_seconds": time.perf_counter() - started,
    }


def _start_engines(options: PeerOptions, systems, throughput: list[str], model_folder: Path, workdir: Path,
                   heavy: list[Path], recipe: list[Path], batch: int):
    """The peer engines, beside the started systems, with the adapters `throughput` uses."""
    from loraquilt.bench.peers.engines import adapters_for, start_engines
    from loraquilt.bench.serve_scenarios import adapter_names, plans

    folders = {**{f"heavy-{i}": f for i, f in enumerate(heavy)}, **{f"recipe-{i}": f for i, f in enumerate(recipe)}}
    used = adapters_for([adapter_names(*plans(batch)[name]) for name in throughput], folders)
    engines = start_engines(options, model_folder, used, workdir / "peers", batch, _progress,
                            throughput=bool(throughput))
    systems.engines.update(engines.running)
    return engines


def _run_kv_scenarios(config: BenchConfig, wanted: set[str], model_folder: Path, root: Path, heavy: list[Path],
                      tokenizer, warm_prompt: str, scenarios: dict) -> None:
    """`prefix` and `high_concurrency` (bench/serve_kv.py), each on a server pair of its own."""
    from loraquilt.bench import serve_kv
    from loraquilt.bench.serve_systems import LQ

    settings = serve_kv.ServerSettings(model_folder, root, config.max_active_adapters,
                                       max(256, 2 * config.batch))
    folders = {f"heavy-{index}": folder for index, folder in enumerate(heavy)}
    if "prefix" in wanted:
        adapters = min(config.prefix_adapters, len(heavy))
        _progress(f"prefix: {config.prefix_requests} requests over {adapters} adapters, "
                  f"{config.prefix_tokens}-token shared prefixes, cache on vs off")
        scenarios["prefix"][LQ] = serve_kv.run_prefix(
            settings, folders, tokenizer, requests=config.prefix_requests, adapters=adapters,
            prefix_tokens=config.prefix_tokens, tail_tokens=config.prefix_tail_tokens,
            new_tokens=config.new_tokens, max_batch_size=config.batch, repeats=config.repeats,
            seed=config.seed + 7, warm_prompt=warm_prompt, progress=_progress)
    if "high_concurrency" in wanted:
        adapters = [f"heavy-{index}" for index in range(min(len(heavy), config.max_active_adapters))]
        _progress(f"high_concurrency: {config.concurrency_requests} requests, paged vs 32 slots in the same KV memory")
        scenarios["high_concurrency"][LQ] = serve_kv.run_high_concurrency(
            settings, folders, tokenizer, requests=config.concurrency_requests, adapters=adapters,
            prompt_tokens=config.concurrency_prompt_tokens, new_tokens=config.concurrency_new_tokens,
            cache_positions=config.concurrency_cache_positions, max_seq_len=config.concurrency_max_seq_len,
            repeats=config.repeats, seed=config.seed + 8, warm_prompt=warm_prompt, progress=_progress)


def _run_logprob_scenarios(config: BenchConfig, wanted: set[str], model_folder: Path, root: Path,
                           heavy: list[Path], tokenizer, prompts: list[str], scenarios: dict) -> None:
    """`echo` and `logprobs` (bench/serve_logprobs.py), on one server of their own."""
    from loraquilt.bench import serve_kv
    from loraquilt.bench.serve_logprobs import run_logprob_scenarios
    from loraquilt.bench.serve_systems import LQ

    settings = serve_kv.ServerSettings(model_folder, root, config.max_active_adapters,
                                       max(256, 2 * config.batch))
    found = run_logprob_scenarios(
        settings, {f"heavy-{index}": folder for index, folder in enumerate(heavy)}, tokenizer,
        wanted=wanted, echo_prompts=config.echo_prompts, echo_prompt_tokens=config.echo_prompt_tokens,
        prompts=prompts, new_tokens=config.new_tokens, repeats=config.repeats, seed=config.seed + 9,
        warm_prompt=prompts[0], progress=_progress)
    for name, entry in found.items():
        scenarios[name][LQ] = entry


def _run_structured_scenario(config: BenchConfig, model_folder: Path, root: Path, heavy: list[Path],
                             prompts: list[str], scenarios: dict) -> None:
    """`structured` (bench/serve_structured.py), on one server of its own."""
    from loraquilt.bench import serve_kv
    from loraquilt.bench.serve_structured import run_structured
    from loraquilt.bench.serve_systems import LQ

    settings = serve_kv.ServerSettings(model_folder, root, config.max_active_adapters,
                                       max(256, 2 * config.batch))
    scenarios["structured"][LQ] = run_structured(
        settings, {f"heavy-{index}": folder for index, folder in enumerate(heavy)},
        requests=config.structured_requests, prompts=prompts, new_tokens=config.structured_new_tokens,
        repeats=config.repeats, progress=_progress)


def _run_kind_scenarios(config: BenchConfig, wanted: set[str], model_folder: Path, root: Path, heavy: list[Path],
                        tokenizer, prompts: list[str], scenarios: dict) -> None:
    """`merge`, `dora` and `alora` (bench/serve_kinds.py), each on servers of its own."""
    from loraquilt.bench import serve_kinds, serve_kv
    from loraquilt.bench.serve_systems import LQ

    settings = serve_kv.ServerSettings(model_folder, root, config.max_active_adapters,
                                       max(256, 2 * config.batch))
    if "merge" in wanted:
        scenarios["merge"][LQ] = serve_kinds.run_merge(settings, heavy, prompts, config.new_tokens, config.repeats,
                                                       _progress)
    if "dora" in wanted:
        scenarios["dora"][LQ] = serve_kinds.run_dora(settings, heavy, prompts, config.new_tokens, config.repeats,
                                                     config.seed + 10, _progress)
    if "alora" in wanted:
        scenarios["alora"][LQ] = serve_kinds.run_alora(
            settings, heavy, tokenizer, history_tokens=config.alora_history_tokens, turns=config.alora_turns,
            conversations=config.repeats, seed=config.seed + 11, progress=_progress)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from loraquilt.server.engine_args import add_engine_arguments

    parser.add_argument("--json", metavar="PATH", required=True, help="write the results here")
    parser.add_argument("--plot", metavar="PATH.png", help="tokens/s against distinct adapters")
    add_engine_arguments(parser, ("model",))
    parser.add_argument("--quick", action="store_true", help="tiny model, small N (a smoke run)")
    parser.add_argument("--workdir", type=Path, help="where adapters are written (default: a cache folder)")
    parser.add_argument("--scenarios", type=parse_scenarios, default=SCENARIOS, metavar="A,B,...",
                        help=f"run only these (default: all): {', '.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="throughput, prefix and high_concurrency runs per system and scenario, interleaved "
                             "(default 2; --quick 1)")
    parser.add_argument("--separate-auto-server", action="store_true",
                        help="start a --dtype auto server even where auto resolves to float32")
    parser.add_argument("--no-peft", action="store_true",
                        help="leave out the transformers + PEFT systems (for models where they would take hours)")
    add_peer_arguments(parser)
    parser.set_defaults(run=_run_command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_command(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import default_cache_dir

    config = BenchConfig.quick() if args.quick else BenchConfig()
    if args.repeats:
        config = replace(config, repeats=args.repeats)
    workdir = args.workdir or default_cache_dir() / ("bench-quick" if args.quick else "bench")
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_bench(args.model, config, workdir, args.quick, args.scenarios, args.separate_auto_server,
                        PeerOptions.from_args(args), with_peft=not args.no_peft)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    if args.plot:
        draw_plot(results, Path(args.plot))
    _progress(f"wrote {args.json} in {results['wall_seconds']:.0f} s")
    return 0
