"""Offline builders for PEFT LoRA adapters of the tiny models (fixtures_models).

The adapters are made by PEFT itself from fixed seeds (adapter_config.json and
adapter_model.safetensors, as PEFT saves them), so anything that loads them is exercised
against the real file format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

#: The projections of a Llama-family block an adapter may target.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load_fp32(base_folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()


def build_peft_adapter(
    base_folder: Path,
    out_folder: Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - never mutated
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    scale: float = 0.1,
    **extra_lora_config: Any,
) -> Path:
    """Create a LoRA adapter for the model in ``base_folder`` with PEFT and save it.

    The base model is loaded in float32, wrapped with ``get_peft_model(LoraConfig(...))``,
    and every ``lora_A`` / ``lora_B`` weight (all of them, in sorted-name order) is
    overwritten with seeded ``normal * scale``, so both factors are non-zero. The effective
    delta of a module is ``(lora_alpha / r) * B @ A`` (``lora_alpha / sqrt(r)`` with rslora),
    with the pattern rank/alpha where ``rank_pattern`` / ``alpha_pattern`` match.

    Pattern keys follow PEFT's ``get_pattern_key``: a key matches a module whose full name
    (e.g. ``model.layers.1.mlp.down_proj``) equals the key or ends with ``"." + key``; keys
    are regular expressions, and the first matching key in dict order wins.

    extra_lora_config: passed to ``LoraConfig`` as is (``use_dora=True``,
    ``bias="lora_only"``, ``modules_to_save=["lm_head"]``, ``lora_dropout``...). Parameters
    that are not LoRA factors (DoRA magnitudes, biases, modules_to_save copies) keep PEFT's
    initialisation.

    Writes adapter_config.json and adapter_model.safetensors into ``out_folder`` and
    returns ``out_folder``. Deterministic for a given seed.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
        lora_dropout=extra_lora_config.pop("lora_dropout", 0.0),
        init_lora_weights=extra_lora_config.pop("init_lora_weights", True),
        **extra_lora_config,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = get_peft_model(_load_fp32(Path(base_folder)), config)
    embedding_std = 0.15 if model.config.tie_word_embeddings else 1.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out_folder = Path(out_folder)
    model.save_pretrained(out_folder)
    return out_folder


def make_adapter_zoo(base_folder: Path, root: Path, count: int = 8, seed: int = 0) -> list[Path]:
    """``count`` varied adapters for the model in ``base_folder``, in ``root/adapter-<i>``.

    Cycles through 8 recipes (then repeats them with other seeds):

    0. r=8,  alpha=16, q,v
    1. r=1,  alpha=4,  o
    2. r=16, alpha=32, all seven projections
    3. r=7,  alpha=7,  k, gate, down
    4. r=4,  alpha=8,  q, k, v, o, use_rslora
    5. r=8,  alpha=16, q, v, down; rank_pattern {"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
       alpha_pattern {"q_proj": 2, "model.layers.1.mlp.down_proj": 24}
    6. r=2,  alpha=1,  up, down
    7. r=12, alpha=24, gate, up, v

    Every adapter uses its own seed (``seed + i``).
    """
    recipes: list[dict[str, Any]] = [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=1, lora_alpha=4, target_modules=["o_proj"]),
        dict(r=16, lora_alpha=32, target_modules=list(PROJECTIONS)),
        dict(r=7, lora_alpha=7, target_modules=["k_proj", "gate_proj", "down_proj"]),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
            alpha_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 24},
        ),
        dict(r=2, lora_alpha=1, target_modules=["up_proj", "down_proj"]),
        dict(r=12, lora_alpha=24, target_modules=["gate_proj", "up_proj", "v_proj"]),
    ]
    root = Path(root)
    folders = []
    for index in range(count):
        recipe = recipes[index % len(recipes)]
        folders.append(build_peft_adapter(base_folder, root / f"adapter-{index}", seed=seed + index, **recipe))
    return folders


def adapter_ranks(adapter_folder: Path) -> dict[str, int]:
    """Rank of every LoRA module saved in ``adapter_folder``, keyed by the module name
    without PEFT's prefix (e.g. ``"model.layers.1.mlp.down_proj": 12``)."""
    ranks: dict[str, int] = {}
    with safe_open(str(Path(adapter_folder) / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                ranks[module] = handle.get_slice(key).get_shape()[0]
    return ranks


def read_adapter_config(adapter_folder: Path) -> dict[str, Any]:
    """adapter_config.json of ``adapter_folder`` as a dict."""
    return json.loads((Path(adapter_folder) / "adapter_config.json").read_text())


def rewrite_tensors(folder: Path, change) -> None:
    """Apply change(tensors) to an adapter folder's safetensors dict and write it back."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
