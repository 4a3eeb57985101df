"""Paged attention on CPU (kernels/paged_attention.py): the decode and prefill fast paths
against the reference loop over a block-table cache, `write_kv`, and chunked prefill
through the cache against plain causal attention over the contiguous sequence.

Block tables hold shuffled, non-contiguous block ids from a pool larger than the batch
needs, padded with random valid ids (never read unmasked). The builders here are shared
with the Triton tests (test_paged_attention_triton.py, tests/gpu).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraquilt.kernels.attention.cache import write_kv
from loraquilt.kernels.attention.cpu import paged_decode_attention, paged_prefill_attention
from loraquilt.kernels.attention.reference import paged_attention_reference

DTYPES = (torch.float32, torch.bfloat16)
# (atol, rtol) against the float32 reference
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
HEADS = ((4, 4), (9, 3), (8, 1))  # (query heads, kv heads)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are tiny: one thread beats waking a second one for every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dtype_id(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert actual.dtype == dtype, actual.dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen):
    """k_cache, v_cache: [num_blocks, block_size, KVH, D], N(0, 1) (keys scaled so that
    the softmax is neither flat nor one-hot)."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=gen) * 1.5).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache, v_cache


def random_block_tables(context_lens, block_size, num_blocks, gen, extra_blocks=2):
    """[S, max_blocks] int64: each sequence gets distinct blocks drawn at random from the
    pool (so consecutive positions jump between far-apart blocks), rows padded past their
    blocks with random valid ids; extra_blocks columns of padding beyond the longest row."""
    needed = [-(-int(n) // block_size) for n in context_lens]
    assert sum(needed) <= num_blocks, "pool too small"
    max_blocks = max(needed) + extra_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(needed), max_blocks), generator=gen)
    taken = 0
    for s, count in enumerate(needed):
        tables[s, :count] = ids[taken:taken + count]
        taken += count
    return tables


def decode_case(num_seqs, heads, kv_heads, head_dim, block_size, context_lens, dtype, seed):
    """(q [S, H, D], k_cache, v_cache, block_tables [S, max_blocks], context_lens [S])."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-n // block_size) for n in context_lens)
    num_blocks = 2 * needed + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(context_lens, block_size, num_blocks, gen)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(context_lens)


def prefill_case(heads, kv_heads, head_dim, block_size, start, n, dtype, seed):
    """One sequence with start cached keys and a chunk of n new ones, all in the cache:
    (q [n, H, D], k/v [n, KVH, D] (the chunk's, as written), k_cache, v_cache,
    block_table [max_blocks])."""
    gen = torch.Generator().manual_seed(seed)
    length = start + n
    num_blocks = 2 * -(-length // block_size) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    table = random_block_tables([length], block_size, num_blocks, gen)[0]
    positions = torch.arange(start, length)
    slots = table[positions // block_size] * block_size + positions % block_size  # [n]
    k = k_cache.view(-1, kv_heads, head_dim)[slots].clone()  # [n, KVH, D]
    v = v_cache.view(-1, kv_heads, head_dim)[slots].clone()  # [n, KVH, D]
    q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    return q, k, v, k_cache, v_cache, table


def decode_reference(q, k_cache, v_cache, tables, lens, window=None, scale=None):
    seqs = torch.arange(q.shape[0])
    return paged_attention_reference(q, k_cache, v_cache, tables, seqs, lens - 1, window, scale)


def prefill_reference(q, k_cache, v_cache, table, start, window=None, scale=None):
    n = q.shape[0]
    return paged_attention_reference(q, k_cache, v_cache, table.view(1, -1),
                                     torch.zeros(n, dtype=torch.long), start + torch.arange(n),
                                     window, scale)


def context_lens_for(num_seqs, block_size, offset):
    """Lengths around block boundaries and a longer one, rotated by offset."""
    pattern = [1, block_size - 1, block_size, block_size + 1, 100, 2 * block_size + 3, 37]
    return [max(1, pattern[(i + offset) % len(pattern)]) for i in range(num_seqs)]


# -- reference ---------------------------------------------------------------------------


def test_reference_matches_dense_attention():
    """The reference over a contiguous table equals softmax attention written out by hand."""
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = make_cache(3, 4, 2, 8, torch.float32, gen)
    q = torch.randn(1, 4, 8, generator=gen)
    out = paged_attention_reference(q, k_cache, v_cache, torch.tensor([[0, 1, 2]]),
                                    torch.tensor([0]), torch.tensor([9]))
    keys = k_cache.reshape(12, 2, 8)[:10].repeat_interleave(2, dim=1)  # [10, H, D]
    values = v_cache.reshape(12, 2, 8)[:10].repeat_interleave(2, dim=1)
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q[0], keys) / 8**0.5, dim=-1)
    torch.testing.assert_close(out[0], torch.einsum("hl,lhd->hd", probs, values))


# -- decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("num_seqs", [1, 3, 17])
def test_decode_matches_reference(num_seqs, heads, kv_heads, head_dim, block_size, window, dtype):
    offset = num_seqs + heads + head_dim // 16 + block_size
    lens = context_lens_for(num_seqs, block_size, offset)
    case = decode_case(num_seqs, heads, kv_heads, head_dim, block_size, lens, dtype, seed=offset)
    expected = decode_reference(*case, window)
    assert_close(paged_decode_attention(*case, sliding_window=window), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("length", ["1", "bs-1", "bs", "bs+1", "100"])
def test_decode_single_sequence_lengths(length, block_size, dtype):
    context = {"1": 1, "bs-1": block_size - 1, "bs": block_size, "bs+1": block_size + 1,
               "100": 100}[length]
    case = decode_case(1, 9, 3, 64, block_size, [context], dtype, seed=context)
    assert_close(paged_decode_attention(*case), decode_reference(*case), dtype)


@pytest.mark.parametrize("window", [1, 3, 4, 16, 17, 99, 100, 500])
def test_decode_window_edges(window):
    """Windows of one key, inside one block, exactly a block, across blocks, the whole
    context and beyond it; rows whose window starts in different blocks."""
    lens = [1, 3, 4, 5, 16, 17, 50, 100]
    case = decode_case(len(lens), 8, 2, 16, 4, lens, torch.float32, seed=window)
    expected = decode_reference(*case, window)
    assert_close(paged_decode_attention(*case, sliding_window=window), expected, torch.float32)


def test_decode_window_one_is_the_last_value():
    q, k_cache, v_cache, tables, lens = decode_case(3, 4, 2, 16, 4, [1, 6, 9], torch.float32, 1)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, sliding_window=1)
    for s, n in enumerate(lens.tolist()):
        last = v_cache[tables[s, (n - 1) // 4], (n - 1) % 4]  # [KVH, D]
        torch.testing.assert_close(out[s], last.repeat_interleave(2, dim=0))


def test_decode_scale_and_int32_tables():
    case = list(decode_case(5, 9, 3, 80, 16, [3, 40, 16, 17, 90], torch.float32, seed=2))
    expected = decode_reference(*case, None, 0.3)
    case[3] = case[3].to(torch.int32)
    assert_close(paged_decode_attention(*case, scale=0.3), expected, torch.float32)
    assert_close(paged_decode_attention(*case, sliding_window=7, scale=0.3),
                 decode_reference(*case, 7, 0.3), torch.float32)


def test_decode_shared_blocks():
    """Two sequences on the same blocks (a shared prefix) see the same keys."""
    q, k_cache, v_cache, tables, lens = decode_case(2, 4, 4, 16, 4, [10, 10], torch.float32, 3)
    tables[1] = tables[0]
    q[1] = q[0]
    lens = torch.tensor([10, 7])
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, lens), torch.float32)
    assert not torch.allclose(out[0], out[1])


def test_decode_padding_blocks_are_never_attended():
    """Rows padded with a block full of huge values: masked keys must not leak in."""
    q, k_cache, v_cache, tables, lens = decode_case(3, 4, 2, 16, 4, [1, 5, 30], torch.float32, 4)
    used = {int(b) for s, n in enumerate(lens.tolist()) for b in tables[s, :-(-n // 4)]}
    poison = next(b for b in range(k_cache.shape[0]) if b not in used)
    k_cache[poison] = 1e4
    v_cache[poison] = 1e4
    for s, n in enumerate(lens.tolist()):
        tables[s, -(-n // 4):] = poison
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, lens), torch.float32)
    assert out.abs().max() < 10


def test_bad_shapes_and_windows_raise():
    q, k_cache, v_cache, tables, lens = decode_case(2, 4, 2, 16, 4, [3, 5], torch.float32, 12)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, sliding_window=0)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError):
        paged_decode_attention(q[..., :8], k_cache, v_cache, tables, lens)


def test_decode_empty_batch():
    q, k_cache, v_cache, tables, lens = decode_case(1, 4, 2, 16, 4, [3], torch.float32, 5)
    out = paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0])
    assert out.shape == (0, 4, 16)


# -- prefill -----------------------------------------------------------------------------

# (start, n): first chunks (the direct causal path; 40 > the window takes the gather path),
# a one-token chunk after cached keys (as a decode), chunks crossing block boundaries
CHUNKS = ((0, 1), (0, 7), (0, 40), (5, 1), (16, 1), (13, 9), (50, 33))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("start, n", CHUNKS)
def test_prefill_matches_reference(start, n, heads, kv_heads, head_dim, block_size, window, dtype):
    seed = start * 100 + n + heads + head_dim
    q, k, v, k_cache, v_cache, table = prefill_case(heads, kv_heads, head_dim, block_size,
                                                    start, n, dtype, seed)
    expected = prefill_reference(q, k_cache, v_cache, table, start, window)
    actual = paged_prefill_attention(q, k, v, k_cache, v_cache, table, start, sliding_window=window)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("window", [1, 2, 4, 9, 30])
def test_prefill_window_edges(window):
    q, k, v, k_cache, v_cache, table = prefill_case(8, 2, 16, 4, 11, 13, torch.float32, window)
    expected = prefill_reference(q, k_cache, v_cache, table, 11, window)
    actual = paged_prefill_attention(q, k, v, k_cache, v_cache, table, 11, sliding_window=window)
    assert_close(actual, expected, torch.float32)


def test_prefill_scale_and_int32_table():
    q, k, v, k_cache, v_cache, table = prefill_case(9, 3, 80, 16, 20, 5, torch.float32, 6)
    expected = prefill_reference(q, k_cache, v_cache, table, 20, None, 0.2)
    actual = paged_prefill_attention(q, k, v, k_cache, v_cache, table.to(torch.int32), 20, scale=0.2)
    assert_close(actual, expected, torch.float32)
    q, k, v, k_cache, v_cache, table = prefill_case(9, 3, 80, 16, 0, 5, torch.float32, 7)
    expected = prefill_reference(q, k_cache, v_cache, table, 0, None, 0.2)
    assert_close(paged_prefill_attention(q, k, v, k_cache, v_cache, table, 0, scale=0.2),
                 expected, torch.float32)


def test_first_chunk_reads_the_chunk_not_the_cache():
    """start == 0 within the window: causal attention on k/v alone (the cache is not read)."""
    q, k, v, k_cache, v_cache, table = prefill_case(4, 2, 16, 4, 0, 9, torch.float32, 8)
    expected = prefill_reference(q, k_cache, v_cache, table, 0)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    for window in (None, 9, 50):
        actual = paged_prefill_attention(q, k, v, k_cache, v_cache, table, 0, sliding_window=window)
        assert_close(actual, expected, torch.float32)


# -- write_kv ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_write_kv_lands_in_block_and_offset(dtype):
    gen = torch.Generator().manual_seed(9)
    num_blocks, block_size, kv_heads, head_dim = 7, 4, 3, 16
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:11]  # [T]
    k = torch.randn(11, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(11, kv_heads, head_dim, generator=gen).to(dtype)
    write_kv(k_cache, v_cache, slots, k, v)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(k_cache[block, offset], k[t])
        assert torch.equal(v_cache[block, offset], v[t])
        written[block, offset] = True
    assert torch.equal(k_cache[~written], k_before[~written])
    assert torch.equal(v_cache[~written], v_before[~written])


def test_write_kv_then_decode_sees_the_new_token():
    """A decode step: write the new token's key/value at position context_len - 1 through
    the block table, then attend; equal to the reference on the updated cache."""
    q, k_cache, v_cache, tables, lens = decode_case(3, 4, 2, 16, 4, [4, 5, 12], torch.float32, 10)
    gen = torch.Generator().manual_seed(11)
    pos = lens - 1
    slots = tables[torch.arange(3), pos // 4] * 4 + pos % 4  # [S]
    k_new = torch.randn(3, 2, 16, generator=gen) * 3
    v_new = torch.randn(3, 2, 16, generator=gen)
    write_kv(k_cache, v_cache, slots, k_new, v_new)
    for s in range(3):
        assert torch.equal(k_cache[tables[s, pos[s] // 4], pos[s] % 4], k_new[s])
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert_close(out, decode_reference(q, k_cache, v_cache, tables, lens), torch.float32)


# -- chunked prefill through the cache == attention over the contiguous sequence ---------


def _dense_attention(q, k, v, window=None):
    """q [L, H, D], k/v [L, KVH, D]: causal (windowed) attention in float64."""
    length, heads, head_dim = q.shape
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * head_dim**-0.5  # [H, L, L]
    qpos, kpos = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("window", [None, 10])
@pytest.mark.parametrize("chunks", [(57,), (1, 6, 16, 1, 33), (20, 20, 17)], ids=str)
def test_chunked_prefill_equals_contiguous_causal_attention(chunks, window, dtype):
    gen = torch.Generator().manual_seed(len(chunks))
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 4
    length = sum(chunks)
    q = torch.randn(length, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
    num_blocks = 3 * -(-length // block_size)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    table = random_block_tables([length], block_size, num_blocks, gen)[0]
    outs, start = [], 0
    for n in chunks:
        positions = torch.arange(start, start + n)
        slots = table[positions // block_size] * block_size + positions % block_size
        write_kv(k_cache, v_cache, slots, k[start:start + n], v[start:start + n])
        outs.append(paged_prefill_attention(q[start:start + n], k[start:start + n],
                                            v[start:start + n], k_cache, v_cache, table, start,
                                            sliding_window=window))
        start += n
    expected = _dense_attention(q, k, v, window)
    assert_close(torch.cat(outs), expected, dtype)
    if window is None:
        plain = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            is_causal=True, enable_gqa=True).transpose(0, 1)
        assert_close(torch.cat(outs), plain, dtype)
    # and each position decoded on its own from the same cache gives the same rows
    lens = torch.tensor([length, length // 2 + 1, 1])
    decoded = paged_decode_attention(q[lens - 1], k_cache, v_cache, table.expand(3, -1), lens,
                                     sliding_window=window)
    assert_close(decoded, expected[lens - 1], dtype)
