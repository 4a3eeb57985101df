"""DoRA's per-row output scale in the fused NF4 + LoRA kernel (`RowScale`): against the
pure-torch reference over shapes (q/k/v and gate/up parts side by side), row counts, both
dtypes and every instruction set the CPU runs, with a bias (added after the scale); rows
not scaled keep the bits of the call without scales; the reference against its formula."""

import pytest
import torch
from nf4_lora_cases import DTYPES, ISA_PARAMS, ROWS, SHAPES, assert_matches, make_case

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.fused_lora import FusedLora, RowScale, nf4_lora_linear, nf4_lora_linear_reference

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")

SCALED_SHAPES = [(64, 64), (130, 64), (960, 576), (3072, 576)]


def row_scale(out_features: int, rows: int, num_slots: int, seed: int) -> RowScale:
    """Scales in [0.5, 1.5) as a column slice of a wider buffer; every third row unscaled."""
    gen = torch.Generator().manual_seed(seed)
    wide = 0.5 + torch.rand(num_slots, out_features + 24, generator=gen)
    slots = torch.randint(0, num_slots, (rows,), generator=gen)
    slots[::3] = -1
    return RowScale.from_slots(wide[:, 8 : 8 + out_features], slots.tolist())


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("shape", SCALED_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_scales_rows_as_the_reference(dtype, shape, isa):
    case = make_case(shape, SHAPES[shape], dtype)
    for rows in ROWS:
        (x, weight, bias, parts, tables), _ = case.rows(rows)
        scale = row_scale(shape[0], rows, parts[0].a.shape[0], rows)
        expected = nf4_lora_linear_reference(x, weight, bias, parts, tables, scale)
        got = nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, isa=isa, row_scale=scale)
        assert_matches(got, expected, dtype, f"{shape} rows={rows} {isa} {dtype}")
        plain = nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, isa=isa)
        unscaled = scale.row_slot < 0
        assert torch.equal(got[unscaled], plain[unscaled]), (shape, rows)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaling_without_lora_and_every_row_on_one_slot(dtype, isa, one_thread):
    (x, weight, bias, parts, _), _ = make_case((960, 576), SHAPES[(960, 576)], dtype).rows(7)
    scale = RowScale.from_slots(0.5 + torch.rand(3, 960, generator=torch.Generator().manual_seed(1)), [2] * 7)
    got = nf4_lora_linear(x, weight, bias, None, isa=isa, row_scale=scale)
    assert_matches(got, nf4_lora_linear_reference(x, weight, bias, row_scale=scale), dtype, f"{isa} {dtype}")


def test_reference_scales_before_the_bias():
    (x, weight, bias, parts, tables), _ = make_case((130, 64), SHAPES[(130, 64)], torch.float32).rows(7)
    scale = row_scale(130, 7, parts[0].a.shape[0], 3)
    no_bias = nf4_lora_linear_reference(x, weight, None, parts, tables)
    factors = torch.stack([scale.scale[s] if s >= 0 else torch.ones(130) for s in scale.row_slot.tolist()])
    torch.testing.assert_close(nf4_lora_linear_reference(x, weight, bias, parts, tables, scale),
                               no_bias * factors + bias, atol=1e-6, rtol=1e-6)


def test_row_scale_arguments_are_checked():
    with pytest.raises(ValueError, match="float32"):
        RowScale.from_slots(torch.ones(2, 8, dtype=torch.bfloat16), [0])
    with pytest.raises(ValueError, match="names slot 2"):
        RowScale.from_slots(torch.ones(2, 8), [2])
    (x, weight, bias, parts, tables), _ = make_case((64, 64), SHAPES[(64, 64)], torch.float32).rows(7)
    with pytest.raises(ValueError, match="row scales for 3 rows"):
        nf4_lora_linear(x, weight, bias, FusedLora(parts), tables, row_scale=RowScale.from_slots(torch.ones(2, 64),
                                                                                               [0, 1, -1]))
