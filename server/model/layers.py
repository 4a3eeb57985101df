"""Decoder building blocks: RMSNorm, rotary embedding, attention over the slot KV cache, MLP.

Every projection is an NF4Linear followed by the step's LoRA hook:
`y = proj(x); lora.add_(y, x, layer, name)`; projections that read the same input (q/k/v,
gate/up) run as one fused NF4 GEMM, each output still getting its own LoRA delta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D]"""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _project(proj: NF4Linear, x: torch.Tensor, lora: LoraHook | None, layer: int, name: str):
    y = proj(x)
    if lora is not None:
        lora.add_(y, x, layer, name)
    return y


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

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> list[torch.Tensor]:
        """x: [T, in] -> one [T, out_i] output per projection, in `names` order (column
        views of one [T, sum(out_i)] tensor when fused)."""
        outputs = []
        for linear in self.linears:
            y = linear(x)  # [T, sum of its parts' out]
            start = 0
            for name, size in linear.parts:
                part = y[:, start : start + size] if len(linear.parts) > 1 else y
                if lora is not None:
                    lora.add_(part, x, self.layer, name)
                outputs.append(part)
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

    def forward(self, x, cos, sin, batch: ForwardBatch, cache: KVCache, lora: LoraHook | None):
        """x: [T, hidden] -> [T, hidden]"""
        tokens = x.shape[0]
        q, k, v = self.qkv(x, lora)  # [T, H*D], [T, KVH*D], [T, KVH*D]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.write(self.layer, batch.token_cache_slots, batch.positions, k, v)

        out = torch.empty_like(q)  # [T, H, D]
        if batch.num_decodes:
            out[: batch.num_decodes] = self._decode(q[: batch.num_decodes], batch, cache)
        for span in batch.prefills:
            rows = slice(span.token_start, span.token_end)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span.cache_slot, span.cache_start, cache)
        return _project(self.o_proj, out.view(tokens, -1), lora, self.layer, "o_proj")

    def _prefill(self, q, k, v, slot: int, start: int, cache: KVCache) -> torch.Tensor:
        """One sequence's new tokens. q: [n, H, D]; k, v: [n, KVH, D] -> [n, H, D]"""
        n = q.shape[0]
        window = self.sliding_window
        query = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if start == 0 and (window is None or n <= window):
            keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
        else:
            keys = cache.keys[self.layer, slot, :, : start + n]  # [KVH, L, D]
            values = cache.values[self.layer, slot, :, : start + n]
            q_pos = torch.arange(start, start + n, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(start + n, device=q.device).unsqueeze(0)  # [1, L]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            causal = False
        out = F.scaled_dot_product_attention(
            query, keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=causal, enable_gqa=True,
        )  # [1, H, n, D]
        return out.squeeze(0).transpose(0, 1)

    def _decode(self, q: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """All single-token decodes at once over a window of cache slots.

        q: [Dn, H, D] -> [Dn, H, D]. Slots in the window without a decode row compute a
        throw-away row (they see position 0 only)."""
        window_slots, context = batch.decode_mask.shape[0], batch.decode_mask.shape[-1]
        groups = self.num_heads // self.num_kv_heads
        lo = batch.decode_slot_lo
        query = q.new_zeros(window_slots, self.num_kv_heads, groups, self.head_dim)  # [S, KVH, G, D]
        query[batch.decode_local_slots] = q.view(-1, self.num_kv_heads, groups, self.head_dim)
        keys = cache.keys[self.layer, lo : lo + window_slots, :, :context]  # [S, KVH, L, D]
        values = cache.values[self.layer, lo : lo + window_slots, :, :context]
        scores = torch.matmul(query, keys.transpose(-1, -2)) * self.head_dim**-0.5  # [S, KVH, G, L]
        probs = torch.softmax(scores + batch.decode_mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values)  # [S, KVH, G, D]
        return out[batch.decode_local_slots].view(-1, self.num_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, layer: int, projections: dict[str, NF4Linear], fuse: bool = True):
        super().__init__()
        self.layer = layer
        self.gate_up = ProjectionGroup(layer, [projections["gate_proj"], projections["up_proj"]], fuse)
        self.down_proj = projections["down_proj"]

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]"""
        gate, up = self.gate_up(x, lora)  # [T, inter] each
        return _project(self.down_proj, F.silu(gate) * up, lora, self.layer, "down_proj")


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

    def forward(self, hidden, cos, sin, batch, cache, lora):
        """hidden: [T, hidden] -> [T, hidden]"""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, batch, cache, lora)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), lora)
