"""Next-token choice per row: greedy, or temperature / min-p / top-k / top-p with a per-request
random stream, so a seeded request draws the same tokens whatever batch it runs in.

The stream is Python's Mersenne Twister seeded with the full 64-bit seed (torch's CPU
generator keeps only the low 32 bits of a seed, so seeds differing above them would
share a stream); each draw is one uniform number turned into a token by inverse CDF.
"""

from __future__ import annotations

import random

import torch

from loraquilt.server.request import SamplingParams


def new_generator(seed: int | None) -> random.Random:
    """A random stream for one request; None = fresh entropy from the OS."""
    return random.Random(seed)


def sample_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[random.Random | None]
) -> list[int]:
    """logits: [N, vocab] float32 (any device) -> N token ids. A sampled row without a
    generator gets the greedy token (the runner passes None for rows whose logits are not
    finite: their token is not used, and their stream is not advanced)."""
    # greedy for everyone, replaced below. max(dim) picks the same (first) maximum as argmax,
    # 4x faster on CPU (Intel Xeon, 2 cores, [128, 49152]: 2.0 against 8.1 ms)
    chosen = torch.max(logits, dim=-1).indices.tolist()
    for row, (param, generator) in enumerate(zip(params, generators)):
        if not param.greedy and generator is not None:  # None: the caller discards this row
            chosen[row] = _sample_row(logits[row].cpu(), param, generator)
    return chosen


def _sample_row(logits: torch.Tensor, param: SamplingParams, generator: random.Random) -> int:
    """logits: [vocab]"""
    # float64 and shifted by the max: a tiny temperature tends to greedy instead of overflowing
    scores = (logits.double() - logits.max().double()) / param.temperature
    if param.min_p > 0:  # tokens less likely than min_p x the most likely one are dropped
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < param.min_p * probs.max(), float("-inf"))
    if param.top_k and param.top_k < scores.numel():
        kth = torch.topk(scores, param.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if param.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens ranked before it already reach top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= param.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    cdf = torch.cumsum(torch.softmax(scores, dim=-1), dim=0)  # [vocab]
    target = torch.tensor([generator.random() * float(cdf[-1])], dtype=cdf.dtype)
    index = int(torch.searchsorted(cdf, target, right=True))  # first token whose cdf passes it
    return min(index, scores.numel() - 1)
