"""The Llama-family causal LM (Llama 2/3, Mistral, SmolLM2, Qwen2) over NF4 projections."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import nn

from loraquilt.server.model.batch import ForwardBatch, LoraHook
from loraquilt.server.model.config import ModelConfig
from loraquilt.server.model.kv_cache import KVCache
from loraquilt.server.model.layers import DecoderLayer, RMSNorm, RotaryEmbedding
from loraquilt.kernels.lora import project_logits
from loraquilt.kernels.nf4 import DequantScratch
from loraquilt.server.model.nf4 import NF4Linear


class CausalLM(nn.Module):
    """Embeddings, norms and lm_head in the compute dtype; every projection NF4."""

    def __init__(self, config: ModelConfig, embed_tokens: torch.Tensor, layers: list[DecoderLayer],
                 final_norm: torch.Tensor, lm_head: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(embed_tokens, requires_grad=False)  # [V, hidden]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(final_norm, config.rms_norm_eps)
        # tied embeddings share the tensor, so memory is counted once
        self.lm_head = self.embed_tokens if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.rotary = RotaryEmbedding(config).to(embed_tokens.device)
        self.dtype_reason = ""  # why this compute dtype was chosen (set by the loader)
        self.nf4_paths = ""  # the NF4 plan in words (set by the loader, CPU)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def quantized_linears(self):
        """Every NF4 module (a fused q/k/v or gate/up module counts once)."""
        for layer in self.layers:
            yield from layer.quantized_linears()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache, lora: LoraHook | None = None) -> torch.Tensor:
        """Run one step; returns next-token logits [N, vocab] (float32) for batch.logits_rows.
        Rows on an adapter with its own input embeddings or lm_head (`lora.has_heads`) use
        those."""
        heads = lora is not None and lora.has_heads
        residual = self.embed_tokens[batch.input_ids]  # [T, hidden], the residual stream
        if heads:
            lora.embed_(residual, batch.input_ids)
        cos, sin = self.rotary(batch.positions, residual.dtype)  # [T, head_dim] each
        normed = self.layers[0].input_layernorm(residual)  # [T, hidden]
        for index, layer in enumerate(self.layers):
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            normed = layer(residual, normed, cos, sin, batch, cache, lora, following)
        last = normed[batch.logits_rows]  # [N, hidden], final-normed
        if heads:
            return lora.head_logits(last, batch.logits_rows, self.lm_head)  # [N, vocab]
        return project_logits(last, self.lm_head)  # [N, vocab] float32

    def dequantized_projections(self, layer: int, names: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, W [out, in] in the compute dtype) for each projection of `names` in `layer`:
        the values its forward multiplies by (DoRA's norms read them). A fused q/k/v or
        gate/up weight is dequantized once for all its parts, one weight at a time."""
        for linear in self.layers[layer].quantized_linears():
            if not any(name in names for name, _ in linear.parts):
                continue
            weight, start = linear.dequantized(), 0  # [sum of the parts' out, in]
            for name, size in linear.parts:
                if name in names:
                    yield name, weight[start : start + size]
                start += size

    def quantized_bytes(self) -> int:
        return sum(linear.quantized_bytes() for linear in self.quantized_linears())

    def quantized_params(self) -> int:
        return sum(linear.num_params for linear in self.quantized_linears())

    def dense_bytes(self) -> int:
        """Bytes of everything kept in the compute dtype (embeddings, norms, lm_head, biases)."""
        seen, total = set(), 0
        for tensor in list(self.parameters()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total

    def num_params(self) -> int:
        dense = {id(p): p.numel() for p in self.parameters()}
        return sum(dense.values()) + self.quantized_params()


def build_projection(config: ModelConfig, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device, scratch: DequantScratch) -> NF4Linear:
    expected = config.projection_shape(name)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{name} weight has shape {tuple(weight.shape)}, config says {expected}")
    if config.projection_bias(name) and bias is None:
        raise ValueError(f"{name} needs a bias for model_type {config.model_type!r}, none in checkpoint")
    return NF4Linear(weight.to(device), None if bias is None else bias.to(device), dtype, scratch, name=name)
