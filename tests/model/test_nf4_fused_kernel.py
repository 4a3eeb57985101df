"""The fused NF4 + LoRA kernel path against the dequantize + GEMM path in a whole model:
the same logits within float32 rounding over prefill and decode steps with adapters
(one per row, composed mixes with negative weights, rows without one), and the same
greedy tokens through the engine."""

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.kernels.nf4 import fused_lora as nf4_lora
from loraquilt.kernels.nf4.dispatch import plan_nf4
from loraquilt.server.adapters.peft_folder import load_peft_adapter
from loraquilt.server.adapters.slots import LoraSlots, LoraSpan, SlotConfig
from loraquilt.server.model.batch import build_forward_batch, contiguous_tables
from loraquilt.server.model.kv_cache import KVCache, KVCacheConfig
from loraquilt.server.model.weights import DeviceConfig, load_causal_lm
from loraquilt.server.request import Request, SamplingParams

pytestmark = pytest.mark.skipif(not nf4_lora.available(), reason="the fused NF4 + LoRA kernel is not built here")

EXACT = DeviceConfig("cpu", "float32")
NUM_SLOTS = 4
BLOCK_SIZE = 4
RTOL = 1e-5  # max |difference| over max |logit|: float32 sums in another order


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4_fused") / request.param
    folder = build_tiny_model(root / "base", request.param, seed=7)
    return folder, make_adapter_zoo(folder, root / "zoo", count=NUM_SLOTS, seed=11)


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the model called the fused kernel."""
    calls = []
    kernel = nf4_lora.nf4_lora_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(nf4_lora, "nf4_lora_linear", counting)
    return calls


def run_steps(model, slots, prompts, spans_of, decode_steps=2):
    """A prefill step of every prompt, then `decode_steps` decode steps fed each
    sequence's greedy token: logits per step ([N, vocab] each) with LoRA, and the first
    step's logits without it. spans_of(rows per sequence) -> the step's LoraSpans."""
    config = model.config
    cache = KVCache(KVCacheConfig(num_blocks=32, block_size=BLOCK_SIZE), num_layers=config.num_layers,
                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=model.dtype,
                    device=model.device)
    tables = contiguous_tables([len(p) + decode_steps for p in prompts], BLOCK_SIZE)
    prefill = build_forward_batch(prefill_tokens=prompts, prefill_tables=tables, prefill_starts=[0] * len(prompts),
                                  decode_tokens=[], decode_tables=[], decode_positions=[], block_size=BLOCK_SIZE,
                                  device=model.device)
    without = model(prefill, cache)
    steps = []
    slots.begin_step(spans_of([len(p) for p in prompts]))
    try:
        steps.append(model(prefill, cache, slots))
    finally:
        slots.end_step()
    for step in range(decode_steps):
        tokens = steps[-1].argmax(dim=-1).tolist()
        batch = build_forward_batch(prefill_tokens=[], prefill_tables=[], prefill_starts=[], decode_tokens=tokens,
                                    decode_tables=tables, decode_positions=[len(p) + step for p in prompts],
                                    block_size=BLOCK_SIZE, device=model.device)
        slots.begin_step(spans_of([1] * len(prompts)))
        try:
            steps.append(model(batch, cache, slots))
        finally:
            slots.end_step()
    return steps, without


def test_fused_kernel_and_dequantize_paths_give_the_same_logits(base, fused_calls):
    folder, zoo = base
    fused = load_causal_lm(folder, EXACT, progress=False, fused_kernel=True)
    dequant = load_causal_lm(folder, EXACT, progress=False, fused_kernel=False)
    config = fused.config
    slots = LoraSlots(config, SlotConfig(NUM_SLOTS, max_rank=16, backend="torch"), torch.float32,
                      torch.device("cpu"))
    for slot, adapter in enumerate(zoo):
        slots.load(slot, load_peft_adapter(adapter, config, max_rank=16))
    prompts = [[1, 5, 9, 11, 3, 8, 2], [4, 4, 2], [7], [12, 30, 6, 6, 1], [3, 9]]
    pairs = [((0, 1.0),), ((1, 0.5), (2, -0.25)), (), ((2, 1.0),), ((3, 0.75), (0, 0.5), (3, 0.25))]

    def spans_of(rows):
        return [LoraSpan(n, p) for n, p in zip(rows, pairs)]

    for linear in fused.quantized_linears():
        assert linear.plan.path_for(sum(map(len, prompts))) == "fused"
    for linear in dequant.quantized_linears():
        assert linear.plan.fused_max_rows == 0 and linear.plan.path_for(1) != "fused"

    dequant_steps, dequant_base = run_steps(dequant, slots, prompts, spans_of)
    assert not fused_calls
    fused_steps, fused_base = run_steps(fused, slots, prompts, spans_of)
    # every projection of every layer, for the base-only prefill, the LoRA prefill and each decode step
    assert len(fused_calls) == len(list(fused.quantized_linears())) * (1 + len(fused_steps))
    assert sorted(set(fused_calls)) == [len(prompts), sum(map(len, prompts))]

    for step, (got, expected) in enumerate(zip([fused_base, *fused_steps], [dequant_base, *dequant_steps])):
        scale = float(expected.abs().max())
        error = float((got - expected).abs().max())
        assert error <= RTOL * scale, f"step {step}: max error {error:.3g}, max |logit| {scale:.3g}"
        assert torch.equal(got.argmax(dim=-1), expected.argmax(dim=-1)), step
    # the adapters do move the logits (the comparison above covers their deltas too)
    lora_effect = (dequant_steps[0] - dequant_base).abs().max(dim=-1).values  # [N]
    assert lora_effect[2] == 0 and bool((lora_effect[[0, 1, 3, 4]] > 100 * RTOL * lora_effect.max()).all())


def test_fused_kernel_and_dequantize_paths_give_the_same_greedy_tokens(base, fused_calls):
    folder, zoo = base
    fused = tiny_engine(folder, zoo, max_active_adapters=NUM_SLOTS, prefix_cache=False)
    dequant = tiny_engine(folder, zoo, max_active_adapters=NUM_SLOTS, prefix_cache=False)
    off = plan_nf4(dequant.model.dtype, fused_available=False)
    for linear in dequant.model.quantized_linears():
        linear.use_plan(off)
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    requests = [Request(prompt="one two three", adapter="a0", sampling=greedy),
                Request(prompt="four five", mix=(("a1", 0.5), ("a2", -0.25)), sampling=greedy),
                Request(prompt="six", sampling=greedy),
                Request(prompt="seven eight nine ten", adapter="a3", sampling=greedy),
                Request(prompt="def add(a, b):", mix=(("a3", 0.75), ("a0", 0.5)), sampling=greedy)]
    expected = [r.token_ids for r in dequant.generate(requests)]
    assert not fused_calls
    got = [r.token_ids for r in fused.generate(requests)]
    assert fused_calls
    assert got == expected
    assert all(len(tokens) == 8 for tokens in got)
