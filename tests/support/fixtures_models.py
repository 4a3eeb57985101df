"""Offline builders for tiny causal LMs, and what runs on them: the transformers +
bitsandbytes NF4 reference, greedy decoding and a real Engine.

Everything here is generated in-process from fixed seeds: no file is ever fetched from a
hub. The folders written look exactly like the ones published for Llama, Qwen2 and
Mistral checkpoints (config.json, generation_config.json, safetensors weights,
tokenizer.json + tokenizer_config.json + chat_template.jinja). Their tokenizer is built by
fixtures_tokenizer and their PEFT LoRA adapters by fixtures_adapters; both are re-exported
here, so a test imports a model and its adapters from one module.

Sizes are chosen for NF4 quantization with blocksize 64: every projection's in_features
(hidden_size, num_heads * head_dim, intermediate_size) is a multiple of 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fixtures_adapters import PROJECTIONS, adapter_ranks, build_peft_adapter, make_adapter_zoo, read_adapter_config
from fixtures_tokenizer import (
    CHAT_TEMPLATE, EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, TOKENIZER_VOCAB_SIZE, build_tokenizer,
)

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PROJECTIONS",
    "SAMPLE_PROMPTS",
    "TOKENIZER_VOCAB_SIZE",
    "adapter_ranks",
    "build_peft_adapter",
    "build_tiny_model",
    "build_tokenizer",
    "greedy_tokens",
    "load_nf4_reference",
    "make_adapter_zoo",
    "read_adapter_config",
]

ARCHITECTURES = ("llama", "qwen2", "mistral")
NF4_BLOCKSIZE = 64

#: A few short prompts for generation checks.
SAMPLE_PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "The weather today is",
    "Numbers: 1, 2, 3,",
    "def add(a, b):",
    "In the morning the baker",
)


def _check_nf4_shapes(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value % NF4_BLOCKSIZE:
            raise ValueError(f"{name} {value} must be a multiple of {NF4_BLOCKSIZE} (NF4 blocksize)")


def _randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values, larger than the default init so that
    greedy generations of the random model are varied:

    - Linear weights (projections, lm_head): normal, std 0.15
    - embeddings: normal, std 1.0; 0.15 when tied to lm_head (a large tied embedding makes
      the model copy its last input token)
    - biases (Qwen2 q/k/v): normal, std 0.1
    - RMSNorm weights: 1 + normal * 0.1 (non-trivial, so that a loader ignoring them fails)
    """
    embedding_std = 0.15 if model.config.tie_word_embeddings else 1.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                value = noise * embedding_std
            elif name.endswith("norm.weight") or "layernorm" in name:
                value = 1.0 + noise * 0.1
            elif name.endswith(".bias"):
                value = noise * 0.1
            elif name.endswith(".weight") and param.dim() == 2:
                value = noise * 0.15
            else:
                raise ValueError(f"unexpected parameter {name} {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def build_tiny_model(
    folder: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight causal LM checkpoint folder (safetensors) with its tokenizer.

    arch: "llama" | "qwen2" | "mistral" (Qwen2 has q/k/v biases, filled with non-zero
          random values). vocab_size, bos/eos/pad ids come from ``build_tokenizer``;
          max_position_embeddings 256, rope_theta 10000, rms_norm_eps 1e-5.
    max_shard_size: e.g. "100KB" writes model-0000i-of-0000n.safetensors shards plus
          model.safetensors.index.json; None writes one model.safetensors.
    dtype: dtype of the saved weights (the random values are drawn in float32 first, so
          the same seed gives the same values up to rounding in every dtype).
    config_overrides: extra config fields (e.g. ``{"sliding_window": 8}``).

    Deterministic for a given seed and arguments: llama and mistral share parameter names
    and shapes, so the same seed gives them the same weights (pass different seeds for
    different models). Returns ``folder``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, Qwen2Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in config_classes:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    _check_nf4_shapes(hidden_size, intermediate_size, num_heads, num_kv_heads)

    folder = Path(folder)
    tokenizer = build_tokenizer(folder)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.15,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    fields.update(config_overrides or {})
    config = config_classes[arch](**fields)

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_weights(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False, max_new_tokens=32
    )
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **save_kwargs)
    return folder


def load_nf4_reference(base_folder: Path, *, exact_fp32: bool = True) -> torch.nn.Module:
    """The transformers + bitsandbytes NF4 model of ``base_folder`` on CPU, in eval mode
    (the benchmark's peer loader; see ``loraquilt.bench.peft_peer.load_nf4_model``).

    Every projection becomes ``bnb.nn.Linear4bit`` (NF4, blocksize 64, double
    quantization, float32 compute); embeddings, norms and lm_head stay float32.
    exact_fp32 (default) turns off bitsandbytes' AVX512-BF16 path, which computes in bf16.
    """
    from loraquilt.bench.peft_peer import load_nf4_model

    return load_nf4_model(base_folder, exact_fp32=exact_fp32)


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> list[int]:
    """The greedy continuation of ``prompt``: exactly ``max_new_tokens`` new token ids (eos
    does not stop it)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def tiny_engine(base_folder: Path, adapter_folders=(), **settings):
    """A real Engine on a tiny model (float32, torch LoRA backend, quiet), with the
    adapter folders registered as a0, a1, ... in order; `settings` override EngineConfig."""
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.weights import DeviceConfig

    config = dict(device=DeviceConfig(dtype="float32"), model=str(base_folder), max_lora_rank=16,
                  lora_backend="torch", progress=False)
    config.update(settings)
    engine = Engine(EngineConfig(**config))
    for index, folder in enumerate(adapter_folders):
        engine.register_adapter(f"a{index}", folder)
    return engine


def prefill_logits(engine, prompts: list[list[int]], adapters) -> "torch.Tensor":
    """One prefill step of these prompts, each on its adapter (None: the base), in one
    batch on the engine's model -> their last logits [N, vocab]."""
    from loraquilt.server.adapters.slots import LoraSpan
    from loraquilt.server.model.batch import build_forward_batch, contiguous_tables

    leases = [engine.adapters.acquire([a]).lease if a else None for a in adapters]
    try:
        block_size = engine.cache.block_size
        batch = build_forward_batch(
            prefill_tokens=prompts, prefill_tables=contiguous_tables([len(p) for p in prompts], block_size),
            prefill_starts=[0] * len(prompts), decode_tokens=[], decode_tables=[], decode_positions=[],
            block_size=block_size, device=engine.model.device)
        engine.slots.begin_step([LoraSpan(len(ids), ((lease.slots[0], 1.0),) if lease else ())
                                 for ids, lease in zip(prompts, leases)])
        return engine.model(batch, engine.cache, engine.slots)
    finally:
        engine.slots.end_step()
        for lease in leases:
            if lease:
                engine.adapters.release(lease)
