"""The compiled Triton paged attention kernel on CUDA (kernels/attention/triton_paged.py,
the real `tl.dot` path the interpreter does not cover) against the float32 reference loop.

Inputs are drawn on the CPU, the reference (`paged_attention_reference`) runs on the CPU,
the kernel on the GPU; tolerances are keyed by dtype (tests/kernels/test_paged_attention.py).
Shapes past what the reference loop checks quickly (long contexts, many sequences) are
compared with the CPU fast path run in float32 on the same rounded inputs, itself checked
against the reference by tests/kernels/test_paged_attention.py.
Runs in a child process with TRITON_INTERPRET=0 (see conftest.py).
"""

import pytest
import torch

from _gpu import DEVICE, GPU
from loraquilt.kernels.attention.cpu import paged_decode_attention
from loraquilt.kernels.attention.reference import paged_attention_reference
from test_paged_attention import (
    assert_close,
    decode_case,
    decode_reference,
    dtype_id,
    make_cache,
    prefill_case,
    prefill_reference,
    random_block_tables,
)

pytest.importorskip("triton")
pytestmark = GPU
RUN_IN_CHILD = True  # compiled Triton: conftest.py runs this module with TRITON_INTERPRET=0

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (query heads, kv heads, head_dim): SmolLM2-135M-like, Llama-like GQA, MQA with a
# non-power-of-two head_dim, head_dim 256
HEADS = ((9, 3, 64), (32, 8, 128), (8, 1, 80), (4, 4, 256))


def _ids(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return dtype_id(value)


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def test_kernel_is_compiled_not_interpreted():
    """Guards the child-process set-up: on CUDA these tests must exercise compiled kernels."""
    if DEVICE != "cuda":
        pytest.skip("dry run on the CPU: the kernel runs in the interpreter")
    import triton

    from loraquilt.kernels.attention import triton_paged as triton_paged_attention

    assert not triton.knobs.runtime.interpret, "TRITON_INTERPRET is on in the GPU test process"
    assert isinstance(triton_paged_attention._paged_attention_kernel, triton.runtime.jit.JITFunction)


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_decode(dtype, heads, block_size, window):
    from loraquilt.kernels.attention.triton_paged import paged_decode_attention_triton

    num_heads, kv_heads, head_dim = heads
    lens = [1, block_size - 1, block_size, block_size + 1, 63, 200, 333, 600]
    case = decode_case(len(lens), num_heads, kv_heads, head_dim, block_size, lens, dtype,
                       seed=head_dim + block_size)
    expected = decode_reference(*case, window)
    actual = paged_decode_attention_triton(*_on_device(*case), sliding_window=window).cpu()
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("start, n", [(0, 1), (0, 128), (17, 1), (300, 64)], ids=str)
@pytest.mark.parametrize("heads", HEADS[:3], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_prefill(dtype, heads, start, n, window):
    from loraquilt.kernels.attention.triton_paged import paged_prefill_attention_triton

    num_heads, kv_heads, head_dim = heads
    q, k, v, k_cache, v_cache, table = prefill_case(num_heads, kv_heads, head_dim, 16, start, n,
                                                    dtype, seed=start + n)
    expected = prefill_reference(q, k_cache, v_cache, table, start, window)
    actual = paged_prefill_attention_triton(*_on_device(q, k, v, k_cache, v_cache, table), start,
                                            sliding_window=window).cpu()
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_mixed_batch_int32_tables(dtype):
    """Prefill chunks and decode tokens of several sequences in one call, interleaved."""
    from loraquilt.kernels.attention.triton_paged import paged_attention_triton

    gen = torch.Generator().manual_seed(5)
    block_size, lens = 16, [7, 130, 16, 257]
    k_cache, v_cache = make_cache(64, block_size, 3, 64, dtype, gen)
    tables = random_block_tables(lens, block_size, 64, gen).to(torch.int32)
    token_seqs = torch.tensor([0] + [1] * 30 + [2] + [3] * 40)
    token_positions = torch.cat([torch.tensor([6]), torch.arange(100, 130), torch.tensor([15]),
                                 torch.arange(217, 257)])
    order = torch.randperm(len(token_seqs), generator=gen)
    token_seqs, token_positions = token_seqs[order], token_positions[order]
    q = torch.randn(len(token_seqs), 9, 64, generator=gen).to(dtype)
    for window in (None, 33):
        expected = paged_attention_reference(q, k_cache, v_cache, tables, token_seqs,
                                             token_positions, window)
        actual = paged_attention_triton(*_on_device(q, k_cache, v_cache, tables, token_seqs,
                                                    token_positions), window).cpu()
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("window", [None, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_long_decode_batch(dtype, window):
    """64 sequences up to 4096 keys, Llama-like heads: against the CPU fast path in float32
    on the same rounded inputs."""
    if DEVICE != "cuda":
        pytest.skip("dry run on the CPU: too large for the interpreter")
    from loraquilt.kernels.attention.triton_paged import paged_decode_attention_triton

    gen = torch.Generator().manual_seed(6)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    case = decode_case(64, 32, 8, 128, 16, lens, dtype, seed=6)
    q, k_cache, v_cache, tables, context_lens = case
    expected = paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables,
                                      context_lens, sliding_window=window)
    actual = paged_decode_attention_triton(*_on_device(*case), sliding_window=window).cpu()
    assert_close(actual, expected, dtype)
