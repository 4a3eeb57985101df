"""The device's copies of resident adapters' token tables (their own input embeddings and
lm_head, heads.py), and a step's use of them.

At most `capacity` slots hold tables at once (--max-lora-head-adapters): a whole
vocabulary table is as large as a thousand LoRA modules, so they are not preallocated per
slot; each is placed when its adapter is copied into a slot and dropped when the slot is
cleared. The device tier keeps the bound: it evicts an unpinned slot holding tables, or
answers NO_ROOM (the request waits), before it loads another (device_tier.py). On a CPU
device the tables are the host copy's own tensors (no second copy; `shared_bytes`).

In a step, the rows of a sequence on such an adapter read their input embeddings from its
table (rows grouped by slot, one gather each) and get their logits from its lm_head (rows
grouped by head, one matmul each, the base's head for the other rows): `StepHeads`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from loraquilt.kernels.lora import (
    NO_ADAPTER, TokenTable, build_table_groups, embed_rows_, head_logits, project_logits,
)
from loraquilt.kernels.lora.heads import embed_rows_reference_, head_logits_reference
from loraquilt.server.adapters.heads import AdapterHeads


class HeadPool:
    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device, backend: str = "auto"):
        if capacity < 1:
            raise ValueError(f"the head pool's capacity must be >= 1, got {capacity}")
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.reference = backend == "reference"  # the kernels' reference loops (tests, debugging)
        self._heads: dict[int, AdapterHeads] = {}  # slot -> its tables on the device

    @property
    def free(self) -> int:
        return self.capacity - len(self._heads)

    def holds(self, slot: int) -> bool:
        return slot in self._heads

    def get(self, slot: int) -> AdapterHeads | None:
        return self._heads.get(slot)

    def load(self, slot: int, heads: AdapterHeads | None) -> None:
        """The slot's tables (none for an adapter without); the pool must have room."""
        self.clear(slot)
        if heads is None:
            return
        if not self.free:
            raise RuntimeError(f"all {self.capacity} head places are taken: the device tier evicts before loading")
        self._heads[slot] = heads.to(self.device, self.dtype)

    def clear(self, slot: int) -> None:
        self._heads.pop(slot, None)

    @property
    def num_bytes(self) -> int:
        """Bytes of the tables held (each tensor once)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def shared_bytes(self, host: Iterable[AdapterHeads]) -> int:
        """Bytes of the tables held that are also tensors of these host copies (a CPU
        device keeps the host copy's tensors: counted once, here)."""
        held = self._tensors()
        shared = {id(t) for heads in host for t in heads.tensors() if id(t) in held}
        return sum(held[key].numel() * held[key].element_size() for key in shared)

    def _tensors(self) -> dict[int, torch.Tensor]:
        return {id(t): t for heads in self._heads.values() for t in heads.tensors()}

    def step(self, span_slots: Sequence[int], span_rows: Sequence[int]) -> StepHeads | None:
        """The step's use of the tables: span_slots: per span (one sequence's rows) the slot
        whose tables it reads, or NO_ADAPTER; span_rows: per span its rows. None when no
        row reads one."""
        on = [self._heads.get(slot) if slot != NO_ADAPTER else None for slot in span_slots]
        if all(heads is None for heads in on):
            return None
        return StepHeads(on, list(span_rows), self.device, self.reference)


class StepHeads:
    """One step's token tables: per span (one sequence's rows) the tables of its slot."""

    def __init__(self, on: list[AdapterHeads | None], span_rows: list[int], device: torch.device,
                 reference: bool):
        self.device, self.reference = device, reference
        self.span_ends = torch.tensor(span_rows, dtype=torch.int64).cumsum(0)  # [S]
        embeds, span_embed = _distinct([heads.embed if heads else None for heads in on])
        self.heads, span_head = _distinct([heads.lm_head if heads else None for heads in on])
        self.span_head = torch.tensor(span_head, dtype=torch.int64)  # [S]: its lm_head, -1 the base's
        row_embed = [table for table, rows in zip(span_embed, span_rows) for _ in range(rows)]  # [T]
        self._embed = build_table_groups(row_embed, embeds, device)

    def embed_(self, x: torch.Tensor, input_ids: torch.Tensor) -> None:
        """x: [T, hidden], the base's embeddings of input_ids [T]: the rows on an adapter
        with its own embeddings read them instead, in place."""
        if self._embed is not None:
            (embed_rows_reference_ if self.reference else embed_rows_)(x, input_ids, self._embed)

    def logits(self, x: torch.Tensor, logits_rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden], the final-normed states of the step's token rows `logits_rows`
        [N]; base: [V, hidden] the base's lm_head -> [N, V] float32, each row by its
        adapter's lm_head or the base's."""
        groups = None
        if self.heads:
            span = torch.searchsorted(self.span_ends, logits_rows.cpu(), right=True)  # [N] each row's span
            groups = build_table_groups(self.span_head.index_select(0, span).tolist(), self.heads, self.device)
        if self.reference:
            return head_logits_reference(x, base, groups)
        return head_logits(x, base, groups, project_logits)


def _distinct(tables: list[TokenTable | None]) -> tuple[list[TokenTable], list[int]]:
    """(the distinct tables, per entry the index of its table among them or -1 for none)."""
    found: list[TokenTable] = []
    seen: dict[int, int] = {}
    index = []
    for table in tables:
        if table is not None and id(table) not in seen:
            seen[id(table)] = len(found)
            found.append(table)
        index.append(-1 if table is None else seen[id(table)])
    return found, index
