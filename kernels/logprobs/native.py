"""The compiled CPU row scoring (`logprobs.c`, beside this file): each row of logits read
once for its maximum, the chosen token's rank and the top k, and once more, from cache,
for its log-sum-exp.

Built and loaded by `kernels/native_build.py`; `available()` is False (after one warning
line) where it cannot be built, and callers use the torch version (`reference.py`).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from loraquilt.kernels.native_build import load_native

SOURCE = Path(__file__).with_name("logprobs.c")
MAX_TOP = 64  # logprobs.c's bound on k


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    built = load_native(SOURCE, "logprobs", "using torch to score log probabilities",
                        {"score_rows": ([p, i64, i64, i64, p, i64, p, p, p, p], None)})
    return None if built is None else built[0]


def available() -> bool:
    return _library() is not None


def supports(logits: torch.Tensor, k: int) -> bool:
    """Whether `score_rows_native` takes these: CPU float32 rows of unit stride, k <= MAX_TOP."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and 0 <= k <= min(MAX_TOP, logits.shape[1]) and available())


def score_rows_native(logits: torch.Tensor, targets: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantics: `reference.score_rows_reference`.

    logits: [M, V] float32, targets: [M] int64 (see `supports`) ->
        (target_lp [M] float32, rank [M] int64, top_ids [M, k] int64, top_lp [M, k] float32)"""
    rows, vocab = logits.shape
    targets = targets.to(torch.int64).contiguous()
    target_lp = torch.empty(rows, dtype=torch.float32)
    rank = torch.empty(rows, dtype=torch.int64)
    top_ids = torch.empty(rows, k, dtype=torch.int64)
    top_lp = torch.empty(rows, k, dtype=torch.float32)
    if rows:
        _library().score_rows(logits.data_ptr(), rows, vocab, logits.stride(0), targets.data_ptr(), k,
                              target_lp.data_ptr(), rank.data_ptr(), top_ids.data_ptr(), top_lp.data_ptr())
    return target_lp, rank, top_ids, top_lp
