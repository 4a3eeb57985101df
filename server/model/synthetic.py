"""Random-weight Llama checkpoints of a chosen size, for measuring speed at sizes no
embedded model has (``--model synthetic:1b``).

The folder written is an ordinary Hugging Face Llama checkpoint: config.json,
generation_config.json, bf16 safetensors shards with their index, and SmolLM2's tokenizer
(read from the embedded GGUF), so every system that loads a Llama folder loads it. The
weights are seeded normals (std 0.02; norms 1.0), drawn tensor by tensor from a generator
seeded by the tensor's name: the same size and seed give the same bytes whatever the
sharding. Its text is gibberish; its arithmetic is that of a real model of this shape.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_VERSION = 1  # bump when the shapes, the values or the files written change
WEIGHT_STD = 0.02
SHARD_BYTES = 512 * 2**20  # bf16 bytes per safetensors shard (at least one tensor each)


@dataclass(frozen=True)
class SyntheticShape:
    """A Llama decoder's shape; vocab 49152 = SmolLM2's tokenizer."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int = 49152
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden {self.hidden_size}, heads {self.num_heads} and KV heads "
                             f"{self.num_kv_heads} must divide evenly")
        if self.hidden_size % 64 or self.intermediate_size % 64:
            raise ValueError("hidden and intermediate sizes must be multiples of 64 (the NF4 block)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every stored tensor, in file order; the lm_head is tied to the
        embedding, so it is not stored."""
        hidden, inter, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab_size, hidden)
        for index in range(self.num_layers):
            layer = f"model.layers.{index}."
            yield layer + "input_layernorm.weight", (hidden,)
            yield layer + "self_attn.q_proj.weight", (hidden, hidden)
            yield layer + "self_attn.k_proj.weight", (kv, hidden)
            yield layer + "self_attn.v_proj.weight", (kv, hidden)
            yield layer + "self_attn.o_proj.weight", (hidden, hidden)
            yield layer + "post_attention_layernorm.weight", (hidden,)
            yield layer + "mlp.gate_proj.weight", (inter, hidden)
            yield layer + "mlp.up_proj.weight", (inter, hidden)
            yield layer + "mlp.down_proj.weight", (hidden, inter)
        yield "model.norm.weight", (hidden,)

    @property
    def num_parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensor_shapes())

    def config_dict(self, token_ids: dict[str, int | None]) -> dict:
        """config.json of a LlamaForCausalLM; token_ids: bos/eos/pad_token_id."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "initializer_range": WEIGHT_STD,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            **token_ids,
        }


# 1b: TinyLlama-1.1B's layout with 8 KV heads and SmolLM2's vocabulary: 1,092,708,352
# parameters (992 M in the 22 layers' projections, 101 M in the tied embedding).
SIZES: dict[str, SyntheticShape] = {
    "1b": SyntheticShape(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=8),
    # tiny: 3.3 M parameters, 6.6 MB (mostly the embedding), for tests
    "tiny": SyntheticShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
}


def synthetic_size(spec: str) -> str | None:
    """The size named by ``synthetic:<size>``; None when ``spec`` is not a synthetic spec.
    Raises ValueError for an unknown size."""
    if not spec.startswith(SYNTHETIC_PREFIX):
        return None
    size = spec[len(SYNTHETIC_PREFIX):].strip().lower()
    if size not in SIZES:
        raise ValueError(f"unknown synthetic model size {size!r} in {spec!r}; known: "
                         + ", ".join(f"{SYNTHETIC_PREFIX}{name}" for name in SIZES))
    return size


def cache_key(size: str, seed: int = 0) -> str:
    return f"synthetic-{size}-seed{seed}-v{SYNTHETIC_VERSION}"


def write_synthetic(size: str, out: Path, tokenizer_gguf: Path, *, seed: int = 0,
                    log: Callable[[str], None] = lambda line: None) -> None:
    """Write the ``size`` checkpoint into the new folder ``out``: SmolLM2's tokenizer (from
    ``tokenizer_gguf``), config.json, generation_config.json, then the weights."""
    shape = SIZES[size]
    out.mkdir(parents=True)
    token_ids = _write_tokenizer(tokenizer_gguf, out)
    (out / "config.json").write_text(json.dumps(shape.config_dict(token_ids), indent=2) + "\n")
    generation = {**token_ids, "do_sample": False, "max_new_tokens": 32}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    log(f"writing {SYNTHETIC_PREFIX}{size}: {shape.num_parameters / 1e9:.3f} B parameters, "
        f"{2 * shape.num_parameters / 2**30:.2f} GiB bf16 ...")
    write_weights(shape, out, seed=seed, log=log)


def write_weights(shape: SyntheticShape, out: Path, *, seed: int = 0,
                  log: Callable[[str], None] = lambda line: None) -> None:
    """The seeded bf16 weights of ``shape`` as safetensors shards plus their index, into the
    existing folder ``out``, shard by shard (peak memory: one shard, ~0.5 GB)."""
    from safetensors.torch import save_file

    shards = _plan_shards(list(shape.tensor_shapes()))
    started = time.monotonic()
    weight_map: dict[str, str] = {}
    for number, names_shapes in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, tensor_shape, seed) for name, tensor_shape in names_shapes}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        del tensors
        if len(shards) > 1:
            log(f"  shard {number}/{len(shards)} [{time.monotonic() - started:.0f} s]")
    index = {"metadata": {"total_size": 2 * shape.num_parameters}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights are ones; every matrix is normal(0, WEIGHT_STD) in bf16, drawn from a
    generator seeded by (seed, name), so its bytes do not depend on the write order."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=generator)


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most SHARD_BYTES (bf16)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensors:
        size = 2 * _numel(shape)
        if shards[-1] and filled + size > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += size
    return shards


def _write_tokenizer(gguf: Path, out: Path) -> dict[str, int | None]:
    """SmolLM2's tokenizer, as the embedded model's conversion saves it; returns its
    bos/eos/pad token ids (eos = <|im_end|>, the chat turn end)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
