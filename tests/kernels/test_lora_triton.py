"""Triton SGMV kernels (run by the Triton interpreter on CPU) against the reference loop."""

import os

import pytest
import torch

from loraquilt.kernels.lora import build_lora_meta, lora_add_, resolve_backend

from cases import PATTERNS, adapter_buffers, assert_close, composed_slots, row_slots_for

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(rows, in_features, out_features, rank, num_slots, slots, weights, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = adapter_buffers(num_slots, rank, in_features, out_features, dtype, gen)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    y0 = torch.randn(rows, out_features, generator=gen).to(dtype)
    meta = build_lora_meta(slots, weights, num_slots=num_slots, device=DEVICE)
    expected = lora_add_(y0.clone(), x, a, b, build_lora_meta(slots, weights, num_slots=num_slots),
                         backend="reference")
    to = lambda t: t.to(DEVICE)  # noqa: E731
    actual = lora_add_(to(y0.clone()), to(x), to(a), to(b), meta, backend="triton").cpu()
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 7, 16, 64])
def test_dtype_rank(dtype, rank):
    gen = torch.Generator().manual_seed(rank)
    slots = row_slots_for("mixed_none", 7, 4, gen)
    _check(7, 96, 80, rank, 4, slots, None, dtype, seed=rank)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, 7, 37])
def test_popularity_patterns(pattern, rows):
    gen = torch.Generator().manual_seed(rows)
    slots = row_slots_for(pattern, rows, 6, gen)
    _check(rows, 48, 72, 8, 6, slots, None, torch.float32, seed=rows)


@pytest.mark.parametrize("pairs", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composition(pairs, dtype):
    gen = torch.Generator().manual_seed(pairs)
    slots, weights = composed_slots(9, pairs, 5, gen)
    _check(9, 40, 70, 8, 5, slots, weights, dtype, seed=pairs)


def test_non_power_of_two_hidden():
    gen = torch.Generator().manual_seed(0)
    slots = row_slots_for("uniform", 5, 3, gen)
    _check(5, 2049, 33, 16, 3, slots, None, torch.float32, seed=0)


def test_segment_longer_than_a_block():
    slots = torch.tensor([2] * 20 + [0] * 3 + [-1] * 2 + [2] * 15)  # 35 rows of slot 2
    _check(40, 32, 32, 4, 3, slots, None, torch.float32, seed=1)


def test_auto_dispatch():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
