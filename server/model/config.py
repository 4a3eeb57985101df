"""What the engine needs to know about a Llama-family checkpoint, read from its config.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one decoder; `hf_config` keeps the original for RoPE init."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    hidden_act: str
    hf_config: PretrainedConfig

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu only)")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection, as its weight is stored."""
        shapes = {
            "q_proj": (self.q_size, self.hidden_size),
            "k_proj": (self.kv_size, self.hidden_size),
            "v_proj": (self.kv_size, self.hidden_size),
            "o_proj": (self.hidden_size, self.q_size),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }
        if name not in shapes:
            raise KeyError(f"unknown projection {name!r}; known: {', '.join(PROJECTIONS)}")
        return shapes[name]

    def projection_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        if name == "o_proj":
            return self.o_bias
        return self.mlp_bias

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim/2] and the cos/sin scaling of the configured RoPE type
        (default, llama3, linear, dynamic-at-init, yarn...), computed the way transformers does."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(self.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0))
            dim = self.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            return inv_freq, 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, "cpu")


def model_config_from_hf(hf: PretrainedConfig) -> ModelConfig:
    model_type = hf.model_type
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    sliding_window = getattr(hf, "sliding_window", None)
    if model_type == "qwen2":
        layer_types = getattr(hf, "layer_types", None) or []
        if not getattr(hf, "use_sliding_window", False) or "sliding_attention" not in layer_types:
            sliding_window = None
        elif any(kind != "sliding_attention" for kind in layer_types):
            raise ValueError("Qwen2 checkpoints mixing sliding and full attention layers are not supported")
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        qkv_bias=True if model_type == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        o_bias=False if model_type == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=sliding_window,
        hidden_act=getattr(hf, "hidden_act", "silu"),
        hf_config=hf,
    )


def load_model_config(folder: Path) -> ModelConfig:
    return model_config_from_hf(AutoConfig.from_pretrained(folder))
