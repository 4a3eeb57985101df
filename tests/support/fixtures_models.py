"""Offline builders for tiny causal LMs, their tokenizer and PEFT LoRA adapters.

Everything here is generated in-process from fixed seeds: no file is ever fetched from a
hub. The folders written look exactly like the ones published for Llama, Qwen2 and
Mistral checkpoints (config.json, generation_config.json, safetensors weights,
tokenizer.json + tokenizer_config.json + chat_template.jinja), and the adapters are made by
PEFT itself, so anything that loads them is exercised against the real file formats.

Sizes are chosen for NF4 quantization with blocksize 64: every projection's in_features
(hidden_size, num_heads * head_dim, intermediate_size) is a multiple of 64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

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

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
TOKENIZER_VOCAB_SIZE = 400

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURES = ("llama", "qwen2", "mistral")
NF4_BLOCKSIZE = 64

#: ChatML, as used by SmolLM2 and Qwen2 instruct models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: A few short prompts for generation checks.
SAMPLE_PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "The weather today is",
    "Numbers: 1, 2, 3,",
    "def add(a, b):",
    "In the morning the baker",
)

_CORPUS = """\
The little town sat at the bend of a slow river. Every morning the baker opened his shop
before sunrise, and the smell of warm bread drifted over the bridge, past the old mill and
into the market square. Children ran to school with their bags swinging, and the teacher
waited at the door with a cup of tea in her hand.

In the spring the fields turned green and the farmers worked from dawn until dusk. They
planted wheat, corn and potatoes, and they talked about the weather as if it were an old
friend who could not be trusted. When the rain came, it came all at once; when it stayed
away, the river ran low and the boats rested on the mud.

A computer program is a list of instructions. The machine reads each instruction, does
what it says, and moves on to the next one. Programs can add numbers, sort names, draw
pictures and answer questions. A good program is clear, small and tested; a bad one is
long, clever and surprising. def add(a, b): return a + b. for i in range(10): print(i).

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9 are
written the same way in many languages; 42 is the answer, 3.14 is close to pi, and 100%
is everything.

"Where are you going?" asked the fisherman. "To the city," said the traveller, "to see
the lights, the trains and the tall buildings." The fisherman laughed. "The city will still
be there tomorrow. Sit down, have some soup, and tell me about the road."

Questions and answers: What is the capital of France? Paris. What color is the sky on a
clear day? Blue. How many days are in a week? Seven. Who wrote this story? Nobody knows.
The user asks, the assistant answers, and the system sets the rules of the conversation.
"""


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab ~400) on a built-in English corpus and save it.

    Special tokens: ``<|endoftext|>`` (bos, eos and pad), ``<|im_start|>`` and ``<|im_end|>``;
    the chat template is ChatML. No special token is added by ``encode``, so
    ``decode(encode(text)) == text`` for any text (byte-level, no prefix space, no clean-up).
    Deterministic: the same folder contents on every call.

    folder: created if missing; receives tokenizer.json, tokenizer_config.json and
            chat_template.jinja (reload with ``AutoTokenizer.from_pretrained(folder)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


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


def read_adapter_config(adapter_folder: Path) -> dict[str, Any]:
    """adapter_config.json of ``adapter_folder`` as a dict."""
    return json.loads((Path(adapter_folder) / "adapter_config.json").read_text())


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
