"""The batched logits processing and log probabilities against a per-row pure-Python
reference over many random batches (rows with and without each kind of processing,
repeated tokens, empty histories), and the new SamplingParams fields' checks."""

from __future__ import annotations

import math
import random

import pytest
import torch

from loraquilt.server.logits_processing import RowHistory, process_logits, raw_logprobs
from loraquilt.server.request import RequestError, SamplingParams

END_IDS = frozenset({0, 3})


def reference_row(logits: list[float], row: RowHistory) -> list[float]:
    """The Semantics of server/logits_processing.py, one row, in plain Python."""
    p, out = row.params, list(logits)
    for token, bias in p.logit_bias:
        out[token] += bias
    if len(row.output_ids) < p.min_tokens:
        for token in (set() if p.ignore_eos else END_IDS) | set(p.stop_token_ids):
            out[token] = -math.inf
    seen = set(row.prompt_ids) | set(row.output_ids)
    for token in range(len(out)):
        if p.repetition_penalty != 1.0 and token in seen:
            out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
        count = row.output_ids.count(token)
        out[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def random_row(rng: random.Random, vocab: int) -> RowHistory:
    kind = rng.choice(["plain", "bias", "min", "penalty", "all"])
    fields = {}
    if kind in ("bias", "all"):
        fields["logit_bias"] = tuple((rng.randrange(vocab), rng.uniform(-100, 100)) for _ in range(rng.randint(1, 4)))
    if kind in ("min", "all"):
        fields["min_tokens"] = rng.randint(1, 6)
        fields["stop_token_ids"] = tuple(rng.sample(range(vocab), 2))
        fields["ignore_eos"] = rng.random() < 0.3
    if kind in ("penalty", "all"):
        fields["repetition_penalty"] = rng.choice([1.0, 0.7, 1.3, 2.0])
        fields["presence_penalty"] = rng.uniform(-2, 2)
        fields["frequency_penalty"] = rng.uniform(-2, 2)
    params = SamplingParams(max_new_tokens=8, **fields)
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randint(0, 7))]  # repeats likely in a small vocabulary
    return RowHistory(params, prompt, output)


@pytest.mark.parametrize("seed", range(40))
def test_batched_processing_equals_the_per_row_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([8, 17, 64])
    rows = [random_row(rng, vocab) for _ in range(rng.randint(1, 9))]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed))
    expected = torch.tensor([reference_row(logits[i].tolist(), row) for i, row in enumerate(rows)])
    got = process_logits(logits.clone(), rows, END_IDS)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], expected[finite], atol=1e-4, rtol=1e-5)


def test_rows_without_processing_are_untouched_bit_for_bit():
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    rows = [RowHistory(SamplingParams(), [1, 2], [3]),
            RowHistory(SamplingParams(presence_penalty=1.0), [1], [5, 5]),
            RowHistory(SamplingParams(), [], [])]
    got = process_logits(logits.clone(), rows, END_IDS)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2]) and not torch.equal(got[1], logits[1])


@pytest.mark.parametrize("seed", range(10))
def test_raw_logprobs_equal_log_softmax(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 40, generator=generator) * 4
    chosen = torch.randint(0, 40, (5,), generator=generator).tolist()
    tops = [None, 0, 3, 20, 1]
    entries = raw_logprobs(logits, chosen, tops)
    for row, (entry, top) in enumerate(zip(entries, tops)):
        if top is None:
            assert entry is None
            continue
        expected = torch.log_softmax(logits[row].double(), -1)
        assert entry.token_id == chosen[row] and abs(entry.logprob - float(expected[chosen[row]])) < 1e-5
        values, indices = torch.topk(expected, top) if top else (torch.tensor([]), torch.tensor([]))
        assert [t for t, _ in entry.top] == indices.tolist()
        assert all(abs(a - float(b)) < 1e-5 for (_, a), b in zip(entry.top, values))


@pytest.mark.parametrize("fields, name", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": 9}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"), ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"logit_bias": ((1, "x"),)}, "logit_bias"), ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"stop_token_ids": (True,)}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
])
def test_processing_fields_are_checked(fields, name):
    with pytest.raises(RequestError) as caught:
        SamplingParams(max_new_tokens=8, **fields)
    assert caught.value.field == name
