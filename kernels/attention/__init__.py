"""Paged attention over a block-table KV cache, one layer at a time.

Modules:
    cache.py         the cache layout, its checks, `write_kv`
    reference.py     the semantics and the ground truth (`paged_attention_reference`)
    cpu.py           the torch decode and prefill paths
    native.py        the compiled CPU decode kernel (`paged_decode.c`)
    triton_paged.py  the GPU path (one Triton kernel for decode and prefill)
    dispatch.py      the one place that picks among them (`paged_decode`, `paged_prefill`)
"""

from loraquilt.kernels.attention.cache import write_kv
from loraquilt.kernels.attention.dispatch import paged_decode, paged_prefill

__all__ = ["paged_decode", "paged_prefill", "write_kv"]
