"""GPU path: paged attention over a block-table KV cache as one Triton kernel.

Semantics: as `reference.py` (`paged_attention_reference`):
    for each query token t (sequence s = token_seqs[t], position pos = token_positions[t])
    and query head h (kv head h // (H // KVH)):
        keys p with lo <= p <= pos, lo = 0 (no window) or max(0, pos - window + 1)
        out[t, h] = softmax(scale * q[t, h] . K[s, lo:pos+1, kvh]) @ V[s, lo:pos+1, kvh]

Grid: (query token, kv head). A program holds the G = H // KVH query heads that share
its kv head as one [BLOCK_G, BLOCK_D] tile (G padded to a power of two >= 16, head_dim
padded to a power of two >= 16, both masked), so every key is read once per group. It
walks the token's keys BLOCK_N positions at a time from the window's first key to pos;
each position finds its cache block through the block table (so any block size works,
smaller or larger than BLOCK_N), and the tile's scores update an online softmax in float32
(running max, running sum, rescaled float32 accumulator).

Under TRITON_INTERPRET=1 (tests without a GPU) bf16/fp16 `tl.dot` is wrong in the
interpreter, so operands are upcast to float32 there (`UPCAST`). float32 inputs use IEEE
dots (no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # key positions per inner-loop step
LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    block_tables_ptr, token_seqs_ptr, token_positions_ptr,
    qk_scale, window, group, head_dim,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ko, stride_kh, stride_kd,
    stride_vb, stride_vo, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bts, stride_btb,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(token_seqs_ptr + token).to(tl.int64)
    pos = tl.load(token_positions_ptr + token)  # int32
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)

    offs_g = tl.arange(0, BLOCK_G)  # [BG] query head within the group
    mask_g = offs_g < group
    heads = kv_head * group + offs_g  # [BG]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask_d = offs_d < head_dim
    q = tl.load(
        q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    )  # [BG, BD]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # running sum of p * v
    table = block_tables_ptr + seq * stride_bts
    for n0 in range((lo // BLOCK_N) * BLOCK_N, pos + 1, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        valid = (offs_n >= lo) & (offs_n <= pos)  # [BN]
        block = tl.load(table + (offs_n // BLOCK_SIZE) * stride_btb, mask=valid, other=0)
        block = block.to(tl.int64)  # [BN] cache block of each key
        within = offs_n % BLOCK_SIZE  # [BN] offset in its block
        k = tl.load(
            k_ptr + block[None, :] * stride_kb + within[None, :] * stride_ko
            + kv_head * stride_kh + offs_d[:, None] * stride_kd,
            mask=valid[None, :] & mask_d[:, None], other=0.0,
        )  # [BD, BN]
        v = tl.load(
            v_ptr + block[:, None] * stride_vb + within[:, None] * stride_vo
            + kv_head * stride_vh + offs_d[None, :] * stride_vd,
            mask=valid[:, None] & mask_d[None, :], other=0.0,
        )  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee")  # [BG, BN] float32
        else:
            scores = tl.dot(q, k)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        # Every step holds at least one valid key (the loop starts at lo's tile, stops at
        # pos), so m_new is finite and the first step's alpha is exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BG]
        alpha = tl.exp2(m_i - m_new)  # [BG]
        p = tl.exp2(scores - m_new[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]  # [BG, BD]
    tl.store(
        o_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :],
    )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seqs: torch.Tensor,
    token_positions: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query token over its own sequence's cached keys.

    Semantics: as `paged_attention_reference` (reference.py); softmax and
    accumulation in float32.

    q:               [T, H, D]
    k_cache/v_cache: [num_blocks, block_size, KVH, D] (any strides)
    block_tables:    [S, max_blocks] int64 or int32
    token_seqs:      [T] row of block_tables for each query token
    token_positions: [T] the query's position (it attends keys 0..pos, or the window)
    returns          [T, H, D] in q's dtype
    """
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if head_dim != k_cache.shape[3] or num_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {tuple(k_cache.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    group = num_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)  # [T, H, D]
    if num_tokens == 0:
        return out
    seqs = token_seqs.to(device=q.device, dtype=torch.int32).contiguous()  # [T]
    positions = token_positions.to(device=q.device, dtype=torch.int32).contiguous()  # [T]
    tables = block_tables.to(q.device)  # [S, max_blocks]
    upcast = _interpreting() and q.dtype != torch.float32
    _paged_attention_kernel[(num_tokens, kv_heads)](
        q, k_cache, v_cache, out,
        tables, seqs, positions,
        scale * LOG2E, sliding_window or 0, group, head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        tables.stride(0), tables.stride(1),
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=sliding_window is not None,
        UPCAST=upcast, IEEE=q.dtype == torch.float32 or upcast,
    )
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step, as `paged_decode_attention`: sequence s's query at position
    context_lens[s] - 1.

    q:            [S, H, D]
    block_tables: [S, max_blocks]
    context_lens: [S] >= 1
    returns       [S, H, D]
    """
    seqs = torch.arange(q.shape[0], device=q.device)  # [S]
    positions = context_lens.to(q.device) - 1  # [S]
    return paged_attention_triton(q, k_cache, v_cache, block_tables, seqs, positions,
                                  sliding_window, scale)


def paged_prefill_attention_triton(
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
    """One sequence's chunk at positions start..start+n-1, as `paged_prefill_attention`.
    k and v ([n, KVH, D]) are not read: the kernel finds the chunk's keys in the cache,
    where they must already be written.

    q:           [n, H, D]
    block_table: [max_blocks]
    returns      [n, H, D]
    """
    del k, v  # the same values are read from the cache
    num_tokens = q.shape[0]
    seqs = torch.zeros(num_tokens, dtype=torch.int32, device=q.device)  # [n]
    positions = torch.arange(start, start + num_tokens, dtype=torch.int32, device=q.device)  # [n]
    return paged_attention_triton(q, k_cache, v_cache, block_table.view(1, -1), seqs, positions,
                                  sliding_window, scale)
