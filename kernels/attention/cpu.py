"""Paged attention on the CPU in torch: the decode and prefill fast paths.

Semantics: `reference.py` (`paged_attention_reference`); cache layout: `cache.py`.

- `paged_decode_attention`: one query per sequence (a decode batch), no loop over
  sequences: the keys of every sequence are gathered at once, one `bmm` gives the scores
  over [S, KVH, G, L] (G = H // KVH, K never repeated per head), an additive -inf mask
  bounds each row to its sequence (and window), and `embedding_bag` sums the probability-
  weighted value rows straight out of the cache (values are never gathered).
- `paged_prefill_attention`: one sequence's chunk of new tokens, through
  `scaled_dot_product_attention` (causal on the chunk alone for a first chunk, else on
  the gathered prefix with a boolean mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraquilt.kernels.attention.cache import check_cache, gather_blocks


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step: sequence s's query, at position context_lens[s] - 1, attends its
    context_lens[s] cached keys (the new token's key already written).

    Semantics: `paged_attention_reference` with token_seqs = arange(S),
    token_positions = context_lens - 1. Matmuls run in the cache dtype, softmax in float32.

    Gathers blocks first_block..last_block of every row (last: the longest sequence's;
    first: 0, or the earliest block any row's window reaches), so the work is
    S x the longest context; shorter rows are masked, their padding blocks read anyway.
    Measured (AMD EPYC, 2 cores, a noisy shared VM: least of 80 interleaved calls; S=32,
    H=9, KVH=3, D=64, block_size 16, contexts up to 64 / 256 / 512), per call:
        this (K gathered, transposed, one bmm; V through embedding_bag), 1 | 2 threads:
            fp32 0.43 / 2.4 / 5.6 | 0.43 / 2.4 / 4.2 ms; bf16 0.32 / 1.0 / 2.7 | 0.31 / 1.0 / 2.2 ms
        K and V both gathered and transposed, two bmm:
            fp32 0.48 / 3.7 / 7.9 | 0.47 / 3.2 / 6.4 ms; bf16 0.32 / 1.1 / 3.2 | 0.29 / 1.2 / 2.8 ms
    Slower still: gathering from a kv-head-major view of the cache (index_select copies the
    whole pool first: fp32 9-11 ms at 512), and a block-diagonal query against [S, L, KVH*D]
    keys (close at KVH=3, but KVH times the flops).

    q:               [S, H, D]
    k_cache/v_cache: [num_blocks, block_size, KVH, D] contiguous
    block_tables:    [S, max_blocks]
    context_lens:    [S] >= 1
    returns          [S, H, D] in q's dtype
    """
    check_cache(q, k_cache, v_cache, sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if num_seqs == 0:
        return torch.empty_like(q)
    lens = context_lens.to(device=q.device, dtype=torch.int64)  # [S]
    end_block = -(-int(lens.max()) // block_size)
    first_block = 0
    if sliding_window is not None:
        first_block = max(0, int(lens.min()) - sliding_window) // block_size
    blocks = block_tables[:, first_block:end_block].to(torch.int64)  # [S, nb]
    length = blocks.shape[1] * block_size  # L

    keys = gather_blocks(k_cache, blocks.reshape(-1))  # [S*nb, block_size, KVH, D]
    keys = keys.view(num_seqs, length, kv_heads, head_dim).transpose(1, 2)  # [S, KVH, L, D] view
    keys = keys.reshape(num_seqs * kv_heads, length, head_dim)  # [S*KVH, L, D]
    queries = q.reshape(num_seqs * kv_heads, group, head_dim).to(k_cache.dtype)  # [S*KVH, G, D]
    scores = torch.bmm(queries, keys.transpose(1, 2))  # [S*KVH, G, L]

    key_pos = torch.arange(first_block * block_size, end_block * block_size, device=q.device)  # [L]
    masked = key_pos >= lens[:, None]  # [S, L]
    if sliding_window is not None:
        masked |= key_pos < lens[:, None] - sliding_window
    bias = torch.zeros(num_seqs, length, dtype=torch.float32, device=q.device)  # [S, L]
    bias.masked_fill_(masked, float("-inf"))
    scores = torch.add(bias.view(num_seqs, 1, 1, length),
                       scores.view(num_seqs, kv_heads, group, length), alpha=scale)  # [S, KVH, G, L] fp32
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)  # [S, KVH, G, L]

    # out[s, h] = sum_l probs[s, h, l] * v_cache row (slot(s, l), kvh(h)): one bag per (s, h).
    slots = blocks[:, :, None] * block_size + torch.arange(block_size, device=q.device)  # [S, nb, bs]
    rows = (slots.view(num_seqs, 1, 1, length) * kv_heads
            + torch.arange(kv_heads, device=q.device).view(1, kv_heads, 1, 1))  # [S, KVH, 1, L]
    rows = rows.expand(num_seqs, kv_heads, group, length).reshape(-1)  # [S*H*L]
    offsets = torch.arange(0, num_seqs * num_heads * length, length, device=q.device)  # [S*H]
    out = F.embedding_bag(rows, v_cache.view(-1, head_dim), offsets, mode="sum",
                          per_sample_weights=probs.view(-1))  # [S*H, D]
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start: int,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One sequence's chunk of n new tokens at positions start..start+n-1, each attending
    every earlier key of the sequence and the chunk's own up to itself (or the window).

    Semantics: `paged_attention_reference` with one block-table row, token_seqs = 0,
    token_positions = start + arange(n).

    A first chunk that no window cuts (start == 0 and n <= window) attends only its own
    keys: causal SDPA on k/v directly. Otherwise the sequence's keys are gathered from the
    cache (from the block holding the first key the window lets in) and SDPA gets a
    boolean mask.

    q:               [n, H, D]
    k, v:            [n, KVH, D] the chunk's keys/values, already written into the cache too
    k_cache/v_cache: [num_blocks, block_size, KVH, D]
    block_table:     [max_blocks] the sequence's blocks
    returns          [n, H, D] in q's dtype
    """
    check_cache(q, k_cache, v_cache, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    if num_tokens == 0:
        return torch.empty_like(q)
    queries = q.transpose(0, 1)  # [H, n, D]
    if start == 0 and (sliding_window is None or num_tokens <= sliding_window):
        out = F.scaled_dot_product_attention(
            queries, k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
            is_causal=True, scale=scale, enable_gqa=True,
        )  # [H, n, D]
        return out.transpose(0, 1).contiguous()

    end = start + num_tokens  # keys 0..end-1
    first_key = 0 if sliding_window is None else max(0, start - sliding_window + 1)
    first_block, end_block = first_key // block_size, -(-end // block_size)
    blocks = block_table[first_block:end_block].to(device=k_cache.device, dtype=torch.int64)  # [nb]
    lo, hi = first_key - first_block * block_size, end - first_block * block_size
    keys = gather_blocks(k_cache, blocks).view(-1, kv_heads, head_dim)[lo:hi]  # [L, KVH, D]
    values = gather_blocks(v_cache, blocks).view(-1, kv_heads, head_dim)[lo:hi]  # [L, KVH, D]

    query_pos = torch.arange(start, end, device=q.device)  # [n]
    key_pos = torch.arange(first_key, end, device=q.device)  # [L]
    allowed = key_pos[None, :] <= query_pos[:, None]  # [n, L]
    if sliding_window is not None:
        allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(
        queries, keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )  # [H, n, D]
    return out.transpose(0, 1).contiguous()
