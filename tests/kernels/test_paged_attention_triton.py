"""The Triton paged attention kernel (run by the Triton interpreter on CPU, or on CUDA when
there is one) against the reference loop. Shapes stay small: the interpreter is slow."""

import os

import pytest
import torch

from loraquilt.kernels.attention.reference import paged_attention_reference

from test_paged_attention import (
    assert_close,
    decode_case,
    decode_reference,
    dtype_id,
    make_cache,
    one_torch_thread,  # noqa: F401  (autouse fixture: tiny tensors, one torch thread)
    prefill_case,
    prefill_reference,
    random_block_tables,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16)


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, window", [
    (9, 3, 80, 4, None),   # GQA, non-power-of-two head_dim, blocks smaller than a key tile
    (8, 1, 64, 16, 5),     # MQA, window inside a block
    (4, 4, 16, 128, 70),   # one kv head per query head, blocks larger than a key tile
])
def test_decode(heads, kv_heads, head_dim, block_size, window, dtype):
    from loraquilt.kernels.attention.triton_paged import paged_decode_attention_triton

    lens = [1, block_size - 1, block_size + 1, 90]
    case = decode_case(4, heads, kv_heads, head_dim, block_size, lens, dtype, seed=heads)
    expected = decode_reference(*case, window)
    actual = paged_decode_attention_triton(*_on_device(*case), sliding_window=window).cpu()
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("start, n, window", [(0, 20, None), (0, 20, 6), (37, 9, None), (70, 1, 16)])
def test_prefill(start, n, window, dtype):
    from loraquilt.kernels.attention.triton_paged import paged_prefill_attention_triton

    q, k, v, k_cache, v_cache, table = prefill_case(9, 3, 64, 16, start, n, dtype, seed=start + n)
    expected = prefill_reference(q, k_cache, v_cache, table, start, window)
    actual = paged_prefill_attention_triton(*_on_device(q, k, v, k_cache, v_cache, table), start,
                                            sliding_window=window).cpu()
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mixed_batch_general_kernel(dtype):
    """Decode tokens of several sequences and a prefill chunk of another in one call, in an
    interleaved token order, an int32 block table and a custom scale."""
    from loraquilt.kernels.attention.triton_paged import paged_attention_triton

    gen = torch.Generator().manual_seed(1)
    block_size, lens = 8, [5, 33, 8, 41]
    k_cache, v_cache = make_cache(20, block_size, 2, 48, dtype, gen)
    tables = random_block_tables(lens, block_size, 20, gen).to(torch.int32)
    token_seqs = torch.tensor([0, 3, 3, 1, 3, 2, 3])
    token_positions = torch.tensor([4, 37, 38, 32, 39, 7, 40])
    q = torch.randn(7, 6, 48, generator=gen).to(dtype)
    for window in (None, 9):
        expected = paged_attention_reference(q, k_cache, v_cache, tables, token_seqs,
                                             token_positions, window, scale=0.25)
        actual = paged_attention_triton(*_on_device(q, k_cache, v_cache, tables, token_seqs,
                                                    token_positions), window, scale=0.25).cpu()
        assert_close(actual, expected, dtype)


def test_empty_and_errors():
    from loraquilt.kernels.attention.triton_paged import paged_attention_triton

    q, k_cache, v_cache, tables, lens = decode_case(1, 4, 2, 16, 4, [3], torch.float32, 0)
    q, k_cache, v_cache, tables, lens = _on_device(q, k_cache, v_cache, tables, lens)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert paged_attention_triton(q[:0], k_cache, v_cache, tables, none, none).shape == (0, 4, 16)
    with pytest.raises(ValueError):
        paged_attention_triton(q[:, :3], k_cache, v_cache, tables, lens * 0, lens - 1)
    with pytest.raises(ValueError):
        paged_attention_triton(q, k_cache, v_cache, tables, lens * 0, lens - 1, sliding_window=0)
