"""The native row scoring against its torch reference: log probability and rank of each
row's target and the row's top k, over row counts, vocabulary sizes (under one vector of
8, not multiples of 8, a real vocabulary), k, ties, -inf logits and non-finite rows."""

import pytest
import torch

from loraquilt.kernels import logprobs
from loraquilt.kernels.logprobs import native

needs_native = pytest.mark.skipif(not logprobs.available(), reason="native row scoring not built on this CPU")


def check(logits: torch.Tensor, targets: torch.Tensor, k: int) -> None:
    got = native.score_rows_native(logits, targets, k)
    expected = logprobs.score_rows_reference(logits, targets, k)
    target_lp, rank, top_ids, top_lp = got
    torch.testing.assert_close(target_lp, expected[0], rtol=0, atol=2e-5)
    assert torch.equal(rank, expected[1])
    torch.testing.assert_close(top_lp, expected[3], rtol=0, atol=2e-5)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    torch.testing.assert_close(logits.gather(1, top_ids) - lse, expected[3], rtol=0, atol=2e-5)  # ids of those values
    for row in range(logits.shape[0]):  # ties: the lower id first
        pairs = list(zip((-top_lp[row]).tolist(), top_ids[row].tolist()))
        assert pairs == sorted(pairs)


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 130])
@pytest.mark.parametrize("vocab", [1, 7, 8, 100, 32001, 49152])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_score_rows_matches_reference(rows, vocab, k):
    if k > vocab:
        pytest.skip("k is at most the vocabulary")
    gen = torch.Generator().manual_seed(rows * vocab + k)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    check(logits, targets, k)


@needs_native
def test_ties_minus_infinity_and_a_strided_view():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (33, 1003), generator=gen).float()  # many equal values
    logits[:, ::7] = float("-inf")  # masked tokens
    targets = torch.randint(0, 1003, (33,), generator=gen)
    check(logits, targets, 6)
    wide = torch.randn(9, 1200, generator=gen)
    check(wide[:, :1000], targets[:9] % 1000, 3)  # rows of a wider tensor


@needs_native
def test_rows_with_nan_or_plus_infinity_are_not_finite():
    logits = torch.randn(4, 300)
    logits[1, 17] = float("nan")
    logits[2, 299] = float("inf")
    logits[3] = float("-inf")
    target_lp, rank, top_ids, _ = native.score_rows_native(logits, torch.tensor([5, 5, 5, 5]), 2)
    assert torch.isfinite(target_lp).tolist() == [True, False, False, False]
    assert int(rank[0]) == 1 + int((logits[0] > logits[0, 5]).sum())


def test_dispatch_falls_back_to_torch_beyond_the_native_bound():
    logits = torch.randn(3, 100, dtype=torch.float64)
    targets = torch.tensor([1, 2, 3])
    target_lp, rank, top_ids, top_lp = logprobs.score_rows(logits, targets, 80)
    assert top_ids.shape == (3, 80) and target_lp.dtype == torch.float64
