"""Which adapters one request may combine (RequestError on `adapters` otherwise).

Semantics:
- A DoRA adapter, an adapter with its own input embeddings or lm_head, and an activated
  LoRA are served alone at weight 1: each applies something of its own that no weighted
  sum of adapters has (a DoRA output scale from its own weights' norms, whole token
  tables, an activation point).
- A merge (a derived adapter) takes plain LoRA adapters only: it combines their B·A.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from loraquilt.server.request import RequestError

if TYPE_CHECKING:
    from loraquilt.server.adapters.record import AdapterRecord

# (record flag, what the adapter has, why it is served alone)
_ALONE = (
    ("dora", "is a DoRA adapter", "DoRA scales each output by its own weights' norms"),
    ("heads", "has its own input embeddings or lm_head (modules_to_save, trainable_token_indices)",
     "its rows read its token tables whole"),
    ("alora", "is an aLoRA adapter", "it applies from its own invocation tokens on"),
)


def check_served_alone(records: Sequence[AdapterRecord], weights: Sequence[float] | None = None) -> None:
    """Refuse a mix that includes an adapter served alone, or such an adapter at a weight
    other than 1 (weights: one per record; None: not checked)."""
    for flag, what, why in _ALONE:
        for index, record in enumerate(records):
            if not getattr(record, flag):
                continue
            if len(records) > 1:
                raise RequestError("adapters", f"adapter {record.name!r} {what}, which is served alone: a mix "
                                               f"may not include it ({why})")
            if weights is not None and weights[index] != 1.0:
                raise RequestError("adapters.weight", f"adapter {record.name!r} {what}, served only alone at "
                                                      f"weight 1 (got {weights[index]:g})")


def check_mergeable(records: Sequence[AdapterRecord]) -> None:
    """Refuse a merge member that is not a plain LoRA adapter."""
    for flag, what, why in _ALONE:
        for record in records:
            if getattr(record, flag):
                raise RequestError("adapters", f"adapter {record.name!r} {what}; merges take plain LoRA adapters "
                                               f"({why})")
