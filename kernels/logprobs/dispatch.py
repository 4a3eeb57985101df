"""The one place that picks how rows of logits are scored: the compiled call where it
takes the tensors (`native.py`), the torch version otherwise (`reference.py`)."""

from __future__ import annotations

import torch

from loraquilt.kernels.logprobs import native
from loraquilt.kernels.logprobs.reference import score_rows_reference


def score_rows(logits: torch.Tensor, targets: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`score_rows_reference`: each row's target log probability, the target's rank and the
    row's k most likely tokens, in one native call where it applies.

    logits: [M, V] float32, targets: [M] int64 ->
        (target_lp [M] float32, rank [M] int64, top_ids [M, k] int64, top_lp [M, k] float32)"""
    if native.supports(logits, k):
        return native.score_rows_native(logits, targets, k)
    return score_rows_reference(logits, targets.to(logits.device), k)
