"""Fused q/k/v and gate/up projections and per-span LoRA tables: the same numbers as the
unfused model and the per-token tables, with less work per step."""

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.server.adapters.slots import LoraSpan
from loraquilt.server.model.config import PROJECTIONS
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.model.batch import build_forward_batch, contiguous_tables
from loraquilt.server.model.weights import DeviceConfig, load_causal_lm
from loraquilt.server.request import Request, SamplingParams

EXACT = DeviceConfig("cpu", "float32")


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases
def base(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fused") / request.param, request.param, seed=3)


def _logits(model, prompts):
    block_size = 4
    batch = build_forward_batch(
        prefill_tokens=prompts, prefill_tables=contiguous_tables([len(p) for p in prompts], block_size),
        prefill_starts=[0] * len(prompts), decode_tokens=[], decode_tables=[], decode_positions=[],
        block_size=block_size, device=model.device)
    from loraquilt.server.model.kv_cache import KVCache, KVCacheConfig

    config = model.config
    cache = KVCache(KVCacheConfig(num_blocks=16, block_size=block_size), num_layers=config.num_layers,
                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=model.dtype,
                    device=model.device)
    return model(batch, cache)


@pytest.mark.parametrize("fused_kernel", [False, True], ids=["dequant_gemm", "fused_kernel"])
def test_fused_model_is_bit_identical_to_unfused(base, fused_kernel):
    # each output column is summed the same way whatever columns share its weight, on both paths
    fused = load_causal_lm(base, EXACT, progress=False, fused_kernel=fused_kernel)
    plain = load_causal_lm(base, EXACT, progress=False, fuse_projections=False, fused_kernel=fused_kernel)
    assert len(list(fused.quantized_linears())) == 4 * fused.config.num_layers
    assert len(list(plain.quantized_linears())) == 7 * plain.config.num_layers
    assert fused.quantized_params() == plain.quantized_params()
    prompts = [[1, 5, 9, 11, 3], [4, 4, 2], [7]]
    assert torch.equal(_logits(fused, prompts), _logits(plain, prompts))


def test_span_tables_equal_per_token_tables_and_are_reused(base, tmp_path):
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=4,
                                 progress=False))
    for index, folder in enumerate(make_adapter_zoo(base, tmp_path / "zoo", count=3, seed=5)):
        engine.register_adapter(f"a{index}", folder)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [Request(prompt="one two three", adapter="a0", sampling=greedy),
                Request(prompt="four five", mix=(("a1", 0.5), ("a2", 0.25)), sampling=greedy),
                Request(prompt="six", sampling=greedy),
                Request(prompt="seven eight nine ten", adapter="a2", sampling=greedy)]
    batched = engine.generate(requests)
    singles = [engine.generate([r])[0] for r in requests]
    assert [b.token_ids for b in batched] == [s.token_ids for s in singles]

    slots = engine.slots
    lease = engine.adapters.acquire(["a0", "a1"]).lease  # both resident after the warm-up
    try:
        a0, a1 = lease.slots
        spans = [LoraSpan(1, ((a0, 1.0),)), LoraSpan(1, ()), LoraSpan(3, ((a1, 0.5), (a0, 0.25)))]
        slots.begin_step(spans)
        first = {p: slots.step_row_parts(p) for p in PROJECTIONS}
        assert any(first.values())
        for proj, parts in first.items():  # each projection: the pairs whose slot targets it, row by row
            assert len(parts) <= 1  # few segments: one table for every row
            meta = parts[0][2] if parts else None
            rows = [[(s, w) for s, w in span.pairs if proj in slots.targets[s]] for span in spans
                    for _ in range(span.rows)]
            width = max(map(len, rows))
            if width == 0:
                assert meta is None
                continue
            padded = [row + [(-1, 0.0)] * (width - len(row)) for row in rows]
            assert meta.row_slots.tolist() == [[s for s, _ in row] for row in padded], proj
            assert meta.row_weights.tolist() == [[w for _, w in row] for row in padded], proj
        slots.end_step()
        slots.begin_step(list(spans))  # the same spans next step: the same tables, not rebuilt
        assert all(slots.step_row_parts(p) is first[p] for p in first)
        slots.end_step()
        slots.load(slots.config.num_slots - 1, engine.adapters._read(engine.adapters.get("a2").path))
        slots.begin_step(list(spans))  # a slot changed: tables are rebuilt
        assert any(slots.step_row_parts(p) is not first[p] for p in first if first[p])
        slots.end_step()
    finally:
        engine.adapters.release(lease)
