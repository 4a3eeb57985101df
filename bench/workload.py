"""The fixed benchmark workload: seeded synthetic PEFT adapters and prompts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SHAPES = {
    # kind: (rank, alpha, target modules)
    "heavy": (16, 32, ALL_PROJECTIONS),
    "recipe": (8, 16, ("q_proj", "v_proj")),
}
WORDS = ("the river city market morning light story people water garden music window road "
         "winter summer history science friend letter evening mountain ocean forest bridge "
         "language machine kitchen village quiet bright ancient careful simple").split()


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # projection -> (out, in)

    @property
    def tag(self) -> str:
        """A folder name for adapters of these shapes ("30L-576x1536"): adapters written for
        one model are never reused for another."""
        out, in_ = self.shapes.get("gate_proj", (0, 0))
        return f"{self.num_layers}L-{in_}x{out}-" + "-".join(f"{o}" for o, _ in self.shapes.values())

    @classmethod
    def from_folder(cls, folder: Path) -> ModelShapes:
        from loraquilt.server.model.config import load_model_config

        config = load_model_config(folder)
        return cls(config.num_layers, {p: config.projection_shape(p) for p in ALL_PROJECTIONS})


def write_adapter(folder: Path, shapes: ModelShapes, kind: str, seed: int, base_name: str = "") -> Path:
    """A PEFT LoRA folder with A, B ~ N(0, 0.02), exactly as PEFT saves one."""
    rank, alpha, targets = ADAPTER_SHAPES[kind]
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for proj in targets:
            out_features, in_features = shapes.shapes[proj]
            group = "self_attn" if proj in ALL_PROJECTIONS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": base_name, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_adapters(model_folder: Path, root: Path, kind: str, count: int, seed: int) -> list[Path]:
    """`count` adapters of a kind under root/<kind>-<i>, reused when already written."""
    shapes = ModelShapes.from_folder(model_folder)
    folders = []
    for index in range(count):
        folder = root / f"{kind}-{index}"
        if not (folder / "adapter_model.safetensors").exists():
            write_adapter(folder, shapes, kind, seed * 100_003 + index)
        folders.append(folder)
    return folders


def make_prompts(tokenizer, count: int, seed: int, min_tokens: int = 16, max_tokens: int = 64) -> list[str]:
    """`count` prompts of min..max tokens (seeded word salad, chat-free)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        target = rng.randint(min_tokens, max_tokens)
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < target:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words))
    return prompts


def _words_to_tokens(tokenizer, rng: random.Random, target: int, limit: int, before: str = "") -> str:
    """Seeded words that add `target`..`limit` tokens to `before` (joined by a space): words
    are drawn until `target` is reached, skipping any that would pass `limit` (unless no
    word fits)."""
    def added(words: list[str]) -> int:
        text = f"{before} {' '.join(words)}" if before else " ".join(words)
        return len(tokenizer(text)["input_ids"]) - base

    base = len(tokenizer(before)["input_ids"]) if before else 0
    words: list[str] = []
    misses = 0
    while (have := added(words)) < target:
        if target - have > 16:  # far from the target: a run of words at once (kept if it fits)
            run = [rng.choice(WORDS) for _ in range((target - have) // 4)]
            if added([*words, *run]) <= target:
                words.extend(run)
                continue
        word = rng.choice(WORDS)
        if added([*words, word]) <= limit or misses >= 4 * len(WORDS):
            words.append(word)
            misses = 0
        else:
            misses += 1
    return " ".join(words)


def make_bounded_prompts(tokenizer, count: int, seed: int, min_tokens: int, max_tokens: int) -> list[str]:
    """`count` seeded word-salad prompts of min..max tokens each (never more than max,
    unlike make_prompts, which may pass it by a word)."""
    rng = random.Random(seed)
    return [_words_to_tokens(tokenizer, rng, rng.randint(min_tokens, max_tokens), max_tokens)
            for _ in range(count)]


@dataclass(frozen=True)
class PrefixPrompt:
    adapter: int  # index among the adapters sharing prefixes
    prefix: str  # the adapter's instruction prefix, the same for all its requests
    prompt: str  # prefix + " " + a tail of its own


def make_prefix_prompts(tokenizer, count: int, adapters: int, prefix_tokens: int,
                        tail_tokens: tuple[int, int], seed: int) -> list[PrefixPrompt]:
    """`count` prompts in round-robin adapter order (request i on adapter i mod `adapters`):
    each adapter's prompts start with one seeded instruction prefix of `prefix_tokens` tokens
    (different per adapter), then a unique tail that adds tail_tokens[0]..tail_tokens[1]
    tokens (seeded lengths)."""
    rng = random.Random(seed)
    prefixes: list[str] = []
    for index in range(adapters):
        header = f"Instruction {index}:"
        need = prefix_tokens - len(tokenizer(header)["input_ids"])
        prefixes.append(f"{header} {_words_to_tokens(tokenizer, rng, need, need, before=header)}")
    low, high = tail_tokens
    prompts, seen = [], set()
    for request in range(count):
        prefix = prefixes[request % adapters]
        tail = _words_to_tokens(tokenizer, rng, rng.randint(low, high), high, before=prefix)
        while tail in seen:
            tail = _words_to_tokens(tokenizer, rng, rng.randint(low, high), high, before=prefix)
        seen.add(tail)
        prompts.append(PrefixPrompt(request % adapters, prefix, f"{prefix} {tail}"))
    return prompts


def build_tiny_model(folder: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """A small random Llama (hidden 128, 2 layers) with a real tokenizer, for --quick runs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def zipf_choices(count: int, population: int, exponent: float, seed: int) -> list[int]:
    """`count` indices in [0, population) drawn with P(i) ∝ 1 / (i + 1)^exponent."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(population)]
    return rng.choices(range(population), weights=weights, k=count)
