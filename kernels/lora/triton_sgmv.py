"""GPU path: SGMV shrink and expand as Triton kernels over slot segments.

Grid of both kernels: (row blocks within a segment, segment[, output column block]).
A program whose row block starts past its segment's end exits at once, so the grid is
sized by the longest segment of the step.

- shrink: t[p, :] = pair_weights[p] * x[pair_rows[p]] @ A[slot].T, t in float32.
- expand: delta[p, :] = t[p] @ B[slot].T, added to y[pair_rows[p]]. When every row has at
  most one pair, each row is written by exactly one program (read-add-store in y's dtype).
  With composition, several pairs hit one row, so they accumulate with float32 atomics
  into a scratch buffer that is then added to y once.

Under TRITON_INTERPRET=1 (tests without a GPU) bf16/fp16 `tl.dot` is wrong in the
interpreter, so operands are upcast to float32 there (`UPCAST`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from loraquilt.kernels.lora.segments import LoraBatchMeta

BLOCK_M = 16
BLOCK_K = 32
BLOCK_N = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    pair_rows_ptr, pair_weights_ptr, seg_indptr_ptr, seg_slot_ptr,
    in_features, rank,
    stride_xm, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg)
    first = start + pid_m * BLOCK_M
    if first >= end:
        return
    offs_m = first + tl.arange(0, BLOCK_M)  # [BM] sorted pair index
    mask_m = offs_m < end
    rows = tl.load(pair_rows_ptr + offs_m, mask=mask_m, other=0)  # [BM]
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # [BM, BK]
        a_tile = tl.load(
            a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_r[None, :] & mask_k[:, None], other=0.0,
        )  # [BK, BR]
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        if IEEE:
            acc += tl.dot(x_tile, a_tile, input_precision="ieee")
        else:
            acc += tl.dot(x_tile, a_tile)
    weights = tl.load(pair_weights_ptr + offs_m, mask=mask_m, other=0.0)  # [BM]
    acc = acc * weights[:, None]
    tl.store(
        t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
        acc, mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def _sgmv_expand_kernel(
    t_ptr, b_ptr, out_ptr,
    pair_rows_ptr, seg_indptr_ptr, seg_slot_ptr,
    out_features, rank,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg)
    first = start + pid_m * BLOCK_M
    if first >= end:
        return
    offs_m = first + tl.arange(0, BLOCK_M)  # [BM] sorted pair index
    mask_m = offs_m < end
    rows = tl.load(pair_rows_ptr + offs_m, mask=mask_m, other=0)  # [BM]
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_features
    t_tile = tl.load(
        t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
        mask=mask_m[:, None] & mask_r[None, :], other=0.0,
    )  # [BM, BR] float32
    b_tile = tl.load(
        b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=mask_n[None, :] & mask_r[:, None], other=0.0,
    )  # [BR, BN]
    if UPCAST:
        b_tile = b_tile.to(tl.float32)
    else:
        t_tile = t_tile.to(b_tile.dtype)
    if IEEE:
        delta = tl.dot(t_tile, b_tile, input_precision="ieee")  # [BM, BN] float32
    else:
        delta = tl.dot(t_tile, b_tile)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, delta, mask=mask)
    else:
        current = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


def _block_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Per-pair weighted shrink.

    Semantics:
        for p in range(P):  t[p] = pair_weights[p] * (x[pair_rows[p]] @ A[slot(p)].T)

    x:      [T, in]
    lora_a: [num_slots, max_rank, in]
    returns t: [P, max_rank] float32, in sorted-pair order
    """
    rank, in_features = lora_a.shape[1], lora_a.shape[2]
    t = torch.empty(meta.num_pairs, rank, dtype=torch.float32, device=x.device)
    if meta.num_pairs == 0:
        return t
    grid = (triton.cdiv(meta.max_segment_len, BLOCK_M), meta.num_segments)
    upcast = _interpreting() and x.dtype != torch.float32
    _sgmv_shrink_kernel[grid](
        x, lora_a, t,
        meta.pair_rows, meta.pair_weights, meta.seg_indptr, meta.seg_slot,
        in_features, rank,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        t.stride(0), t.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_rank(rank), BLOCK_K=BLOCK_K,
        UPCAST=upcast, IEEE=x.dtype == torch.float32 or upcast,
    )
    return t


def lora_expand_triton_(
    y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, meta: LoraBatchMeta
) -> torch.Tensor:
    """Per-pair expand, added into the pair's row.

    Semantics:
        for p in range(P):  y[pair_rows[p]] += t[p] @ B[slot(p)].T   (float32 accumulate)

    y:      [T, out]  updated in place
    t:      [P, max_rank] float32 from `lora_shrink_triton`
    lora_b: [num_slots, out, max_rank]
    """
    if meta.num_pairs == 0:
        return y
    out_features, rank = lora_b.shape[1], lora_b.shape[2]
    atomic = meta.max_pairs_per_row > 1
    target = torch.zeros(y.shape, dtype=torch.float32, device=y.device) if atomic else y
    grid = (
        triton.cdiv(meta.max_segment_len, BLOCK_M),
        meta.num_segments,
        triton.cdiv(out_features, BLOCK_N),
    )
    upcast = _interpreting() and lora_b.dtype != torch.float32
    _sgmv_expand_kernel[grid](
        t, lora_b, target,
        meta.pair_rows, meta.seg_indptr, meta.seg_slot,
        out_features, rank,
        t.stride(0), t.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        target.stride(0), target.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_rank(rank), BLOCK_N=BLOCK_N,
        UPCAST=upcast, IEEE=lora_b.dtype == torch.float32 or upcast, ATOMIC=atomic,
    )
    if atomic:
        y.copy_((y.float() + target).to(y.dtype))
    return y


def lora_add_triton_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """Add each row's (weighted mix of) LoRA deltas to y, in place.

    Semantics: as `lora_add_reference_` (shrink result kept in float32).
    """
    t = lora_shrink_triton(x, lora_a, meta)  # [P, R] float32
    return lora_expand_triton_(y, t, lora_b, meta)
