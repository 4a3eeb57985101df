"""Scoring rows of logits, in torch: the semantics and ground truth of the native version
(`native.py`), and the path wherever it does not apply (CUDA, no compiler)."""

from __future__ import annotations

import torch


def score_rows_reference(logits: torch.Tensor, targets: torch.Tensor,
                         k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantics, per row m (lp = log_softmax(logits[m])):
        target_lp[m] = lp[targets[m]]
        rank[m]      = 1 + #{v: logits[m, v] > logits[m, targets[m]]}
        top_ids[m], top_lp[m] = the k largest lp, largest first (ties: lower id first)
    Non-finite rows (a NaN or +inf logit) give a non-finite target_lp.

    logits: [M, V] float32, targets: [M] int64, k <= V ->
        (target_lp [M] float32, rank [M] int64, top_ids [M, k] int64, top_lp [M, k] float32)"""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [M, 1]
    target_logits = logits.gather(1, targets[:, None])  # [M, 1]
    rank = (logits > target_logits).sum(dim=-1) + 1
    if k:
        top_logits, top_ids = torch.topk(logits, k, dim=-1)  # [M, k]
    else:
        top_logits, top_ids = logits[:, :0], targets[:, None][:, :0]
    return (target_logits - lse)[:, 0], rank, top_ids, top_logits - lse
