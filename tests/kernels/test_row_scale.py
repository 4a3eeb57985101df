"""DoRA's per-row output scale (`row_scale_`) against its reference loop over raw rows:
bit for bit, over dtypes, widths (incl. a column slice of a wider buffer), row counts and
popularity patterns; rows without a slot stay untouched."""

import pytest
import torch

from loraquilt.kernels.lora import NO_ADAPTER, build_row_scale_meta, row_scale_
from loraquilt.kernels.lora.row_scale import row_scale_reference_

from cases import PATTERNS, row_slots_for

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_SLOTS = 5


def _spans(slots: torch.Tensor, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Row slots grouped into spans of 1-4 rows that share the first row's slot."""
    span_slots, span_rows, row = [], [], 0
    while row < slots.numel():
        count = min(int(torch.randint(1, 5, (1,), generator=gen)), slots.numel() - row)
        span_slots.append(int(slots[row]))
        span_rows.append(count)
        row += count
    return span_slots, span_rows


def _expected_rows(span_slots, span_rows) -> list[int]:
    return [slot for slot, count in zip(span_slots, span_rows) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, 7, 133])
@pytest.mark.parametrize("out_features", [64, 2049])
def test_equals_the_reference_bit_for_bit(dtype, pattern, rows, out_features, one_thread):
    gen = torch.Generator().manual_seed(rows * 7 + out_features + PATTERNS.index(pattern))
    span_slots, span_rows = _spans(row_slots_for(pattern, rows, NUM_SLOTS, gen), gen)
    wide = 0.5 + torch.rand(NUM_SLOTS, out_features + 40, generator=gen)  # [S, out + 40] float32
    scale = wide[:, 17 : 17 + out_features]  # a column slice, as a projection's columns of a layer buffer
    y0 = torch.randn(rows, out_features, generator=gen).to(dtype)
    meta = build_row_scale_meta(span_slots, span_rows)
    if pattern == "all_none":
        assert meta is None
        return
    actual = row_scale_(y0.clone(), scale, meta)
    expected = row_scale_reference_(y0.clone(), scale, meta)
    assert torch.equal(actual, expected)
    for row, slot in enumerate(_expected_rows(span_slots, span_rows)):
        if slot == NO_ADAPTER:
            assert torch.equal(actual[row], y0[row])
        else:
            torch.testing.assert_close(actual[row].float(), y0[row].float() * scale[slot],
                                       atol=1e-6, rtol=2 ** -7 if dtype != torch.float32 else 1e-6)


def test_meta_names_rows_and_the_single_slot():
    meta = build_row_scale_meta([2, NO_ADAPTER, 3], [2, 1, 3])
    assert meta.rows.tolist() == [0, 1, 3, 4, 5] and meta.slots.tolist() == [2, 2, 3, 3, 3]
    assert meta.num_rows == 6 and not meta.all_rows and meta.single_slot == NO_ADAPTER
    every = build_row_scale_meta([1, 1], [3, 1])
    assert every.all_rows and every.single_slot == 1
    assert build_row_scale_meta([4, 2], [1, 1]).single_slot == NO_ADAPTER
    assert build_row_scale_meta([NO_ADAPTER], [4]) is None


def test_refuses_mismatched_shapes():
    meta = build_row_scale_meta([0], [2])
    with pytest.raises(ValueError, match="columns"):
        row_scale_(torch.zeros(2, 8), torch.ones(1, 9), meta)
    with pytest.raises(ValueError, match="rows"):
        row_scale_(torch.zeros(3, 8), torch.ones(1, 8), meta)
    with pytest.raises(ValueError, match="float32"):
        row_scale_(torch.zeros(2, 8), torch.ones(1, 8, dtype=torch.bfloat16), meta)
