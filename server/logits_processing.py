"""Per-row changes to a step's logits before the sampler picks tokens, and the log
probabilities of the raw logits, for the rows of a batch that ask for them (every other
row is left untouched and costs nothing).

Semantics (per row r with its request's SamplingParams p; V = vocabulary):
  raw_logprobs[r]  = log_softmax(logits[r])  (before anything below; OpenAI's and vLLM's default)
                     (the same for the prefill rows that score prompt tokens: `token_logprobs`)
  logits[r, t]    += p.logit_bias[t]                                  (the tokens it names)
  logits[r, e]     = -inf for e in eos ∪ p.stop_token_ids            while len(output) < p.min_tokens
  logits[r, t]     = logits[r, t] / p.repetition_penalty  if > 0, else * p.repetition_penalty,
                                                                       for t in prompt ∪ output
  logits[r, t]    -= p.frequency_penalty · count_output(t) + p.presence_penalty · [count_output(t) > 0]
Each batched over the rows that use it (one scatter per step, no loop over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraquilt.kernels.logprobs import score_rows
from loraquilt.server.request import SamplingParams


@dataclass(frozen=True)
class RowHistory:
    """What a row's processing depends on: its request's parameters and tokens so far."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability and its top alternatives (token id, log probability),
    most likely first; `text` and `top_texts`: each token decoded on its own (filled in
    after the step, by the postprocessor, which owns the tokenizer). `logprob` is None only
    for a prompt's first token (nothing predicts it); `rank`: 1 + the number of tokens more
    likely than it (0 for that first token)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    text: str = ""
    top_texts: tuple[str, ...] = ()
    rank: int = 0


def process_logits(logits: torch.Tensor, rows: list[RowHistory], end_ids: frozenset[int]) -> torch.Tensor:
    """logits: [N, V] -> [N, V], processed where a row asks for it (the input tensor is
    changed in place and returned). end_ids: the model's end-of-sequence ids."""
    _logit_bias(logits, rows)
    _min_tokens(logits, rows, end_ids)
    _penalties(logits, rows)
    return logits


def _logit_bias(logits: torch.Tensor, rows: list[RowHistory]) -> None:
    entries = [(index, token, bias) for index, row in enumerate(rows) for token, bias in row.params.logit_bias]
    if not entries:
        return
    index, tokens, biases = zip(*entries)
    logits.index_put_((torch.tensor(index), torch.tensor(tokens)),
                      torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)


def _min_tokens(logits: torch.Tensor, rows: list[RowHistory], end_ids: frozenset[int]) -> None:
    masked = [(index, token) for index, row in enumerate(rows)
              if len(row.output_ids) < row.params.min_tokens
              for token in (set() if row.params.ignore_eos else end_ids) | set(row.params.stop_token_ids)]
    if masked:
        index, tokens = zip(*masked)
        logits[torch.tensor(index), torch.tensor(tokens)] = float("-inf")


def _penalties(logits: torch.Tensor, rows: list[RowHistory]) -> None:
    chosen = [index for index, row in enumerate(rows)
              if row.params.repetition_penalty != 1.0 or row.params.presence_penalty or row.params.frequency_penalty]
    if not chosen:
        return
    vocab = logits.shape[-1]
    picked = [rows[index] for index in chosen]
    select = torch.tensor(chosen, device=logits.device)
    sub = logits.index_select(0, select)  # [R, V]
    counts = _token_counts([row.output_ids for row in picked], vocab, sub.device)  # [R, V]
    seen = counts > 0
    repetition = torch.tensor([row.params.repetition_penalty for row in picked], dtype=sub.dtype, device=sub.device)
    if bool((repetition != 1.0).any()):
        in_prompt = _token_counts([row.prompt_ids for row in picked], vocab, sub.device) > 0
        scale = repetition[:, None].expand_as(sub)
        penalised = torch.where(sub > 0, sub / scale, sub * scale)
        sub = torch.where(seen | in_prompt, penalised, sub)
    frequency = torch.tensor([row.params.frequency_penalty for row in picked], dtype=sub.dtype, device=sub.device)
    presence = torch.tensor([row.params.presence_penalty for row in picked], dtype=sub.dtype, device=sub.device)
    sub = sub - frequency[:, None] * counts.to(sub.dtype) - presence[:, None] * seen.to(sub.dtype)
    logits.index_copy_(0, select, sub)


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] int32: how often each token occurs in each list (one scatter for all rows)."""
    longest = max((len(tokens) for tokens in token_lists), default=0)
    ids = torch.full((len(token_lists), longest + 1), vocab, dtype=torch.int64)  # vocab = padding column
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.int32)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab].to(device)


def raw_logprobs(logits: torch.Tensor, chosen: list[int], tops: list[int | None]) -> list[TokenLogprob | None]:
    """logits: [N, V] raw; chosen: the token picked per row; tops: the row's `logprobs`
    (None: the row wants none). One pass over the rows that want them."""
    wanted = [index for index, top in enumerate(tops) if top is not None]
    result: list[TokenLogprob | None] = [None] * len(tops)
    if not wanted:
        return result
    rows = logits.index_select(0, torch.tensor(wanted, device=logits.device))  # [W, V]
    entries = token_logprobs(rows, [chosen[i] for i in wanted], [tops[i] for i in wanted])
    for index, entry in zip(wanted, entries):
        result[index] = entry
    return result


def token_logprobs(logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """logits: [M, V] raw rows; targets: [M] the token each row scores; tops: [M]
    alternatives per row. Each entry: the target's log probability and rank, and the row's
    tops[m] most likely tokens (`kernels.logprobs.score_rows`: one native pass per row on
    CPU, no [M, V] tensor of log probabilities written; a whole prompt chunk's rows are
    scored at once)."""
    if not targets:
        return []
    target_lp, rank, top_ids, top_lp = score_rows(logits.float(), torch.tensor(targets, dtype=torch.int64), max(tops))
    return [TokenLogprob(target, value, tuple(zip(ids[:top], lps[:top])), rank=position)
            for target, value, ids, lps, top, position in zip(targets, target_lp.tolist(), top_ids.tolist(),
                                                              top_lp.tolist(), tops, rank.tolist())]
