"""Decoder building blocks: RMSNorm, rotary embedding, attention over the slot KV cache, MLP.

Every projection is an NF4Linear followed by the step's LoRA hook:
`y = proj(x); lora.add_(y, x, layer, name)`.
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, projections: dict[str, NF4Linear]):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.q_proj, self.k_proj = projections["q_proj"], projections["k_proj"]
        self.v_proj, self.o_proj = projections["v_proj"], projections["o_proj"]

    def forward(self, x, cos, sin, batch: ForwardBatch, cache: KVCache, lora: LoraHook | None):
        """x: [T, hidden] -> [T, hidden]"""
        tokens = x.shape[0]
        q = _project(self.q_proj, x, lora, self.layer, "q_proj").view(tokens, self.num_heads, self.head_dim)
        k = _project(self.k_proj, x, lora, self.layer, "k_proj").view(tokens, self.num_kv_heads, self.head_dim)
        v = _project(self.v_proj, x, lora, self.layer, "v_proj").view(tokens, self.num_kv_heads, self.head_dim)
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
    def __init__(self, layer: int, projections: dict[str, NF4Linear]):
        super().__init__()
        self.layer = layer
        self.gate_proj, self.up_proj = projections["gate_proj"], projections["up_proj"]
        self.down_proj = projections["down_proj"]

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]"""
        gate = _project(self.gate_proj, x, lora, self.layer, "gate_proj")  # [T, inter]
        up = _project(self.up_proj, x, lora, self.layer, "up_proj")  # [T, inter]
        return _project(self.down_proj, F.silu(gate) * up, lora, self.layer, "down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, projections: dict[str, NF4Linear],
                 input_norm: torch.Tensor, post_attention_norm: torch.Tensor):
        super().__init__()
        self.input_layernorm = RMSNorm(input_norm, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, projections)
        self.post_attention_layernorm = RMSNorm(post_attention_norm, config.rms_norm_eps)
        self.mlp = MLP(layer, projections)

    def forward(self, hidden, cos, sin, batch, cache, lora):
        """hidden: [T, hidden] -> [T, hidden]"""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, batch, cache, lora)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), lora)
