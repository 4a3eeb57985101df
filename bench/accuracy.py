"""How far the bfloat16 compute dtype moves loraquilt's logits from float32: prefill logits
of the bench prompts on the base model, in process, one engine per dtype.

Run whatever `--dtype auto` resolves to on this machine (on a CPU without native bf16 the
bf16 engine is emulated and slow, so the caller may pass fewer prompts)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def prefill_logits(model_folder: Path, dtype: str, prompts: Sequence[str]) -> torch.Tensor:
    """[len(prompts), vocab] float32: last-token logits of one prefill per prompt (the first
    blocks of the cache, position 0, base model) on an in-process engine computing in ``dtype``."""
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.batch import build_forward_batch, contiguous_tables
    from loraquilt.server.model.weights import DeviceConfig

    engine = Engine(EngineConfig(model=str(model_folder), device=DeviceConfig("cpu", dtype), progress=False,
                                 max_batch_size=1, max_seq_len=256, max_active_adapters=1, max_cpu_adapters=1))
    try:
        model = engine.model
        rows = []
        for prompt in prompts:
            ids = engine.tokenizer(prompt)["input_ids"]
            block_size = engine.cache.block_size
            batch = build_forward_batch(
                prefill_tokens=[ids], prefill_tables=contiguous_tables([len(ids)], block_size), prefill_starts=[0],
                decode_tokens=[], decode_tables=[], decode_positions=[], block_size=block_size,
                device=model.device)
            rows.append(model(batch, engine.cache)[0].float())  # [vocab]
        return torch.stack(rows)
    finally:
        del engine
        gc.collect()


def bf16_vs_fp32(model_folder: Path, prompts: Sequence[str], log: Callable[[str], None]) -> dict:
    """max |logit(bf16) - logit(fp32)| and top-1 agreement over ``prompts``."""
    started = time.perf_counter()
    reference = prefill_logits(model_folder, "float32", prompts)
    log(f"accuracy: float32 logits of {len(prompts)} prompts in {time.perf_counter() - started:.1f} s")
    started_bf16 = time.perf_counter()
    bf16 = prefill_logits(model_folder, "bfloat16", prompts)
    log(f"accuracy: bfloat16 logits in {time.perf_counter() - started_bf16:.1f} s")
    diff = (bf16 - reference).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit_fp32": float(reference.abs().max()),
        "top1_agreement": float((bf16.argmax(-1) == reference.argmax(-1)).float().mean()),
        "prompts": len(prompts),
        "what": "last-token prefill logits, base model, in-process engine, --dtype bfloat16 vs float32",
        "seconds": time.perf_counter() - started,
    }
