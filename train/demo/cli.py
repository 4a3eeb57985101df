"""`loraquilt demo`: three small adapters trained on this machine (cached after the first
run), served together by one in-process server, and asked the same prompts: the base
model, each adapter, and a 50/50 mix of the two style adapters. The mix is also scored on
both style tasks' held-out rows, against the base, through the gRPC client."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraquilt.server.engine_args import add_engine_arguments
from loraquilt.train.demo.tasks import DEMO_TASKS, MIX, SHOWCASE_PROMPTS

SHOWCASE_NEW_TOKENS = 48
CLIENT_THREADS = 32


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_demo_parser(commands, name: str = "demo", help_text: str = "train and serve the demo adapters") -> None:
    parser = commands.add_parser(name, help=help_text, description=__doc__)
    add_engine_arguments(parser, ("model",))
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--prompt", action="append", default=[],
                        help="extra prompt for the table (chat); repeatable")
    parser.add_argument("--retrain", action="store_true", help="train again even when cached or shipped")
    parser.add_argument("--write-shipped", action="store_true",
                        help="for maintainers: copy the adapters into the package's shipped folder")
    parser.add_argument("--cache-dir", type=Path, help="default: $LORAQUILT_CACHE or ~/.cache/loraquilt")
    parser.add_argument("--max-steps", type=int, help="override every task's training steps (quick trials)")
    # its own --threads: training's torch threads too, not only the engine's
    parser.add_argument("--threads", type=int, help="torch CPU threads (default one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_arguments(parser, ("dtype",))
    parser.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import resolve_model
    from loraquilt.train.demo.cache import demo_root, ensure_adapter, write_shipped
    from loraquilt.train.report import write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    source = resolve_model(args.model, log=_stderr)
    root = demo_root(args.cache_dir)
    overrides = {"max_steps": args.max_steps} if args.max_steps else None
    adapters = []
    for task in DEMO_TASKS:
        adapter = ensure_adapter(task, model=args.model, model_folder=source.folder, root=root,
                                 retrain=args.retrain, overrides=overrides, threads=args.threads,
                                 progress=not args.quiet, log=_stderr)
        state = (f"trained in {adapter.wall_seconds / 60:.1f} min" if adapter.trained_now
                 else "shipped with loraquilt" if adapter.shipped else "cached")
        _stderr(f"{task.name}: {state}, {adapter.folder}")
        adapters.append(adapter)
        if args.write_shipped and not adapter.shipped:
            _stderr(f"{task.name}: shipped copy written to {write_shipped(adapter)}")
    prompts = list(SHOWCASE_PROMPTS) + list(args.prompt)
    served = serve_and_ask(args, adapters, prompts)
    results = demo_results(source.name, adapters, served)
    print(format_results(results))
    if args.json:
        write_json(args.json, results)
        _stderr(f"results: {args.json}")
    return 0


def serve_and_ask(args: argparse.Namespace, adapters, prompts: list[str]) -> dict:
    """Start the server with every adapter registered, ask it, stop it. The engine steps on
    this (main) thread; the gRPC client works from a second one. The engine is `serve`'s
    for the demo's flags (--model, --dtype), sized for three adapters."""
    from loraquilt.server.app import RunningServer, ServerConfig
    from loraquilt.server.engine import Engine
    from loraquilt.server.engine_args import engine_config_from_args

    rank = max(16, *(adapter.report["settings"]["rank"] for adapter in adapters))
    engine = Engine(engine_config_from_args(args, max_batch_size=32, max_seq_len=512, max_active_adapters=4,
                                            max_cpu_adapters=4, max_lora_rank=rank, progress=False))
    preload = tuple((a.task.name, str(a.folder)) for a in adapters)
    server = RunningServer(engine, ServerConfig(host="127.0.0.1", port=0, metrics_port=None, preload=preload),
                           loop_thread=False)
    _stderr(f"server on {server.target} with adapters {', '.join(name for name, _ in preload)}")
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = ask(server.target, adapters, prompts)
        except BaseException as error:  # re-raised on the main thread
            outcome["error"] = error
        finally:
            server.shutdown(grace=5.0)

    worker = threading.Thread(target=work, name="demo-client")
    worker.start()
    server.loop.run_here()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def ask(target: str, adapters, prompts: list[str]) -> dict:
    from loraquilt.client import LoraQuiltClient
    from loraquilt.train.data import parse_row
    from loraquilt.train.demo.tasks import DATA_SEED
    from loraquilt.train.metrics import score

    mix_name = "+".join(name for name, _ in MIX)
    systems = [("base", {})] + [(a.task.name, {"adapter": a.task.name}) for a in adapters] + \
              [(mix_name, {"mix": list(MIX)})]
    by_name = {a.task.name: a for a in adapters}
    with LoraQuiltClient(target, timeout=600) as client, ThreadPoolExecutor(CLIENT_THREADS) as pool:
        def answers(texts: list[str], max_new_tokens: int, options: dict) -> list[str]:
            def one(text: str) -> str:
                return client.generate(text, chat=True, max_new_tokens=max_new_tokens, **options).text
            return list(pool.map(one, texts))

        started = time.perf_counter()
        jobs = [(prompt, name, options) for prompt in prompts for name, options in systems]
        replies = pool.map(lambda job: client.generate(job[0], chat=True, max_new_tokens=SHOWCASE_NEW_TOKENS,
                                                       **job[2]).text, jobs)
        table: dict = {}
        for (prompt, name, _), reply in zip(jobs, replies):
            table.setdefault(prompt, {})[name] = reply
        mix_scores = {}
        for task_name, _ in MIX:
            adapter = by_name[task_name]
            # the held-out rows, written again by the task's seeded code (the file the report
            # names may be on another machine: shipped adapters were trained elsewhere)
            held_out = adapter.task.build(DATA_SEED)[1]
            rows = [parse_row(row, f"{task_name} held-out row {index}") for index, row in enumerate(held_out)]
            rows = rows[:adapter.report["eval"]["rows"]]
            texts, references = [r.user_text for r in rows], [r.completion for r in rows]
            tokens = adapter.report["settings"]["max_new_tokens"]
            base = answers(texts, tokens, {})
            mixed = answers(texts, tokens, {"mix": list(MIX)})
            metric = adapter.report["eval"]["metric"]
            mix_scores[task_name] = {"metric": metric, "rows": len(rows), "base": round(score(metric, base, references), 4),
                                     "mix": round(score(metric, mixed, references), 4),
                                     "samples": [{"prompt": t, "base": b, "mix": m}
                                                 for t, b, m in list(zip(texts, base, mixed))[:3]]}
        _stderr(f"asked the server in {time.perf_counter() - started:.0f} s")
    return {"table": table, "mix_name": mix_name, "mix": mix_scores}


def demo_results(model_name: str, adapters, served: dict) -> dict:
    tasks = {}
    for adapter in adapters:
        report = adapter.report
        peft = report.get("peft_check") or {}
        tasks[adapter.task.name] = {
            "what": adapter.task.what, "folder": str(adapter.folder), "metric": report["eval"]["metric"],
            "base": report["eval"]["base"], "adapter": report["eval"]["adapter"], "ratio": report["eval"]["ratio"],
            "eval_rows": report["eval"]["rows"], "train_minutes": report["training"]["minutes"],
            "train_steps": report["training"]["steps"],
            "wall_minutes": round(adapter.wall_seconds / 60, 2) if adapter.trained_now else None,
            "adapter_bytes": report["adapter"]["bytes"],
            "peft_equal": f"{peft['equal']}/{peft['prompts']}" if peft else None,
        }
    return {"model": model_name, "tasks": tasks, "mix": {"adapters": dict(MIX), "name": served["mix_name"],
                                                         "scores": served["mix"]},
            "table": served["table"]}


def format_results(results: dict) -> str:
    mix = results["mix"]["scores"]
    lines = [f"{'task':<8} {'metric':<11} {'base':>5} {'adapter':>8} {results['mix']['name']:>13} "
             f"{'train min':>9} {'PEFT equal':>10}"]
    for name, task in results["tasks"].items():
        mixed = f"{mix[name]['mix']:.2f}" if name in mix else "-"
        lines.append(f"{name:<8} {task['metric']:<11} {task['base']:>5.2f} {task['adapter']:>8.2f} {mixed:>13} "
                     f"{task['train_minutes']:>9.1f} {task['peft_equal'] or '-':>10}")
    for prompt, answers in results["table"].items():
        lines += ["", f"> {prompt}"]
        width = max(len(name) for name in answers)
        lines += [f"  {name:<{width}}  {' '.join(text.split())}" for name, text in answers.items()]
    return "\n".join(lines)
