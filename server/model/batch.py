"""One forward step's description: which tokens run, where their keys go, what to attend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class LoraHook(Protocol):
    """What the model asks of the adapter layer: add this step's LoRA deltas in place, or
    hand them to the fused NF4 + LoRA kernel; then scale the rows on DoRA adapters; and
    the embeddings and logits of rows on adapters with their own token tables."""

    def add_(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str) -> None:
        """y: [T, out] projection output, x: [T, in] its input."""

    fuses_lora: bool  # whether the fused NF4 + LoRA kernel may add the deltas

    def fused_args(self, layer: int, parts: tuple[tuple[str, int], ...]):
        """(FusedLora, PairsArgs) of `kernels.nf4.fused_lora` for one NF4 weight whose output
        columns are `parts` ((projection, width) in order), or None when no row of the
        step uses any of them."""

    has_dora: bool  # whether a row of the step is on a DoRA adapter (then call dora_scale_)

    def dora_scale_(self, y: torch.Tensor, layer: int, parts: tuple[tuple[str, int], ...]) -> None:
        """y: [T, sum of the parts' out], one NF4 weight's whole output with its LoRA deltas,
        before its bias: rows on a DoRA adapter times that adapter's output scale, in place."""

    def dora_row_scale(self, layer: int, parts: tuple[tuple[str, int], ...]):
        """The same for the fused NF4 + LoRA kernel (`kernels.nf4.RowScale`, applied in its
        epilogue before the bias), or None when no row of the step needs it."""

    has_heads: bool  # whether a row of the step is on an adapter with its own token tables

    def embed_(self, x: torch.Tensor, input_ids: torch.Tensor) -> None:
        """x: [T, hidden] the base's embeddings of input_ids [T]: rows on an adapter with
        its own input embeddings read those instead, in place."""

    def head_logits(self, x: torch.Tensor, logits_rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] final-normed states of the token rows logits_rows [N], base: [V,
        hidden] the base's lm_head -> logits [N, V] float32, each row by its adapter's lm_head
        (or the base's)."""


@dataclass(frozen=True)
class PrefillSpan:
    """Tokens token_start:token_end of the step are one sequence's chunk; the first of them
    sits at position `cache_start`; block_table: [blocks] int64, that sequence's blocks
    covering every position up to the chunk's end."""

    token_start: int
    token_end: int
    cache_start: int
    block_table: torch.Tensor


@dataclass(frozen=True)
class ForwardBatch:
    """Flattened tokens of every sequence in the step (single-token decodes, then chunks).

    input_ids:            [T] int64
    positions:            [T] int64   position of each token in its sequence
    slot_mapping:         [T] int64   flat KV cache slot each token's key/value is written to
                                      (block * block_size + position % block_size)
    prefills:             host spans, one per chunk (a sequence fed more than its last token)
    decode_block_tables:  [D, B] int64  each decode's blocks, padded with block 0 to the
                                      B blocks the longest decode context needs
    decode_context_lens:  [D] int64   positions each decode attends (its token's position + 1)
    logits_rows:          [N + M] int64  token rows whose next-token logits are wanted: one
                                      per sequence that samples, then the M rows that score
                                      prompt tokens (`scored_rows` = M)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    prefills: tuple[PrefillSpan, ...]
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    logits_rows: torch.Tensor
    scored_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_decodes(self) -> int:
        return int(self.decode_context_lens.shape[0])


def build_forward_batch(
    *,
    prefill_tokens: list[list[int]],
    prefill_tables: list[list[int]],
    prefill_starts: list[int],
    decode_tokens: list[int],
    decode_tables: list[list[int]],
    decode_positions: list[int],
    block_size: int,
    prefill_logits: list[bool] | None = None,
    prefill_scored: list[range] | None = None,
    device: torch.device,
) -> ForwardBatch:
    """Lay out one step: decodes first (one token each), then each chunk's tokens.

    A table lists a sequence's block ids in position order; it must cover every position
    the step writes. Logits rows: one per sequence in the same order (decodes, then
    chunks' last token), leaving out the chunks whose `prefill_logits` is False (a chunk
    that does not end the prompt needs no next token); then, per chunk in order, the rows
    of the positions in its `prefill_scored` range (positions whose logits score prompt
    tokens; inside the chunk).
    """
    wants_logits = prefill_logits if prefill_logits is not None else [True] * len(prefill_tokens)
    scored = prefill_scored if prefill_scored is not None else [range(0)] * len(prefill_tokens)
    scored_rows: list[int] = []
    decode_count = len(decode_tokens)
    ids: list[int] = list(decode_tokens)
    positions: list[int] = list(decode_positions)
    slots = [table[p // block_size] * block_size + p % block_size
             for table, p in zip(decode_tables, decode_positions)]
    spans: list[PrefillSpan] = []
    logits_rows = list(range(decode_count))
    for tokens, table, start, wanted, positions_scored in zip(prefill_tokens, prefill_tables, prefill_starts,
                                                               wants_logits, scored):
        if not tokens:
            raise ValueError("a prefill needs at least one token")
        end = start + len(tokens)
        if len(table) * block_size < end:
            raise ValueError(f"a block table of {len(table)} blocks cannot hold {end} positions")
        first = len(ids)
        ids.extend(tokens)
        positions.extend(range(start, end))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        used = -(-end // block_size)
        spans.append(PrefillSpan(first, len(ids), start, torch.tensor(table[:used], dtype=torch.int64).to(device)))
        if wanted:
            logits_rows.append(len(ids) - 1)
        if positions_scored and not start <= positions_scored.start <= positions_scored.stop <= end:
            raise ValueError(f"scored positions {positions_scored} outside the chunk {start}..{end}")
        scored_rows.extend(first + p - start for p in positions_scored)

    width = max((-(-(p + 1) // block_size) for p in decode_positions), default=0)
    padded = [table[:width] + [0] * (width - len(table[:width])) for table in decode_tables]
    tables = torch.tensor(padded, dtype=torch.int64).view(decode_count, width)

    def t(values):
        return torch.tensor(values, dtype=torch.int64).to(device)

    return ForwardBatch(
        input_ids=t(ids),
        positions=t(positions),
        slot_mapping=t(slots),
        prefills=tuple(spans),
        decode_block_tables=tables.to(device),
        decode_context_lens=t([p + 1 for p in decode_positions]),
        logits_rows=t(logits_rows + scored_rows),
        scored_rows=len(scored_rows),
    )


def contiguous_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    """Block tables for sequences of `lengths` positions laid out one after another from
    block 0 (tests and one-off forwards that own the whole cache)."""
    tables, next_block = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    return tables
