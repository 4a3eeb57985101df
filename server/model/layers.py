"""Decoder building blocks: RMSNorm, rotary embedding, attention over the paged KV cache, MLP.

Every projection is an NF4Linear that adds the step's LoRA deltas itself: `y = proj(x, lora)`
(on CPU one fused NF4 + LoRA kernel call; else a GEMM, then the LoRA hook per output).
Projections that read the same input (q/k/v, gate/up) run as one NF4 weight, each output
still getting its own LoRA delta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraquilt.kernels.layer_ops import add_rms_norm, rotary
from loraquilt.kernels.attention import paged_decode, paged_prefill
from loraquilt.server.model.batch import ForwardBatch, LoraHook
from loraquilt.server.model.config import ModelConfig
from loraquilt.server.model.kv_cache import KVCache
from loraquilt.server.model.nf4 import NF4Linear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; normalised in float32, scaled in x's dtype (as transformers)."""
        return add_rms_norm(x, None, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """residual += delta (in place), then the norm of it: [T, hidden] each."""
        return add_rms_norm(residual, delta, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, scaling = config.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [head_dim/2]
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, head_dim]"""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class ProjectionGroup(nn.Module):
    """Projections that read the same input (q/k/v, gate/up): one fused NF4 GEMM when their
    blocks align (bit-identical values), else one GEMM each. Each output then gets its own
    LoRA delta, on its columns of the fused output."""

    def __init__(self, layer: int, linears: list[NF4Linear], fuse: bool = True):
        super().__init__()
        self.layer = layer
        self.names = tuple(name for linear in linears for name, _ in linear.parts)
        fused = NF4Linear.fuse(linears) if fuse and len(linears) > 1 else None
        self.linears = nn.ModuleList([fused] if fused is not None else linears)
        for linear in self.linears:
            linear.layer = layer

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> list[torch.Tensor]:
        """x: [T, in] -> one [T, out_i] output per projection, in `names` order (column
        views of one [T, sum(out_i)] tensor when fused), LoRA deltas included."""
        outputs = []
        for linear in self.linears:
            y = linear(x, lora)  # [T, sum of its parts' out]
            start = 0
            for _, size in linear.parts:
                outputs.append(y[:, start : start + size] if len(linear.parts) > 1 else y)
                start += size
        return outputs


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, projections: dict[str, NF4Linear], fuse: bool = True):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.qkv = ProjectionGroup(layer, [projections[n] for n in ("q_proj", "k_proj", "v_proj")], fuse)
        self.o_proj = projections["o_proj"]
        self.o_proj.layer = layer

    def forward(self, x, cos, sin, batch: ForwardBatch, cache: KVCache, lora: LoraHook | None):
        """x: [T, hidden] -> [T, hidden]"""
        tokens = x.shape[0]
        q, k, v = self.qkv(x, lora)  # [T, H*D], [T, KVH*D], [T, KVH*D]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, cos, sin)  # in place on the projection's output where it can
        cache.write(self.layer, batch.slot_mapping, k, v)
        k_cache, v_cache = cache.layer(self.layer)  # [blocks, block_size, KVH, D] each

        decodes = batch.num_decodes
        if decodes == tokens:  # a decode-only step: no copy of the output
            out = paged_decode(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens,
                               self.sliding_window)
            return self.o_proj(out.reshape(tokens, -1), lora)
        out = torch.empty_like(q)  # [T, H, D]
        if decodes:
            out[:decodes] = paged_decode(q[:decodes], k_cache, v_cache, batch.decode_block_tables,
                                         batch.decode_context_lens, self.sliding_window)
        for span in batch.prefills:
            rows = slice(span.token_start, span.token_end)
            out[rows] = paged_prefill(q[rows], k[rows], v[rows], k_cache, v_cache, span.block_table,
                                      span.cache_start, self.sliding_window)
        return self.o_proj(out.view(tokens, -1), lora)


class MLP(nn.Module):
    def __init__(self, layer: int, projections: dict[str, NF4Linear], fuse: bool = True):
        super().__init__()
        self.layer = layer
        self.gate_up = ProjectionGroup(layer, [projections["gate_proj"], projections["up_proj"]], fuse)
        self.down_proj = projections["down_proj"]
        self.down_proj.layer = layer

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]"""
        gate, up = self.gate_up(x, lora)  # [T, inter] each
        return self.down_proj(F.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, projections: dict[str, NF4Linear],
                 input_norm: torch.Tensor, post_attention_norm: torch.Tensor, fuse: bool = True):
        """fuse: q/k/v and gate/up as one NF4 GEMM each (bit-identical values)"""
        super().__init__()
        self.input_layernorm = RMSNorm(input_norm, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, projections, fuse)
        self.post_attention_layernorm = RMSNorm(post_attention_norm, config.rms_norm_eps)
        self.mlp = MLP(layer, projections, fuse)

    def quantized_linears(self) -> list[NF4Linear]:
        """Every NF4 module of the layer (a fused one counts once)."""
        return [*self.self_attn.qkv.linears, self.self_attn.o_proj, *self.mlp.gate_up.linears,
                self.mlp.down_proj]

    def forward(self, residual, normed, cos, sin, batch, cache, lora, next_norm: RMSNorm) -> torch.Tensor:
        """residual: [T, hidden], the stream, updated in place (+ attention, + MLP);
        normed: this layer's input norm of it. Returns next_norm of the updated stream (the
        next layer's input norm, or the final norm): each residual add shares a call with
        the norm that follows it."""
        normed = self.post_attention_layernorm.add_and_norm(
            residual, self.self_attn(normed, cos, sin, batch, cache, lora))
        return next_norm.add_and_norm(residual, self.mlp(normed, lora))
