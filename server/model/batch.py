"""One forward step's description: which tokens run, where their keys go, what to attend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class LoraHook(Protocol):
    """What the model asks of the adapter layer: add this step's LoRA deltas in place."""

    def add_(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str) -> None:
        """y: [T, out] projection output, x: [T, in] its input."""


@dataclass(frozen=True)
class PrefillSpan:
    """Prompt tokens token_start:token_end of the step belong to one sequence whose
    cache slot is `cache_slot`; the first of them sits at position `cache_start`."""

    token_start: int
    token_end: int
    cache_slot: int
    cache_start: int


@dataclass(frozen=True)
class ForwardBatch:
    """Flattened tokens of every sequence in the step (prefills and single-token decodes).

    input_ids:          [T] int64
    positions:          [T] int64   position of each token in its sequence
    token_cache_slots:  [T] int64   KV cache slot of each token's sequence
    prefills:           host spans, one per prefilling sequence
    decode_rows:        [D] int64   token index of each decoding sequence's token
    decode_local_slots: [D] int64   its cache slot minus decode_slot_lo
    decode_mask:        [S, 1, 1, L] additive float mask over cache slots
                        decode_slot_lo:decode_slot_lo+S and the first L positions
                        (0 where attended, -inf elsewhere; empty slots see position 0)
    decode_slot_lo:     first cache slot of the decode window (host int)
    logits_rows:        [N] int64   token rows whose next-token logits are wanted
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    token_cache_slots: torch.Tensor
    prefills: tuple[PrefillSpan, ...]
    decode_rows: torch.Tensor
    decode_local_slots: torch.Tensor
    decode_mask: torch.Tensor
    decode_slot_lo: int
    logits_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_decodes(self) -> int:
        return int(self.decode_rows.shape[0])


def build_forward_batch(
    *,
    prefill_tokens: list[list[int]],
    prefill_slots: list[int],
    prefill_starts: list[int],
    decode_tokens: list[int],
    decode_slots: list[int],
    decode_positions: list[int],
    prefill_logits: list[bool] | None = None,
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> ForwardBatch:
    """Lay out one step: decodes first (one token each), then each prefill's tokens.

    Logits rows: one per sequence in the same order (decodes, then prefills' last token),
    leaving out the prefills whose `prefill_logits` is False (a chunk that does not end the
    prompt needs no next token).
    """
    wants_logits = prefill_logits if prefill_logits is not None else [True] * len(prefill_tokens)
    decode_count = len(decode_tokens)
    ids: list[int] = list(decode_tokens)
    positions: list[int] = list(decode_positions)
    slots: list[int] = list(decode_slots)
    spans: list[PrefillSpan] = []
    logits_rows = list(range(decode_count))
    for tokens, slot, start, wanted in zip(prefill_tokens, prefill_slots, prefill_starts, wants_logits):
        if not tokens:
            raise ValueError("a prefill needs at least one token")
        first = len(ids)
        ids.extend(tokens)
        positions.extend(range(start, start + len(tokens)))
        slots.extend([slot] * len(tokens))
        spans.append(PrefillSpan(first, len(ids), slot, start))
        if wanted:
            logits_rows.append(len(ids) - 1)

    if decode_count:
        lo, hi = min(decode_slots), max(decode_slots) + 1
        context = max(decode_positions) + 1
        lens = torch.ones(hi - lo, dtype=torch.int64)  # [S] empty slots: attend position 0
        lens[torch.tensor(decode_slots) - lo] = torch.tensor(decode_positions) + 1
        key_pos = torch.arange(context).unsqueeze(0)  # [1, L]
        visible = key_pos < lens.unsqueeze(1)  # [S, L]
        if sliding_window is not None:
            visible &= key_pos > lens.unsqueeze(1) - 1 - sliding_window
        decode_mask = torch.zeros(hi - lo, 1, 1, context, dtype=dtype)
        decode_mask.masked_fill_(~visible.view(hi - lo, 1, 1, context), float("-inf"))
        local = torch.tensor(decode_slots, dtype=torch.int64) - lo
    else:
        lo = 0
        decode_mask = torch.zeros(0, 1, 1, 0, dtype=dtype)
        local = torch.zeros(0, dtype=torch.int64)

    def t(values, kind=torch.int64):
        return torch.tensor(values, dtype=kind).to(device)

    return ForwardBatch(
        input_ids=t(ids),
        positions=t(positions),
        token_cache_slots=t(slots),
        prefills=tuple(spans),
        decode_rows=t(list(range(decode_count))),
        decode_local_slots=local.to(device),
        decode_mask=decode_mask.to(device),
        decode_slot_lo=lo,
        logits_rows=t(logits_rows),
    )
