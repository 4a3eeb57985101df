"""The compiled Triton SGMV kernels on CUDA (`lora_add_(..., backend="triton")`, the real
`tl.dot` path the interpreter does not cover) against the float32 reference loop.

Inputs are drawn on the CPU, the reference (`backend="reference"`, a loop over raw rows
in float32) runs on the CPU, the kernels on the GPU; tolerances are keyed by dtype
(tests/kernels/cases.py). Rows without an adapter must come back bit for bit.
Runs in a child process with TRITON_INTERPRET=0 (see conftest.py).
"""

import pytest
import torch

from _gpu import DEVICE, GPU
from cases import PATTERNS, adapter_buffers, assert_close, composed_slots, row_slots_for
from loraquilt.kernels.lora import NO_ADAPTER, build_lora_meta, lora_add_, resolve_backend

pytest.importorskip("triton")
pytestmark = GPU
RUN_IN_CHILD = True  # compiled Triton: conftest.py runs this module with TRITON_INTERPRET=0

HALF = (torch.bfloat16, torch.float16)
DTYPES = (*HALF, torch.float32)
RANKS = (1, 7, 16, 64)
ROWS = (1, 7, 32, 133)
# (in_features, out_features): tiny, SmolLM2-like (hidden 576, MLP 1536), non-power-of-two
SHAPES = ((64, 80), (576, 1536), (2049, 2049))


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None


def _check(rows, in_features, out_features, rank, num_slots, slots, weights, dtype, seed,
           x_view=None, y_view=None):
    """Triton on DEVICE vs the reference on the CPU, for one step's table of (slot, weight)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = adapter_buffers(num_slots, rank, in_features, out_features, dtype, gen)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    y0 = torch.randn(rows, out_features, generator=gen).to(dtype)
    host_meta = build_lora_meta(slots, weights, num_slots=num_slots)
    expected = lora_add_(y0.clone(), x, a, b, host_meta, backend="reference")

    meta = build_lora_meta(slots, weights, num_slots=num_slots, device=DEVICE)
    x_dev = x.to(DEVICE) if x_view is None else x_view(x.to(DEVICE))
    y_dev = y0.to(DEVICE) if y_view is None else y_view(y0.to(DEVICE))
    out = lora_add_(y_dev, x_dev, a.to(DEVICE), b.to(DEVICE), meta, backend="triton")
    assert out is y_dev, "lora_add_ must update y in place and return it"
    actual = out.cpu()
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype)
    untouched = (host_meta.row_slots == NO_ADAPTER).all(1)  # [T] rows with no adapter at all
    assert torch.equal(actual[untouched], y0[untouched]), "rows without an adapter changed"


def test_kernels_are_compiled_not_interpreted():
    """Guards the child-process set-up: on CUDA these tests must exercise compiled kernels."""
    if DEVICE != "cuda":
        pytest.skip("dry run on the CPU: the kernels run in the interpreter")
    import triton

    from loraquilt.kernels.lora import triton_sgmv

    assert not triton.knobs.runtime.interpret, "TRITON_INTERPRET is on in the GPU test process"
    for kernel in (triton_sgmv._sgmv_shrink_kernel, triton_sgmv._sgmv_expand_kernel):
        assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_rank_shape_rows(dtype, rank, shape, rows):
    """6 slots of ranks 1..rank (zero-padded), ~40% of the rows on no adapter."""
    gen = torch.Generator().manual_seed(rank * 1000 + rows)
    slots = row_slots_for("mixed_none", rows, 6, gen)
    _check(rows, *shape, rank, 6, slots, None, dtype, seed=rank + rows)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_popularity_patterns(dtype, pattern, rows):
    """all distinct, uniform, zipf, identical (one segment of up to 133 rows), all none,
    mixed none; 32 slots, rank 16, a non-power-of-two input width."""
    gen = torch.Generator().manual_seed(rows)
    slots = row_slots_for(pattern, rows, 32, gen)
    _check(rows, 2049, 576, 16, 32, slots, None, dtype, seed=rows)


@pytest.mark.parametrize("rows", (7, 133))
@pytest.mark.parametrize("pairs", (1, 2, 3, 4))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_composition(dtype, pairs, rows):
    """1-4 weighted (slot, weight) pairs per row, weights in [-1, 2), some -1, repeats
    allowed (several pairs on one row: the float32 atomic path)."""
    gen = torch.Generator().manual_seed(pairs * 10 + rows)
    slots, weights = composed_slots(rows, pairs, 5, gen)
    _check(rows, 576, 2049, 16, 5, slots, weights, dtype, seed=pairs)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_many_segments_and_prefill_sized_batch(dtype):
    """2048 rows (a prefill) over 64 slots, zipf: long and short segments, many programs."""
    gen = torch.Generator().manual_seed(7)
    slots = row_slots_for("zipf", 2048, 64, gen)
    _check(2048, 576, 1536, 16, 64, slots, None, dtype, seed=7)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_strided_views(dtype):
    """x and y as column slices of wider tensors (row stride != width), as fused
    projections hand them over."""
    gen = torch.Generator().manual_seed(3)
    slots = row_slots_for("uniform", 33, 4, gen)

    def x_view(x):  # [33, 576] inside [33, 576 + 64]
        wide = torch.zeros(x.shape[0], x.shape[1] + 64, dtype=x.dtype, device=x.device)
        wide[:, 32:32 + x.shape[1]] = x
        return wide[:, 32:32 + x.shape[1]]

    def y_view(y):  # [33, 1536] inside [33, 1536 + 128]
        wide = torch.zeros(y.shape[0], y.shape[1] + 128, dtype=y.dtype, device=y.device)
        wide[:, 128:] = y
        return wide[:, 128:]

    _check(33, 576, 1536, 16, 4, slots, None, dtype, seed=3, x_view=x_view, y_view=y_view)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_auto_backend_is_triton_on_cuda(dtype):
    """`auto` on CUDA tensors picks the Triton kernels: the same bits as backend="triton"
    (one pair per row: no atomics, so the result is deterministic)."""
    if DEVICE != "cuda":
        pytest.skip("dry run on the CPU: auto picks the torch backend there")
    assert resolve_backend("auto", torch.device(DEVICE, 0)) == "triton"
    gen = torch.Generator().manual_seed(11)
    a, b = adapter_buffers(8, 16, 576, 1536, dtype, gen)
    x = torch.randn(32, 576, generator=gen).to(dtype)
    y0 = torch.randn(32, 1536, generator=gen).to(dtype)
    meta = build_lora_meta(row_slots_for("uniform", 32, 8, gen), num_slots=8, device=DEVICE)
    a, b, x, y0 = (t.to(DEVICE) for t in (a, b, x, y0))
    auto = lora_add_(y0.clone(), x, a, b, meta, backend="auto")
    triton_out = lora_add_(y0.clone(), x, a, b, meta, backend="triton")
    assert torch.equal(auto, triton_out)
