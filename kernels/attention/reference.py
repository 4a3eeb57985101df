"""Paged attention over a block-table KV cache (one layer): the semantics every version
implements, and the ground truth.

Cache layout: `cache.py`.

Semantics:
    for each query token t (sequence s = token_seqs[t], position pos = token_positions[t])
    and query head h (kv head h // (H // KVH)):
        keys p with lo <= p <= pos, lo = 0 (sliding_window None) or max(0, pos - w + 1)
        scores[p] = scale * q[t, h] . K[s, p, kvh]            (scale = head_dim ** -0.5)
        out[t, h] = softmax(scores) @ V[s, lo:pos+1, kvh]     (softmax in float32)
    out has q's dtype.

`paged_attention_reference`: the slowest obvious loop, float32 math; the ground truth of
the torch (`cpu.py`), compiled CPU (`native.py`) and Triton (`triton_paged.py`) versions.
"""

from __future__ import annotations

import torch

from loraquilt.kernels.attention.cache import check_cache


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seqs: torch.Tensor,
    token_positions: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query token over its own sequence's cached keys, one loop step per
    token, key position and head.

    Semantics: as the module docstring; every key's slot is looked up through the block
    table, one position at a time.

    q:               [T, H, D]
    k_cache/v_cache: [num_blocks, block_size, KVH, D]
    block_tables:    [S, max_blocks]
    token_seqs:      [T] row of block_tables for each query token
    token_positions: [T] the query's position (it attends keys 0..pos, or the window)
    returns          [T, H, D] in q's dtype
    """
    check_cache(q, k_cache, v_cache, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    tables = block_tables.tolist()  # [S][max_blocks]
    seqs = token_seqs.tolist()  # [T]
    positions = token_positions.tolist()  # [T]
    k_rows = k_cache.reshape(-1, kv_heads, head_dim)  # [num_blocks*block_size, KVH, D]
    v_rows = v_cache.reshape(-1, kv_heads, head_dim)  # [num_blocks*block_size, KVH, D]
    out = torch.empty_like(q)  # [T, H, D]
    for t in range(num_tokens):
        table, pos = tables[seqs[t]], positions[t]
        first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        slots = [table[p // block_size] * block_size + p % block_size for p in range(first, pos + 1)]
        k = k_rows[slots].float()  # [n_keys, KVH, D]
        v = v_rows[slots].float()  # [n_keys, KVH, D]
        for h in range(num_heads):
            kvh = h // group
            scores = (k[:, kvh] @ q[t, h].float()) * scale  # [n_keys]
            probs = torch.softmax(scores, dim=0)  # [n_keys]
            out[t, h] = (probs @ v[:, kvh]).to(q.dtype)
    return out
