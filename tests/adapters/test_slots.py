"""Device slots and their per-step LoRA tables on CPU: a step whose rows would need
grouped_mm (a prefill chunk beside many single-row decodes on distinct adapters) is split
into a decode part and a prefill part, with the same deltas as one table over all rows."""

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.kernels.lora import build_lora_meta, lora_add_
from loraquilt.kernels.lora.cpu import needs_grouped
from loraquilt.server.adapters.peft_folder import load_peft_adapter
from loraquilt.server.adapters.slots import LoraSlots, LoraSpan, SlotConfig
from loraquilt.server.model.config import PROJECTIONS, load_model_config

NUM_SLOTS = 16


@pytest.fixture(scope="module")
def slots(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    base = build_tiny_model(root / "base", "llama", seed=3)
    config = load_model_config(base)
    slots = LoraSlots(config, SlotConfig(NUM_SLOTS, max_rank=16, backend="torch"), torch.float32,
                      torch.device("cpu"))
    for slot, folder in enumerate(make_adapter_zoo(base, root / "zoo", count=NUM_SLOTS, seed=9)):
        slots.load(slot, load_peft_adapter(folder, config, max_rank=16))
    return slots


def whole_step_deltas(slots: LoraSlots, spans, x: torch.Tensor, y0: torch.Tensor, layer: int, proj: str):
    """The reference: one table over every row, the reference loop."""
    rows = [[(s, w) for s, w in span.pairs if proj in slots.targets[s]] for span in spans for _ in range(span.rows)]
    width = max(map(len, rows))
    if width == 0:
        return y0.clone()
    padded = [row + [(-1, 0.0)] * (width - len(row)) for row in rows]
    meta = build_lora_meta(torch.tensor([[s for s, _ in r] for r in padded]),
                           torch.tensor([[w for _, w in r] for r in padded]), num_slots=NUM_SLOTS)
    return lora_add_(y0.clone(), x, slots.a[layer][proj], slots.b[layer][proj], meta, backend="reference")


@pytest.mark.parametrize("decodes, prefills", [(12, (20,)), (15, (7, 33)), (9, (1 + 40,)), (3, (20,))])
def test_decodes_beside_a_prefill_split_into_parts_with_the_same_deltas(slots, decodes, prefills):
    gen = torch.Generator().manual_seed(decodes)
    spans = [LoraSpan(1, ((slot, 1.0),)) for slot in range(decodes)]
    spans += [LoraSpan(rows, ((index % NUM_SLOTS, 0.5), ((index + 5) % NUM_SLOTS, 0.25)))
              for index, rows in enumerate(prefills)]
    total = sum(span.rows for span in spans)
    slots.begin_step(spans)
    try:
        for proj in PROJECTIONS:
            parts = slots.step_row_parts(proj)
            whole = slots._span_meta([s.pairs for s in spans], [s.rows for s in spans])
            if parts and needs_grouped(slots._span_meta(
                    tuple(tuple(p for p in s.pairs if proj in slots.targets[p[0]]) for s in spans),
                    [s.rows for s in spans])):
                assert [(start, end) for start, end, _ in parts] == [(0, decodes), (decodes, total)], proj
            assert whole is not None
            out_features, in_features = slots.model.projection_shape(proj)
            for layer in range(slots.model.num_layers):
                x = torch.randn(total, in_features, generator=gen)  # [T, in]
                y0 = torch.randn(total, out_features, generator=gen)  # [T, out]
                y = y0.clone()
                slots.add_(y, x, layer, proj)
                torch.testing.assert_close(y, whole_step_deltas(slots, spans, x, y0, layer, proj),
                                           rtol=1e-5, atol=1e-5)
    finally:
        slots.end_step()
    if decodes == 15:  # projections every zoo recipe targets: 15+ segments, too uneven for slot_range
        assert any(len(parts) == 2 for parts in (slots.step_row_parts(p) for p in PROJECTIONS))


def test_few_segments_keep_one_table(slots):
    spans = [LoraSpan(1, ((0, 1.0),)), LoraSpan(1, ()), LoraSpan(12, ((1, 1.0),))]
    slots.begin_step(spans)
    try:
        assert all(len(parts) <= 1 for parts in (slots.step_row_parts(p) for p in PROJECTIONS))
    finally:
        slots.end_step()
