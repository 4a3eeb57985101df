"""The compiled CPU paged decode attention (kernels/attention/paged_decode.c) against the
reference loop over a block-table cache, over many shapes (head groupings, head sizes with
and without an 8-wide tail, block sizes, sliding windows, fp32 and bf16 pools), its input
checks, and the dispatch that picks it on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_paged_attention import assert_close, context_lens_for, decode_case, decode_reference, dtype_id

from loraquilt.kernels.attention import native as paged_native
from loraquilt.kernels.attention.dispatch import paged_decode

needs_native = pytest.mark.skipif(not paged_native.available(), reason="native paged kernel not built on this CPU")
HEADS = ((1, 1), (4, 4), (9, 3), (8, 2), (8, 1))  # (query heads, kv heads)


@needs_native
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", (8, 20, 64, 128))
@pytest.mark.parametrize("block_size", (1, 4, 16))
def test_decode_matches_the_reference(dtype, heads, kv_heads, head_dim, block_size):
    num_seqs = 7
    lens = context_lens_for(num_seqs, block_size, offset=head_dim + heads)
    q, k_cache, v_cache, tables, context_lens = decode_case(num_seqs, heads, kv_heads, head_dim, block_size,
                                                            lens, dtype, seed=head_dim * 31 + block_size)
    out = paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, context_lens)
    assert out.shape == q.shape
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, context_lens), dtype)


@needs_native
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("window", (1, 5, 16, 1000))
@pytest.mark.parametrize("block_size", (4, 16))
def test_sliding_window_and_scale_match_the_reference(dtype, window, block_size):
    lens = context_lens_for(9, block_size, offset=window)
    q, k_cache, v_cache, tables, context_lens = decode_case(9, 9, 3, 64, block_size, lens, dtype, seed=window)
    out = paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, context_lens, window, scale=0.3)
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, context_lens, window, 0.3), dtype)


@needs_native
def test_many_sequences_over_threads_match_the_reference():
    """More sequences than threads, lengths 1..300: every row written, none mixed up."""
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 301, (64,), generator=gen).tolist()
    q, k_cache, v_cache, tables, context_lens = decode_case(64, 9, 3, 64, 16, lens, torch.float32, seed=3)
    out = paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, context_lens)
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, context_lens), torch.float32)


@needs_native
def test_bad_tables_and_lengths_are_refused():
    q, k_cache, v_cache, tables, lens = decode_case(3, 4, 2, 8, 4, [5, 9, 2], torch.float32, seed=1)
    with pytest.raises(ValueError, match="context lengths"):
        paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, torch.tensor([5, 0, 2]))
    with pytest.raises(ValueError, match="context lengths"):
        paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, torch.tensor([5, 999, 2]))
    broken = tables.clone()
    broken[1, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match="block ids"):
        paged_native.paged_decode_attention_native(q, k_cache, v_cache, broken, lens)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables[:2], lens)


@needs_native
def test_the_dispatch_takes_it_on_the_cpu_and_torch_where_it_cannot():
    q, k_cache, v_cache, tables, lens = decode_case(4, 9, 3, 64, 16, [3, 40, 17, 1], torch.float32, seed=2)
    assert paged_native.supports(q, k_cache, v_cache)
    expected = paged_native.paged_decode_attention_native(q, k_cache, v_cache, tables, lens)
    assert torch.equal(paged_decode(q, k_cache, v_cache, tables, lens, None), expected)
    half = k_cache.to(torch.float16), v_cache.to(torch.float16)
    assert not paged_native.supports(q, *half)  # fp16 pools take the torch version
    assert_close(paged_decode(q.half(), *half, tables, lens, None),
                 decode_reference(q.half(), *half, tables, lens), torch.float16)


def test_switched_off_the_torch_version_serves():
    code = ("import torch; from loraquilt.kernels.attention import native as paged_native; "
            "print(paged_native.available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LORAQUILT_NATIVE_KERNELS": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
