"""Per-row token tables (adapters' own embeddings and lm_heads): `embed_rows_` and
`head_logits` against their reference loops over raw rows, over dtypes, vocabulary and
hidden sizes (incl. non-powers of two), row counts and popularity patterns, with whole
tables and replaced rows (TokenRows) mixed; rows on no table keep the base's."""

import pytest
import torch

from loraquilt.kernels.lora import TokenRows, build_table_groups, embed_rows_, head_logits, project_logits
from loraquilt.kernels.lora.heads import VOCAB_MAJOR_MAX_ROWS, embed_rows_reference_, head_logits_reference

from cases import PATTERNS, TOLERANCES, row_slots_for

DTYPES = (torch.float32, torch.bfloat16)
NUM_TABLES = 4  # tables 0 and 2 whole, 1 and 3 replaced rows


def _tables(vocab: int, hidden: int, dtype, gen) -> list:
    tables = []
    for index in range(NUM_TABLES):
        if index % 2 == 0:
            tables.append(torch.randn(vocab, hidden, generator=gen).to(dtype))
        else:
            count = 1 + index * 3 % vocab
            indices = torch.randperm(vocab, generator=gen)[:count].sort().values
            tables.append(TokenRows(indices, torch.randn(count, hidden, generator=gen).to(dtype)))
    return tables


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, 7, 133])
@pytest.mark.parametrize("vocab, hidden", [(50, 64), (301, 72)])
def test_embed_rows_equal_the_reference_bit_for_bit(dtype, pattern, rows, vocab, hidden, one_thread):
    gen = torch.Generator().manual_seed(rows + vocab + PATTERNS.index(pattern))
    tables = _tables(vocab, hidden, dtype, gen)
    row_tables = row_slots_for(pattern, rows, NUM_TABLES, gen).tolist()
    # ids drawn so that replaced rows are hit often: half from the replaced rows
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    replaced = torch.cat([t.indices for t in tables if isinstance(t, TokenRows)])
    pick = torch.rand(rows, generator=gen) < 0.5
    ids = torch.where(pick, replaced[torch.randint(0, replaced.numel(), (rows,), generator=gen)], ids)
    base = torch.randn(vocab, hidden, generator=gen).to(dtype)
    groups = build_table_groups(row_tables, tables)
    start = base[ids]  # [T, H]
    if groups is None:
        assert all(t == -1 for t in row_tables)
        return
    fast = embed_rows_(start.clone(), ids, groups)
    slow = embed_rows_reference_(start.clone(), ids, groups)
    assert torch.equal(fast, slow)
    for row, table in enumerate(row_tables):  # rows on no table keep the base's
        if table == -1:
            assert torch.equal(fast[row], base[ids[row]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, VOCAB_MAJOR_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("vocab, hidden", [(50, 64), (301, 72)])
def test_head_logits_equal_the_reference(dtype, pattern, rows, vocab, hidden, one_thread):
    gen = torch.Generator().manual_seed(3 * rows + vocab + PATTERNS.index(pattern))
    tables = _tables(vocab, hidden, dtype, gen)
    row_tables = row_slots_for(pattern, rows, NUM_TABLES, gen).tolist()
    base = torch.randn(vocab, hidden, generator=gen).to(dtype)
    x = (torch.randn(rows, hidden, generator=gen) / hidden**0.5).to(dtype)
    groups = build_table_groups(row_tables, tables)
    fast = head_logits(x, base, groups)
    slow = head_logits_reference(x, base, groups)
    assert fast.dtype == torch.float32 and fast.shape == (rows, vocab)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(fast, slow, atol=atol, rtol=rtol)
    if groups is None:  # every row on the base: exactly the base's dense product
        assert torch.equal(fast, project_logits(x, base))


def test_every_row_on_one_whole_table_is_one_product():
    gen = torch.Generator().manual_seed(5)
    table, base = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    groups = build_table_groups([0] * 5, [table])
    assert torch.equal(head_logits(x, base, groups), project_logits(x, table))


def test_replaced_rows_change_only_their_columns_and_tokens():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(20, 8, generator=gen)
    rows = TokenRows(torch.tensor([2, 11]), torch.randn(2, 8, generator=gen))
    x = torch.randn(3, 8, generator=gen)
    groups = build_table_groups([0, -1, 0], [rows])
    logits, plain = head_logits(x, base, groups), project_logits(x, base)
    changed = (logits != plain).any(dim=0).nonzero().view(-1).tolist()
    assert changed == [2, 11] and torch.equal(logits[1], plain[1])
    ids = torch.tensor([2, 3, 11])
    embedded = embed_rows_(base[ids], ids, build_table_groups([0, 0, -1], [rows]))
    assert torch.equal(embedded[0], rows.values[0]) and torch.equal(embedded[1], base[3])
    assert torch.equal(embedded[2], base[11])  # row 2 reads the base's table


def test_table_groups_refuse_bad_indices_and_widths():
    with pytest.raises(ValueError, match="-1"):
        build_table_groups([0, -2], [torch.zeros(4, 2)])
    groups = build_table_groups([0], [torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="does not fit"):
        head_logits(torch.zeros(1, 2), torch.zeros(4, 2), groups)
    with pytest.raises(ValueError, match="rows"):
        embed_rows_(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), groups)
