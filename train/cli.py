"""`loraquilt train`: QLoRA fine-tuning of a PEFT LoRA adapter on the NF4 base the server
serves; `--rank-sweep 4,8,16` trains one adapter per rank and tabulates metric and size."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraquilt.train.config import FROZEN_BASES, PROJECTIONS, SWITCHES, TrainConfig
from loraquilt.train.metrics import METRICS
from loraquilt.train.report import write_json

SWEEP_NAME = "rank_sweep.json"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 1, got {text!r}")
    return values


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if names == ("all",):
        return PROJECTIONS
    return names


def add_train_parser(commands, name: str = "train", help_text: str = "QLoRA fine-tuning") -> None:
    parser = commands.add_parser(name, help=help_text, description=(
        "Train a LoRA adapter with QLoRA on the NF4 base loraquilt serves; writes a PEFT folder "
        "and training_report.json (eval loss, task metric of base and adapter)."))
    parser.add_argument("--data", type=Path, required=True,
                        help='JSON lines: {"prompt","completion"} or {"messages": [...]} per row')
    parser.add_argument("--out", type=Path, required=True, help="folder for the PEFT adapter and its report")
    parser.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", type=_targets, default=PROJECTIONS,
                        help=f"comma-separated projections or 'all' (default all: {','.join(PROJECTIONS)})")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps, at most 20")
    parser.add_argument("--eval", dest="eval_data", type=Path,
                        help="held-out rows (default: a seeded 10%% of --data, at most 200 rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-range", type=_float_pair, default=(1.0, 1.0), metavar="LOW,HIGH",
                        help="scale the LoRA deltas by a random factor in [LOW, HIGH] each step; 0.5,1 keeps "
                             "the adapter's behaviour at half weight, for mixes (default 1,1: off)")
    parser.add_argument("--alora-invocation", metavar="TEXT",
                        help="train an activated LoRA: it applies from the last occurrence of TEXT's tokens in a "
                             "prompt on (the KV before them stays the base model's); every prompt must hold them")
    parser.add_argument("--metric", choices=sorted(METRICS), default="exact_match",
                        help="task metric on the eval rows (default exact_match)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per eval answer")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training row (longer are cut)")
    parser.add_argument("--max-eval-rows", type=int, default=256)
    parser.add_argument("--rank-sweep", type=_int_list, metavar="R1,R2,...",
                        help="train one adapter per rank into OUT/rank-R and compare (use with --max-steps)")
    parser.add_argument("--check-peft", action="store_true",
                        help="also load the adapter with PeftModel.from_pretrained and compare greedy outputs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--frozen-base", choices=FROZEN_BASES, default="auto",
                        help="nf4: bitsandbytes 4-bit layers; dequantized: their exact values held dequantized "
                             "(auto: dequantized on CPU, nf4 on CUDA)")
    parser.add_argument("--gradient-checkpointing", choices=SWITCHES, default="auto",
                        help="auto: on for CUDA, off on CPU")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default one per core; 1 is faster while other "
                             "processes keep the cores busy)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_train)


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    fields = dict(
        data=args.data, out=args.out, model=args.model, eval_data=args.eval_data, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, targets=args.targets, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_steps=args.max_steps, warmup_steps=args.warmup_steps, seed=args.seed,
        scale_range=args.scale_range, alora_invocation=args.alora_invocation,
        max_length=args.max_length, metric=args.metric, max_new_tokens=args.max_new_tokens,
        max_eval_rows=args.max_eval_rows, device=args.device, frozen_base=args.frozen_base,
        gradient_checkpointing=args.gradient_checkpointing, check_peft=args.check_peft, threads=args.threads,
        progress=not args.quiet,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _train(args: argparse.Namespace) -> int:
    from loraquilt.server.model.sources import ModelSourceError
    from loraquilt.train.data import DataError

    try:
        if args.rank_sweep:
            rank_sweep(args, args.rank_sweep)
        else:
            from loraquilt.train.run import train_adapter

            train_adapter(config_from_args(args))
    except (DataError, ModelSourceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def rank_sweep(args: argparse.Namespace, ranks: tuple[int, ...]) -> dict:
    """One adapter per rank (alpha scaled with the rank: alpha/rank stays as given for --rank),
    same data, steps and seed; one evaluation engine for all."""
    from loraquilt.server.model.sources import resolve_model
    from loraquilt.train.evaluate import open_engine
    from loraquilt.train.run import train_adapter

    configs = [config_from_args(args, rank=rank, alpha=args.alpha * rank / args.rank, out=args.out / f"rank-{rank}")
               for rank in ranks]  # validates every rank before anything trains
    engine = open_engine(resolve_model(args.model).folder, max_lora_rank=max(ranks))
    rows = []
    for config in configs:
        print(f"--- rank {config.rank} ---", file=sys.stderr, flush=True)
        report = train_adapter(config, engine=engine)
        rows.append({
            "rank": config.rank, "alpha": config.alpha, "folder": str(config.out),
            "adapter_bytes": report["adapter"]["bytes"],
            "trainable_parameters": report["adapter"]["trainable_parameters"],
            "train_minutes": report["training"]["minutes"], "final_loss": report["training"]["final_loss"],
            "eval_loss": report["eval"]["loss"], "metric": report["eval"]["metric"],
            "base": report["eval"]["base"], "adapter": report["eval"]["adapter"],
        })
    sweep = {"ranks": list(ranks), "steps": configs[0].max_steps, "results": rows}
    write_json(args.out / SWEEP_NAME, sweep)
    print(format_sweep(rows))
    print(f"sweep: {args.out / SWEEP_NAME}", file=sys.stderr)
    return sweep


def format_sweep(rows: list[dict]) -> str:
    metric = rows[0]["metric"]
    lines = [f"{'rank':>4}  {'adapter':>10}  {'params':>10}  {'minutes':>7}  {'eval loss':>9}  "
             f"{metric + ' (base -> adapter)':>28}"]
    for row in rows:
        lines.append(f"{row['rank']:>4}  {row['adapter_bytes'] / 1024:>7.0f} KiB  {row['trainable_parameters']:>10,}  "
                     f"{row['train_minutes']:>7.1f}  {row['eval_loss']:>9.3f}  "
                     f"{row['base']:>15.2f} -> {row['adapter']:.2f}")
    return "\n".join(lines)
