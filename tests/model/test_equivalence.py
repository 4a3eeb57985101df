"""The engine against transformers + PEFT on the same NF4 weights.

One batch of 10 prompts of different lengths: 8 rows each on its own PEFT adapter (mixed
ranks, targets, rsLoRA, rank/alpha patterns), 1 row on the base model, 1 row on a 0.7/0.3
mix of two adapters. The reference runs every request alone through transformers +
bitsandbytes + PEFT (the mix through `add_weighted_adapter(..., combination_type="cat")`).
"""

from __future__ import annotations

import pytest
import torch
from fixtures_models import build_tiny_model, load_nf4_reference, make_adapter_zoo
from peft import PeftModel

from loraquilt.server.adapters.slots import LoraSpan
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.model.batch import build_forward_batch, contiguous_tables
from loraquilt.server.request import Request, SamplingParams
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

PROMPTS = (
    "The quick brown fox",
    "In the morning the market opens and people come from",
    "A",
    "Rivers carry water to the sea",
    "Tell me about the weather in the mountains during the long winter months when",
    "One two three",
    "The engine turns",
    "Where do the birds go",
    "Light",
    "Books on the shelf were old and",
)
MIX = ((0, 0.7), (2, 0.3))  # adapter indices and weights of the last row
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(root / "base", request.param, seed=1)
    adapters = make_adapter_zoo(base, root / "adapters", count=8, seed=10)
    engine = Engine(EngineConfig(
        device=EXACT, model=str(base), max_batch_size=16, max_active_adapters=8, max_lora_rank=16,
        lora_backend="torch", progress=False,
    ))
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"a{index}", folder)
    return engine, base, adapters


def _requests() -> list[Request]:
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(prompt=p, adapter=f"a{i}", sampling=greedy) for i, p in enumerate(PROMPTS[:8])]
    requests.append(Request(prompt=PROMPTS[8], sampling=greedy))
    requests.append(Request(prompt=PROMPTS[9], mix=tuple((f"a{i}", w) for i, w in MIX), sampling=greedy))
    return requests


@pytest.fixture(scope="module")
def reference(setup):
    """PEFT model with all 8 adapters and the weighted mix loaded, plus a runner for one request."""
    engine, base, adapters = setup
    model = PeftModel.from_pretrained(load_nf4_reference(base), adapters[0], adapter_name="a0")
    for index, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{index}")
    model.add_weighted_adapter(
        [f"a{i}" for i, _ in MIX], [w for _, w in MIX], adapter_name="mix", combination_type="cat"
    )
    model.eval()

    @torch.no_grad()
    def run(ids: list[int], adapter: str | None) -> tuple[list[int], torch.Tensor]:
        """Greedy NEW_TOKENS tokens (eos does not stop) and the prefill's last logits."""
        def forward(tokens, past):
            return model(input_ids=torch.tensor([tokens]), past_key_values=past, use_cache=True)

        if adapter is None:
            with model.disable_adapter():
                return _greedy(forward, ids)
        model.set_adapter(adapter)
        return _greedy(forward, ids)

    return run


def _greedy(forward, ids):
    out = forward(ids, None)
    prefill_logits = out.logits[0, -1].float()
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = forward([tokens[-1]], out.past_key_values)
    return tokens, prefill_logits


def _reference_adapter(index: int) -> str | None:
    return f"a{index}" if index < 8 else (None if index == 8 else "mix")


def test_greedy_tokens_equal_peft_one_request_at_a_time(setup, reference):
    engine, _, _ = setup
    requests = _requests()
    results = engine.generate(requests)  # all 10 in one batch
    for index, (request, result) in enumerate(zip(requests, results)):
        ids = engine.encode(request)
        expected, _ = reference(ids, _reference_adapter(index))
        assert list(result.token_ids) == expected, f"row {index} ({_reference_adapter(index)})"
        assert result.finish_reason == "length" and result.completion_tokens == NEW_TOKENS
        assert result.prompt_tokens == len(ids)


def test_adapters_change_the_output(setup, reference):
    """Guards the comparison above against adapters too weak to matter."""
    engine, _, _ = setup
    requests = _requests()
    changed = 0
    for index, request in enumerate(requests[:8]):
        ids = engine.encode(request)
        changed += reference(ids, f"a{index}")[0] != reference(ids, None)[0]
    assert changed >= 6


def test_prefill_logits_match_within_1e3(setup, reference):
    engine, _, _ = setup
    requests = _requests()
    prompts = [engine.encode(r) for r in requests]
    names = [[name for name, _ in r.adapter_weights] for r in requests]
    leases = [engine.adapters.acquire(n).lease if n else None for n in names]
    slots_per_request = [list(lease.slots) if lease else [] for lease in leases]
    try:
        block_size = engine.cache.block_size
        batch = build_forward_batch(
            prefill_tokens=prompts, prefill_tables=contiguous_tables([len(p) for p in prompts], block_size),
            prefill_starts=[0] * len(prompts), decode_tokens=[], decode_tables=[], decode_positions=[],
            block_size=block_size, device=engine.model.device,
        )
        spans = [LoraSpan(len(ids), tuple(zip(slots, (w for _, w in request.adapter_weights))))
                 for request, slots, ids in zip(requests, slots_per_request, prompts)]
        engine.slots.begin_step(spans)
        logits = engine.model(batch, engine.cache, engine.slots)  # [10, vocab]
        engine.slots.end_step()
    finally:
        for lease in leases:
            if lease:
                engine.adapters.release(lease)
    for index, ids in enumerate(prompts):
        _, expected = reference(ids, _reference_adapter(index))
        diff = (logits[index] - expected).abs().max().item()
        assert diff <= 1e-3, f"row {index}: max abs diff {diff}"


def test_mistral_sliding_window_and_sharded_checkpoint(tmp_path):
    """Prompts longer than the window: keys older than `sliding_window` must be masked,
    in prefill and in decode; weights come from a sharded checkpoint."""
    base = build_tiny_model(tmp_path / "mistral", "mistral", seed=5, max_shard_size="60KB",
                            config_overrides={"sliding_window": 6})
    assert (base / "model.safetensors.index.json").exists()
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=4, lora_backend="torch", progress=False))
    model = load_nf4_reference(base)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(prompt=p, sampling=greedy) for p in (PROMPTS[1], PROMPTS[4], PROMPTS[0])]
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        ids = engine.encode(request)

        def forward(tokens, past):
            return model(input_ids=torch.tensor([tokens]), past_key_values=past, use_cache=True)

        with torch.no_grad():
            expected, _ = _greedy(forward, ids)
        assert list(result.token_ids) == expected


INSTRUCTION = "You are a careful assistant. Answer in one short sentence, plainly and without lists:"


def _shared_prefix_requests() -> list[tuple[Request, str | None]]:
    """The 10 requests again, each prompt behind one of two instruction prefixes, and 6 more
    on a0 and on the base model behind the same prefixes, so that rows on one adapter share
    a prefix a cache can reuse; with the PEFT adapter each is compared to."""
    requests = []
    for index, request in enumerate(_requests()):
        prefix = INSTRUCTION if index % 2 == 0 else INSTRUCTION.upper()
        requests.append((Request(prompt=f"{prefix} {request.prompt}", adapter=request.adapter, mix=request.mix,
                                 sampling=request.sampling), _reference_adapter(index)))
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS[1:7]):
        adapter = "a0" if index % 2 == 0 else None
        requests.append((Request(prompt=f"{INSTRUCTION} {prompt}", adapter=adapter, sampling=greedy), adapter))
    return requests


@pytest.fixture(scope="module")
def shared_prefix_expected(setup, reference) -> list[list[int]]:
    engine, _, _ = setup
    return [reference(engine.encode(r), adapter)[0] for r, adapter in _shared_prefix_requests()]


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix_cache_on", "prefix_cache_off"])
def test_greedy_tokens_equal_peft_with_small_blocks_preemption_and_prefix_reuse(setup, shared_prefix_expected,
                                                                                prefix_cache):
    """A pool of 4-position blocks too small for the batch: sequences are preempted and
    recomputed, and (with the cache on) rows on one adapter reuse their shared prefix.
    Every row still answers exactly as PEFT does alone."""
    engine, base, adapters = setup
    pairs = _shared_prefix_requests()
    requests = [request for request, _ in pairs]
    lengths = [len(engine.encode(r)) + NEW_TOKENS for r in requests]
    per_position = engine.cache.num_bytes / engine.cache.config.num_positions
    small = Engine(EngineConfig(
        device=EXACT, model=str(base), max_batch_size=16, max_active_adapters=8, max_lora_rank=16,
        lora_backend="torch", progress=False, kv_block_size=4, max_prefill_tokens=32, prefix_cache=prefix_cache,
        max_seq_len=max(lengths) + 1, kv_cache_mb=2 * max(lengths) * per_position / 2**20,
    ))
    for index, folder in enumerate(adapters):
        small.register_adapter(f"a{index}", folder)
    expected = shared_prefix_expected
    results = small.generate(requests)
    for index, result in enumerate(results):
        assert list(result.token_ids) == expected[index], f"row {index}"
    stats = small.stats()
    assert stats.preemptions > 0
    assert (stats.prefix_hit_tokens > 0) == prefix_cache
    small.blocks.check()
