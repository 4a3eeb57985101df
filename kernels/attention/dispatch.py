"""The one place that picks a paged attention kernel: Triton for CUDA tensors; on the CPU the
compiled decode kernel where it builds (fp32/bf16 pools), torch otherwise."""

from __future__ import annotations

import torch

from loraquilt.kernels.attention import native
from loraquilt.kernels.attention.cpu import paged_decode_attention, paged_prefill_attention


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """One query per sequence over its blocks. q: [S, H, D]; caches: [blocks, block_size,
    KVH, D]; block_tables: [S, B]; context_lens: [S] -> [S, H, D]"""
    if q.device.type == "cuda":
        from loraquilt.kernels.attention.triton_paged import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    if native.supports(q, k_cache, v_cache):
        return native.paged_decode_attention_native(q, k_cache, v_cache, block_tables, context_lens,
                                                    sliding_window)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sliding_window)


def paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, block_table: torch.Tensor, start: int,
                  sliding_window: int | None) -> torch.Tensor:
    """One sequence's chunk at positions start..start+n-1 (its keys already in the cache).
    q: [n, H, D]; k, v: [n, KVH, D]; block_table: [B] -> [n, H, D]"""
    if q.device.type == "cuda":
        from loraquilt.kernels.attention.triton_paged import paged_prefill_attention_triton

        return paged_prefill_attention_triton(q, k, v, k_cache, v_cache, block_table, start, sliding_window)
    return paged_prefill_attention(q, k, v, k_cache, v_cache, block_table, start, sliding_window)
