"""One training run, start to end: data -> QLoRA model -> loop -> PEFT folder -> eval
through loraquilt's engine -> report."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Callable

from loraquilt.train.config import TrainConfig, resolve_runtime
from loraquilt.train.data import (
    Example, eos_token_id, invocation_ids, read_examples, split_held_out, tokenize,
)
from loraquilt.train.report import REPORT_NAME, build_report, eval_section, summary_line, write_json

TRAINED_NAME = "trained"  # the adapter's name on the evaluation engine


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_splits(config: TrainConfig) -> tuple[list[Example], list[Example], str]:
    """(train, eval, where eval came from)."""
    train_rows = read_examples(config.data)
    if config.eval_data is not None:
        return train_rows, read_examples(config.eval_data), str(config.eval_data)
    train_rows, eval_rows = split_held_out(train_rows, config.seed)
    return train_rows, eval_rows, f"{len(eval_rows)} rows held out of {config.data} (seed {config.seed})"


def train_adapter(config: TrainConfig, *, log: Callable[[str], None] = _stderr, engine=None) -> dict:
    """Train, save the PEFT folder into `config.out`, evaluate, write and return the report.

    engine: an evaluation engine already holding the same base model (reused, e.g. by a
    rank sweep); None opens one after training.
    """
    import torch
    from transformers import AutoTokenizer

    from loraquilt.server.model.sources import resolve_model
    from loraquilt.train.evaluate import measure, open_engine
    from loraquilt.train.loop import eval_loss, planned_steps, train
    from loraquilt.train.qlora import build_optimizer, build_qlora_model, trainable_parameters

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    runtime = resolve_runtime(config)
    source = resolve_model(config.model, log=log)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)
    train_rows, eval_rows, eval_source = load_splits(config)
    eval_rows = eval_rows[:config.max_eval_rows]
    eos = eos_token_id(tokenizer)
    train_tokens = [tokenize(tokenizer, e, eos, config.max_length) for e in train_rows]
    eval_tokens = [tokenize(tokenizer, e, eos, config.max_length) for e in eval_rows]
    truncated = sum(t.truncated for t in train_tokens)
    if truncated:
        log(f"warning: {truncated} of {len(train_tokens)} training rows cut to --max-length {config.max_length}")
    lengths = [len(t.input_ids) for t in train_tokens]
    steps = planned_steps(len(train_tokens), config.batch_size, config.epochs, config.max_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(20, steps // 20)
    log(f"train: {len(train_tokens)} rows ({'chat' if train_rows[0].is_chat else 'prompt'} format, "
        f"{min(lengths)}-{max(lengths)} tokens), eval: {len(eval_rows)} rows; {steps} steps of "
        f"{config.batch_size}; rank {config.rank}, alpha {config.alpha:g} on {','.join(config.targets)}")

    torch.manual_seed(config.seed)
    invocation = None
    if config.alora_invocation is not None:
        invocation = invocation_ids(tokenizer, config.alora_invocation, train_tokens + eval_tokens)
        log(f"activated LoRA: invocation {config.alora_invocation!r} = tokens {invocation}")
    model = build_qlora_model(source.folder, config, runtime, invocation)
    trainable = trainable_parameters(model)
    log(f"QLoRA on {source.name}: NF4 base ({runtime.frozen_base} on {runtime.device}, "
        f"{runtime.compute_dtype}), gradient checkpointing {'on' if runtime.gradient_checkpointing else 'off'}, "
        f"{trainable:,} trainable parameters, {runtime.optimizer}")
    optimizer = build_optimizer(model, config, runtime)
    stats = train(model, optimizer, train_tokens, batch_size=config.batch_size, steps=steps, warmup=warmup,
                  seed=config.seed, pad_id=pad_id, device=runtime.device, scale_range=config.scale_range,
                  progress=config.progress)
    loss = eval_loss(model, eval_tokens, batch_size=config.batch_size, pad_id=pad_id, device=runtime.device)
    with model.disable_adapter():
        loss_base = eval_loss(model, eval_tokens, batch_size=config.batch_size, pad_id=pad_id,
                              device=runtime.device)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / REPORT_NAME).unlink(missing_ok=True)  # a report always describes the files beside it
    model.save_pretrained(str(config.out))
    log(f"trained in {stats.seconds / 60:.1f} min; eval loss {loss_base:.3f} (base) -> {loss:.3f}; "
        f"saved {config.out}")
    del model, optimizer
    gc.collect()

    started = time.perf_counter()
    own_engine = engine is None
    if own_engine:
        engine = open_engine(source.folder, max_lora_rank=config.rank)
    engine.register_adapter(TRAINED_NAME, config.out)
    try:
        base = measure(engine, eval_rows, config.metric, max_new_tokens=config.max_new_tokens)
        tuned = measure(engine, eval_rows, config.metric, max_new_tokens=config.max_new_tokens,
                        adapter=TRAINED_NAME)
        log(f"{config.metric} on {len(eval_rows)} eval rows: base {base.rate:.2f}, adapter {tuned.rate:.2f} "
            f"({time.perf_counter() - started:.0f} s)")
        peft_check = None
        if config.check_peft:
            from loraquilt.train.peft_check import compare_with_peft

            peft_check = compare_with_peft(engine, TRAINED_NAME, source.folder, config.out,
                                           eval_rows[:config.peft_check_prompts])
            log(f"PEFT check: {peft_check['equal']}/{peft_check['prompts']} prompts give equal greedy tokens")
    finally:
        engine.unregister_adapter(TRAINED_NAME)
    data = {
        "train_file": str(config.data), "train_rows": len(train_tokens),
        "format": "chat" if train_rows[0].is_chat else "prompt",
        "tokens_per_row": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
        "truncated_rows": truncated,
    }
    evaluation = eval_section(eval_rows, loss_base, loss, base, tuned, config.max_new_tokens, eval_source)
    report = build_report(config=config, runtime=runtime, model_name=source.name, model_folder=source.folder,
                          trainable=trainable, data=data, stats=stats, evaluation=evaluation,
                          peft_check=peft_check)
    write_json(config.out / REPORT_NAME, report)
    log(f"report: {config.out / REPORT_NAME}\n  {summary_line(report)}")
    return report
