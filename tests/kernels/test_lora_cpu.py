"""The CPU fast path (`torch` backend) against the reference loop over raw rows."""

import pytest
import torch

from loraquilt.kernels.lora import build_lora_meta, lora_add_
from loraquilt.kernels.lora.cpu import STRATEGIES, choose_strategy, lora_add_cpu_

from cases import PATTERNS, adapter_buffers, assert_close, composed_slots, row_slots_for

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _run_both(rows, in_features, out_features, rank, num_slots, slots, weights, dtype, gen,
              strategy=None):
    a, b = adapter_buffers(num_slots, rank, in_features, out_features, dtype, gen)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)  # [T, in]
    y0 = torch.randn(rows, out_features, generator=gen).to(dtype)  # [T, out]
    meta = build_lora_meta(slots, weights, num_slots=num_slots)
    expected = lora_add_(y0.clone(), x, a, b, meta, backend="reference")
    if strategy is None:
        actual = lora_add_(y0.clone(), x, a, b, meta, backend="torch")
    else:
        actual = lora_add_cpu_(y0.clone(), x, a, b, meta, strategy=strategy)
    return actual, expected, y0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 7, 16, 64])
@pytest.mark.parametrize("in_features, out_features", [(64, 96), (2049, 130)])
def test_dtype_rank_hidden(dtype, rank, in_features, out_features):
    gen = torch.Generator().manual_seed(rank * 31 + in_features)
    slots = row_slots_for("mixed_none", 7, 5, gen)
    actual, expected, _ = _run_both(7, in_features, out_features, rank, 5, slots, None, dtype, gen)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rows", [1, 7, 133])
def test_popularity_patterns(pattern, rows):
    gen = torch.Generator().manual_seed(rows)
    slots = row_slots_for(pattern, rows, 12, gen)
    actual, expected, y0 = _run_both(rows, 96, 80, 16, 12, slots, None, torch.float32, gen)
    assert_close(actual, expected, torch.float32)
    untouched = slots == -1
    assert torch.equal(actual[untouched], y0[untouched])  # slot -1 rows keep the base output


@pytest.mark.parametrize("pairs", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composition(pairs, dtype):
    gen = torch.Generator().manual_seed(pairs)
    slots, weights = composed_slots(33, pairs, 6, gen)
    actual, expected, _ = _run_both(33, 72, 40, 8, 6, slots, weights, dtype, gen)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pattern", PATTERNS + ("grouped_rows", "composed"))
def test_every_strategy(strategy, pattern):
    gen = torch.Generator().manual_seed(11)
    weights = None
    if pattern == "grouped_rows":  # already sorted by slot: the no-gather fast path
        slots = torch.sort(row_slots_for("uniform", 40, 9, gen)).values
    elif pattern == "composed":
        slots, weights = composed_slots(40, 3, 9, gen)
    else:
        slots = row_slots_for(pattern, 40, 9, gen)
    actual, expected, _ = _run_both(40, 52, 70, 8, 9, slots, weights, torch.float32, gen, strategy)
    assert_close(actual, expected, torch.float32)


# Slot-range layouts: (row slots, row weights or None); -1 = no adapter.
SLOT_RANGE_LAYOUTS = {
    "decode_every_slot": (list(range(12)), None),  # the grid is the rows themselves
    "decode_shuffled": ([5, 2, 9, 0, 11, 3, 7, 1, 10, 4, 8, 6], None),
    "decode_some_slots": ([2, 4, 5, 7, 8, 11], None),  # holes in the range: padded grid
    "uneven_segments": ([3, 3, 4, 5, 5, 5, 6, 7, 8, 8], None),
    "with_base_rows": ([0, -1, 1, 2, -1, 3, 4, 5, 6, 7], None),
    "weighted": (list(range(10)), [0.5, -1.0, 2.0, 1.0, 0.25, 3.0, -0.5, 1.5, 0.0, 1.0]),
    "composed": ([[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]], [[0.7, 0.3]] * 5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_features, out_features, rank", [(64, 96, 16), (576, 192, 8), (130, 2049, 7)])
@pytest.mark.parametrize("layout", SLOT_RANGE_LAYOUTS)
def test_slot_range_layouts(layout, in_features, out_features, rank, dtype):
    slots, weights = SLOT_RANGE_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(len(slots) + rank)
    slots = torch.tensor(slots)
    weights = None if weights is None else torch.tensor(weights)
    actual, expected, y0 = _run_both(slots.shape[0], in_features, out_features, rank, 12, slots, weights,
                                     dtype, gen, strategy="slot_range")
    assert_close(actual, expected, dtype)
    if slots.dim() == 1:
        assert torch.equal(actual[slots == -1], y0[slots == -1])


def test_strategy_choice_follows_the_segment_table():
    def chosen(slots):
        meta = build_lora_meta(torch.tensor(slots), num_slots=40)
        return choose_strategy(meta, torch.zeros(len(slots), 64), torch.zeros(40, 16, 64), torch.zeros(40, 64, 16))

    assert chosen([0, 0, 1, 1, 2]) == "loop"  # few segments
    assert chosen(list(range(32))) == "slot_range"  # decode over 32 distinct adapters
    assert chosen(list(range(0, 40, 2))) == "slot_range"  # half the range used: padding 2x
    assert chosen(list(range(0, 39, 3))) == "grouped"  # a third used: too much padding
    assert chosen([0] * 40 + list(range(1, 32))) == "grouped"  # a prefill beside decodes


def test_unaligned_shapes_fall_back_to_the_loop():
    gen = torch.Generator().manual_seed(12)
    slots = torch.cat([torch.zeros(12, dtype=torch.int64), torch.arange(1, 20)])  # uneven: no slot_range
    actual, expected, _ = _run_both(31, 50, 70, 5, 20, slots, None, torch.float32, gen)
    assert_close(actual, expected, torch.float32)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _run_both(31, 50, 70, 5, 20, slots, None, torch.float32, gen, strategy="grouped")


def test_row_weights_scale_the_delta_linearly():
    gen = torch.Generator().manual_seed(5)
    a, b = adapter_buffers(3, 4, 32, 32, torch.float32, gen, padded_ranks=False)
    x = torch.randn(4, 32, generator=gen)
    slots = torch.tensor([0, 1, 2, 1])
    delta = lora_add_(torch.zeros(4, 32), x, a, b, build_lora_meta(slots, num_slots=3))
    weights = torch.tensor([0.0, -1.0, 2.5, 0.3])
    scaled = lora_add_(torch.zeros(4, 32), x, a, b, build_lora_meta(slots, weights, num_slots=3))
    torch.testing.assert_close(scaled, delta * weights[:, None], atol=1e-5, rtol=1e-5)
    assert delta.abs().sum() > 0


def test_mix_equals_sum_of_single_adapters():
    gen = torch.Generator().manual_seed(6)
    a, b = adapter_buffers(4, 8, 48, 48, torch.float32, gen)
    x = torch.randn(3, 48, generator=gen)
    mix = build_lora_meta(torch.tensor([[0, 2]] * 3), torch.tensor([[0.7, 0.3]] * 3), num_slots=4)
    mixed = lora_add_(torch.zeros(3, 48), x, a, b, mix)
    first = lora_add_(torch.zeros(3, 48), x, a, b, build_lora_meta(torch.zeros(3, dtype=torch.int64), num_slots=4))
    second = lora_add_(torch.zeros(3, 48), x, a, b, build_lora_meta(torch.full((3,), 2), num_slots=4))
    torch.testing.assert_close(mixed, 0.7 * first + 0.3 * second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "x_shape, y_shape, a_shape, b_shape, match",
    [
        ((4, 16), (4, 8), (2, 4, 16), (2, 9, 4), "lora_b shape"),
        ((4, 15), (4, 8), (2, 4, 16), (2, 8, 4), "features"),
        ((3, 16), (4, 8), (2, 4, 16), (2, 8, 4), "row counts"),
        ((4, 16), (4, 8), (4, 16), (2, 8, 4), "num_slots"),
    ],
)
def test_shape_errors(x_shape, y_shape, a_shape, b_shape, match):
    meta = build_lora_meta(torch.zeros(4, dtype=torch.int64), num_slots=2)
    with pytest.raises(ValueError, match=match):
        lora_add_(torch.zeros(y_shape), torch.zeros(x_shape), torch.zeros(a_shape), torch.zeros(b_shape), meta)


def test_unknown_backend_and_strategy():
    meta = build_lora_meta(torch.zeros(1, dtype=torch.int64), num_slots=1)
    args = (torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 4, 2), meta)
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        lora_add_(*args, backend="cuda")
    with pytest.raises(ValueError, match="unknown CPU LoRA strategy"):
        lora_add_cpu_(*args, strategy="fast")
