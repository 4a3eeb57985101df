"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request
generator, so a seeded request draws the same tokens whatever batch it runs in."""

from __future__ import annotations

import torch

from loraquilt.server.request import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2**63))
    return generator


def sample_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """logits: [N, vocab] float32 (any device) -> N token ids."""
    chosen = torch.argmax(logits, dim=-1).tolist()  # greedy for everyone, replaced below
    for row, (param, generator) in enumerate(zip(params, generators)):
        if not param.greedy:
            chosen[row] = _sample_row(logits[row].float().cpu(), param, generator)
    return chosen


def _sample_row(logits: torch.Tensor, param: SamplingParams, generator: torch.Generator) -> int:
    """logits: [vocab]"""
    scores = logits / param.temperature
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
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
