"""Segment building and per-step metadata, checked on hand-written tables."""

import pytest
import torch

from loraquilt.kernels.lora import NO_ADAPTER, build_lora_meta, build_segments


@pytest.mark.parametrize(
    "pair_slots, perm, indptr, seg_slot",
    [
        ([], [], [0], []),
        ([-1, -1], [], [0], []),
        ([0], [0], [0, 1], [0]),
        ([2, 0, 2, 1], [1, 3, 0, 2], [0, 1, 2, 4], [0, 1, 2]),
        ([3, -1, 3, -1, 0], [4, 0, 2], [0, 1, 3], [0, 3]),
        ([1, 1, 1], [0, 1, 2], [0, 3], [1]),
        ([5, 4, 3, 2, 1, 0], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]),
    ],
)
def test_build_segments_tables(pair_slots, perm, indptr, seg_slot):
    segs = build_segments(torch.tensor(pair_slots, dtype=torch.int64))
    assert segs.perm.tolist() == perm
    assert segs.seg_indptr.tolist() == indptr
    assert segs.seg_slot.tolist() == seg_slot


def test_build_segments_is_stable_and_covers_every_valid_pair():
    gen = torch.Generator().manual_seed(3)
    pair_slots = torch.randint(-1, 9, (500,), generator=gen)
    segs = build_segments(pair_slots)
    valid = (pair_slots != NO_ADAPTER).nonzero().squeeze(1)
    assert sorted(segs.perm.tolist()) == valid.tolist()
    for s, slot in enumerate(segs.seg_slot.tolist()):
        members = segs.perm[segs.seg_indptr[s] : segs.seg_indptr[s + 1]]
        assert (pair_slots[members] == slot).all()
        assert members.tolist() == sorted(members.tolist())  # stable: original order kept
    assert segs.seg_slot.tolist() == sorted(set(pair_slots[valid].tolist()))


def test_meta_composition_table():
    meta = build_lora_meta(
        torch.tensor([[1, -1], [0, 2], [1, 1]]),
        torch.tensor([[1.0, 0.0], [0.5, 0.25], [1.0, 2.0]]),
        num_slots=4,
    )
    assert meta.pair_rows.tolist() == [1, 0, 2, 2, 1]
    assert meta.pair_weights.tolist() == [0.5, 1.0, 1.0, 2.0, 0.25]
    assert meta.segments == ((0, 0, 1), (1, 1, 4), (2, 4, 5))
    assert meta.slot_offsets.tolist() == [1, 4, 5, 5]
    assert meta.max_pairs_per_row == 2
    assert meta.max_segment_len == 3
    assert not meta.rows_in_order and not meta.unit_weights


def test_meta_rows_in_order_only_when_grouped_one_pair_per_row():
    assert build_lora_meta(torch.tensor([0, 0, 1, 3]), num_slots=4).rows_in_order
    assert build_lora_meta(torch.tensor([0, 0, 1, 3]), num_slots=4).unit_weights
    assert not build_lora_meta(torch.tensor([1, 0]), num_slots=4).rows_in_order
    assert not build_lora_meta(torch.tensor([0, -1, 1]), num_slots=4).rows_in_order
    assert not build_lora_meta(torch.tensor([[0, 1], [1, 2]]), num_slots=4).rows_in_order


def test_meta_no_rows_and_no_adapters():
    empty = build_lora_meta(torch.zeros(0, dtype=torch.int64), num_slots=2)
    assert empty.num_rows == 0 and empty.num_pairs == 0 and empty.segments == ()
    none = build_lora_meta(torch.full((5, 3), -1), num_slots=0)
    assert none.num_pairs == 0 and none.max_pairs_per_row == 0


@pytest.mark.parametrize(
    "slots, weights, match",
    [
        (torch.tensor([0, 4]), None, "must be -1 or in"),
        (torch.tensor([0, -2]), None, "must be -1 or in"),
        (torch.tensor([0.0, 1.0]), None, "integer"),
        (torch.tensor([[0, 1]]), torch.tensor([1.0]), "shape"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), "finite"),
        (torch.zeros(2, 2, 2, dtype=torch.int64), None, r"\[T\] or \[T, K\]"),
    ],
)
def test_meta_rejects_bad_tables(slots, weights, match):
    with pytest.raises(ValueError, match=match):
        build_lora_meta(slots, weights, num_slots=4)
