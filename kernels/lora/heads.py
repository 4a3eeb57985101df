"""Per-row token tables (PEFT `modules_to_save` of embed_tokens / lm_head and
`trainable_token_indices`): rows of one step read their adapter's input embeddings and
get their logits from their adapter's lm_head, the other rows the base model's.

A token table is either a whole [V, H] table (a retrained embedding or head) or some of
its rows replaced over the base's (`TokenRows`, trained tokens: only those rows are kept).
A step names its rows' tables once per use (`build_table_groups`: rows grouped by table);
`embed_rows_` then overwrites the base embeddings of the grouped rows, and `head_logits`
computes every row's logits with one matmul per distinct whole table (the base's
included) and one small matmul per set of replaced rows.

Backends: `*_reference` (a loop over raw rows, float32) and the grouped torch paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Above this many logits rows the row-major GEMM wins: the transposing copy after a
# vocab-major one grows with the rows (Intel Xeon, 2 cores, SmolLM2's [49152, 576] head, 128
# rows: fp32 29 against 40 ms, bf16 11 against 22 ms; at 8 rows vocab-major is 1.2-1.8x faster).
VOCAB_MAJOR_MAX_ROWS = 16


@dataclass(frozen=True)
class TokenRows:
    """Rows of a [V, H] token table replaced, every other row the base table's.

    indices: [K] int64  the replaced rows, increasing, each < V
    values:  [K, H]     their values, in indices' order (the table's dtype)
    """

    indices: torch.Tensor
    values: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TokenRows:
        return TokenRows(self.indices.to(device), self.values.to(device, dtype or self.values.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values))


TokenTable = torch.Tensor | TokenRows  # a whole [V, H] table, or rows replaced over the base's


@dataclass(frozen=True)
class TableGroups:
    """A step's rows grouped by the table they read; a row in no group reads the base's.

    rows:     per group [n_g] int64, its rows (increasing; the groups' rows disjoint)
    tables:   per group its TokenTable
    num_rows: the step's rows (T embedding rows, or N logits rows)
    """

    rows: tuple[torch.Tensor, ...]
    tables: tuple[TokenTable, ...]
    num_rows: int


def build_table_groups(row_tables: Sequence[int], tables: Sequence[TokenTable],
                       device: torch.device | str = "cpu") -> TableGroups | None:
    """row_tables: per row an index into `tables`, or -1 for the base's. None when no row
    reads an adapter's table."""
    by_table: dict[int, list[int]] = {}
    for row, table in enumerate(row_tables):
        if table >= 0:
            by_table.setdefault(table, []).append(row)
        elif table != -1:
            raise ValueError(f"a row's table must be >= 0 or -1 (the base's), got {table}")
    if not by_table:
        return None
    order = sorted(by_table)
    return TableGroups(tuple(torch.tensor(by_table[t], dtype=torch.int64, device=device) for t in order),
                       tuple(tables[t] for t in order), len(row_tables))


def _check(groups: TableGroups, rows: int, width: int) -> None:
    if groups.num_rows != rows:
        raise ValueError(f"the groups cover {groups.num_rows} rows, the tensor has {rows}")
    for table in groups.tables:
        values = table.values if isinstance(table, TokenRows) else table
        if values.dim() != 2 or values.shape[1] != width:
            raise ValueError(f"a token table of shape {tuple(values.shape)} does not fit width {width}")


def _replaced(table: TokenRows, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of `ids` [n] are replaced rows of `table`: (mask [n] bool, their position in
    table.indices [n], meaningful where the mask is set)."""
    position = torch.searchsorted(table.indices, ids).clamp_(max=table.indices.numel() - 1)  # [n]
    return table.indices[position] == ids, position


# -- input embeddings -----------------------------------------------------------------------------


def embed_rows_(out: torch.Tensor, ids: torch.Tensor, groups: TableGroups) -> torch.Tensor:
    """Semantics: `embed_rows_reference_`.

    out: [T, H] the base's embeddings of `ids`, overwritten in place for the grouped rows
    ids: [T] int64 token ids"""
    _check(groups, out.shape[0], out.shape[1])
    for rows, table in zip(groups.rows, groups.tables):
        tokens = ids.index_select(0, rows)  # [n]
        if isinstance(table, TokenRows):
            hit, position = _replaced(table, tokens)
            rows, position = rows[hit], position[hit]
            out.index_copy_(0, rows, table.values.index_select(0, position).to(out.dtype))
        else:
            out.index_copy_(0, rows, table.index_select(0, tokens).to(out.dtype))
    return out


def embed_rows_reference_(out: torch.Tensor, ids: torch.Tensor, groups: TableGroups) -> torch.Tensor:
    """Semantics:
        for rows, table in zip(groups.rows, groups.tables):
            for t in rows:
                whole table:          out[t] = table[ids[t]]
                TokenRows, ids[t] == table.indices[k]:  out[t] = table.values[k]
                TokenRows, ids[t] not replaced:         out[t] unchanged (the base's)
        rows in no group unchanged

    out: [T, H], ids: [T] int64 -> out, updated in place"""
    _check(groups, out.shape[0], out.shape[1])
    for rows, table in zip(groups.rows, groups.tables):
        for t in rows.tolist():
            token = int(ids[t])
            if isinstance(table, TokenRows):
                replaced = table.indices.tolist()
                if token in replaced:
                    out[t] = table.values[replaced.index(token)].to(out.dtype)
            else:
                out[t] = table[token].to(out.dtype)
    return out


# -- lm_head logits ---------------------------------------------------------------------------------


def project_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [N, H], weight: [V, H] -> x @ weight.T as [N, V] float32 (row-major).

    For a few rows a vocab-major GEMM streams the [V, H] table once (much faster on CPU
    than x @ weight.T there), then one copy to row-major float32: the sampler's row-wise
    argmax and finiteness checks are ~10x slower on the transposed view."""
    if x.shape[0] > VOCAB_MAJOR_MAX_ROWS:
        return torch.mm(x, weight.t()).float()  # [N, V]
    logits_t = torch.mm(weight, x.t())  # [V, N]
    logits = torch.empty(logits_t.shape[::-1], dtype=torch.float32, device=logits_t.device)
    return logits.copy_(logits_t.t())  # [N, V]


def head_logits(x: torch.Tensor, base: torch.Tensor, groups: TableGroups | None,
                project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = project_logits) -> torch.Tensor:
    """Semantics: `head_logits_reference` (each product in x's dtype, then float32).

    x:     [N, H] final-normed hidden states of the logits rows
    base:  [V, H] the base model's lm_head
    groups: the rows on an adapter's lm_head (None: every row on the base's)
    project: (x [n, H], table [V, H]) -> [n, V] float32, the dense product
    -> [N, V] float32

    One `project` per distinct whole table with rows (the base's for the rows on none or on
    replaced rows), then per set of replaced rows one [n, K] product written over its columns."""
    if groups is None:
        return project(x, base)
    _check(groups, x.shape[0], x.shape[1])
    whole = [(rows, table) for rows, table in zip(groups.rows, groups.tables) if not isinstance(table, TokenRows)]
    if len(whole) == 1 and whole[0][0].numel() == x.shape[0]:  # every row on one whole table
        return project(x, whole[0][1])
    if not whole:
        logits = project(x, base)
    else:
        logits = torch.empty(x.shape[0], base.shape[0], dtype=torch.float32, device=x.device)  # [N, V]
        on_base = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for rows, table in whole:
            on_base[rows] = False
            logits.index_copy_(0, rows, project(x.index_select(0, rows), table))
        base_rows = on_base.nonzero().view(-1)  # [n]
        if base_rows.numel():
            logits.index_copy_(0, base_rows, project(x.index_select(0, base_rows), base))
    for rows, table in zip(groups.rows, groups.tables):
        if isinstance(table, TokenRows):
            replaced = torch.mm(x.index_select(0, rows), table.values.to(x.dtype).t()).float()  # [n, K]
            logits[rows.unsqueeze(1), table.indices.unsqueeze(0)] = replaced
    return logits


def head_logits_reference(x: torch.Tensor, base: torch.Tensor, groups: TableGroups | None) -> torch.Tensor:
    """Semantics:
        for every row t:
            W = the whole table of t's group, or base with t's group's rows replaced
                (W[indices[k]] = values[k]), or base for a row in no group
            logits[t] = W.float() @ x[t].float()

    x: [N, H], base: [V, H] -> [N, V] float32"""
    row_table: dict[int, TokenTable] = {}
    if groups is not None:
        _check(groups, x.shape[0], x.shape[1])
        for rows, table in zip(groups.rows, groups.tables):
            row_table.update((t, table) for t in rows.tolist())
    logits = torch.empty(x.shape[0], base.shape[0], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        table = row_table.get(t)
        if table is None:
            weight = base.float()
        elif isinstance(table, TokenRows):
            weight = base.float().clone()
            weight[table.indices] = table.values.float()
        else:
            weight = table.float()
        logits[t] = weight @ x[t].float()
    return logits
