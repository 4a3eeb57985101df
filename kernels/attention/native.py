"""The compiled CPU paged decode attention (`paged_decode.c`, beside this file): keys and values
read in place from the block pool, one task per sequence over OpenMP threads.

The torch version (`cpu.paged_decode_attention`) gathers every row's key blocks
and transposes them before one bmm: at high concurrency those copies are most of its cost.
Measured (Intel Xeon, 2 cores, SmolLM2 in the engine, 32 adapters, 128 sequences of ~112
positions, fp32): the 30 layers' decode attention takes 37 ms per step here against 98 ms
with the torch version (a whole decode step: 275 against 385 ms, with the other changes of
that step); alone, 32 sequences of 112 positions: 0.16 against 2.1 ms per layer.

Built and loaded by `kernels/native_build.py`; `available()` is
False (after one warning line) where it cannot be built, and callers use the torch version.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from pathlib import Path

import torch

from loraquilt.kernels.attention.cache import check_cache
from loraquilt.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("paged_decode.c")
DTYPES = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}




@functools.cache
def _library() -> ctypes.CDLL | None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [pointer, pointer, pointer, pointer, i64, pointer, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                pointer]
    built = load_native(SOURCE, "paged_decode", "using the torch paged decode attention instead",
                        {name: (argtypes, None) for name in DTYPES.values()})
    return None if built is None else built[0]


class _LastChecked:
    """The tables last found valid (every layer of a step passes the same ones): a weak
    reference to each tensor, its version counter and the pool's size."""

    key: tuple | None = None


def _check_tables(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Context lengths in 1..(table width x block_size) and every block id a context reads
    inside the pool (the kernel reads those addresses); checked once per step."""
    last = _LastChecked.key
    if (last is not None and last[0]() is tables and last[1]() is lens
            and last[2:] == (tables._version, lens._version, num_blocks, block_size)):
        return
    longest = int(lens.max())
    if int(lens.min()) < 1 or longest > tables.shape[1] * block_size:
        raise ValueError(f"context lengths must be in 1..{tables.shape[1] * block_size}, got "
                         f"{int(lens.min())}..{longest}")
    used = tables[:, : -(-longest // block_size)]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block ids must be in 0..{num_blocks - 1}")
    _LastChecked.key = (weakref.ref(tables), weakref.ref(lens), tables._version, lens._version, num_blocks, block_size)


def available() -> bool:
    return _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these tensors (CPU, fp32/bf16 contiguous pools)."""
    return (q.device.type == "cpu" and k_cache.dtype in DTYPES and v_cache.dtype == k_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and available())


def paged_decode_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Semantics: `cpu.paged_decode_attention` (dot products, softmax and sums
    in float32; a bf16 pool is widened on load).

    q:               [S, H, D]
    k_cache/v_cache: [num_blocks, block_size, KVH, D] contiguous, float32 or bfloat16
    block_tables:    [S, max_blocks]
    context_lens:    [S] >= 1
    returns          [S, H, D] in q's dtype
    """
    check_cache(q, k_cache, v_cache, sliding_window)
    library = _library()
    if library is None or not supports(q, k_cache, v_cache):
        raise RuntimeError("the compiled paged decode kernel does not take these tensors (see supports())")
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    scale = head_dim**-0.5 if scale is None else scale
    if num_seqs == 0:
        return torch.empty_like(q)
    queries = q.to(torch.float32).contiguous()  # [S, H, D]
    tables = block_tables.to(device="cpu", dtype=torch.int64).contiguous()  # [S, max_blocks]
    lens = context_lens.to(device="cpu", dtype=torch.int64).contiguous()  # [S]
    if tables.shape[0] != num_seqs or lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(tables.shape)} and context_lens {tuple(lens.shape)} "
                         f"must have one row per sequence ({num_seqs})")
    _check_tables(tables, lens, num_blocks, block_size)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32)  # [S, H, D]
    getattr(library, DTYPES[k_cache.dtype])(
        queries.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
        lens.data_ptr(), num_seqs, num_heads, kv_heads, head_dim, block_size, sliding_window or 0,
        float(scale), out.data_ptr())
    return out.to(q.dtype)
