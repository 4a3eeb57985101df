"""Scoring rows of logits: each row's log probability of one chosen token, that token's
rank and the row's top k (generated tokens' and prompt tokens' log probabilities).

Modules:
    reference.py   the torch version: the semantics, and the path where no native call applies
    native.py      the compiled CPU call (`logprobs.c`)
    dispatch.py    the one place that picks between them (`score_rows`)
"""

from loraquilt.kernels.logprobs.dispatch import score_rows
from loraquilt.kernels.logprobs.native import available
from loraquilt.kernels.logprobs.reference import score_rows_reference

__all__ = ["available", "score_rows", "score_rows_reference"]
