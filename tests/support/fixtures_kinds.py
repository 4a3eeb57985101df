"""Adapters of every kind on one tiny base (for the tests that batch them together on the
CPU and on CUDA): DoRA, own embeddings and lm_head, aLoRA, and plain ones to mix and merge;
and one request per kind."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures_models import build_peft_adapter, build_tiny_model
from safetensors.torch import load_file, save_file

from loraquilt.server.adapters.merge import MergeSpec
from loraquilt.server.request import Request, SamplingParams

INVOCATION = [11, 12, 13]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def redraw_tables(folder: Path, seed: int) -> None:
    """PEFT saves modules_to_save copies equal to the base's: move them."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(tensors):
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=generator) * 0.3
    save_file(tensors, str(path), metadata={"format": "pt"})


def build_kinds(root: Path) -> tuple[Path, dict[str, Path]]:
    """(base folder, adapter folders by name) under root."""
    base = build_tiny_model(root / "base", "llama", seed=27)
    folders = {
        "dora": build_peft_adapter(base, root / "dora", r=8, lora_alpha=16, seed=81, scale=0.2, use_dora=True,
                                   target_modules=TARGETS),
        "heads": build_peft_adapter(base, root / "heads", r=4, lora_alpha=8, seed=82, scale=0.2,
                                    modules_to_save=["embed_tokens", "lm_head"]),
        "alora": build_peft_adapter(base, root / "alora", r=8, lora_alpha=16, seed=83, scale=0.3,
                                    target_modules=TARGETS, alora_invocation_tokens=INVOCATION),
        "p0": build_peft_adapter(base, root / "p0", r=8, lora_alpha=16, seed=84, scale=0.3, target_modules=TARGETS),
        "p1": build_peft_adapter(base, root / "p1", r=4, lora_alpha=8, seed=85, scale=0.3,
                                 target_modules=["q_proj", "v_proj", "down_proj"]),
        "p2": build_peft_adapter(base, root / "p2", r=6, lora_alpha=12, seed=86, scale=0.3,
                                 target_modules=["k_proj", "o_proj", "up_proj"]),
    }
    redraw_tables(folders["heads"], 87)
    return base, folders


def kind_requests(new_tokens: int = 8, logprobs: int | None = None) -> list[Request]:
    """A DoRA row, an own-tables row, an aLoRA row (invocation mid-prompt), a ties merge, a
    plain row, a linear mix and a base row; prompts of 15-39 tokens."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
    ids = lambda *parts: tuple(token for part in parts for token in part)  # noqa: E731
    return [
        Request(prompt_token_ids=ids(range(40, 70)), adapter="dora", sampling=sampling),
        Request(prompt_token_ids=ids(range(70, 90)), adapter="heads", sampling=sampling),
        Request(prompt_token_ids=ids(range(90, 120), INVOCATION, range(20, 26)), adapter="alora", sampling=sampling),
        Request(prompt_token_ids=ids(range(30, 55)), mix=(("p0", 0.6), ("p1", 0.5), ("p2", 0.4)),
                merge=MergeSpec("ties", density=0.5), sampling=sampling),
        Request(prompt_token_ids=ids(range(55, 80)), adapter="p0", sampling=sampling),
        Request(prompt_token_ids=ids(range(60, 75)), mix=(("p1", 0.7), ("p2", 0.3)), sampling=sampling),
        Request(prompt_token_ids=ids(range(100, 130)), sampling=sampling),
    ]


def run_observing_batches(engine, requests: list[Request]) -> tuple[list, list[int]]:
    """engine.generate(requests), and the rows of each step (seen around the real runner)."""
    sizes, execute = [], engine.runner.execute

    def observed(decodes, prefills):
        sizes.append(len(decodes) + len(prefills))
        return execute(decodes, prefills)

    engine.runner.execute = observed
    try:
        return engine.generate(requests), sizes
    finally:
        engine.runner.execute = execute
