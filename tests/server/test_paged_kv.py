"""The paged KV cache on a real engine (tiny random Llama, float32): prefix blocks are
reused only under the same adapter content, preemption loses no request and changes no
answer, and every block is accounted for after random traffic with aborts."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.server.engine import Engine
from loraquilt.server.model.config import load_model_config
from loraquilt.server.model.kv_cache import MIB, kv_bytes_per_position
from loraquilt.server.request import Request, SamplingParams

BLOCK = 4
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    base = build_tiny_model(root / "base", "llama", seed=11)
    adapters = make_adapter_zoo(base, root / "adapters", count=4, seed=110)
    return base, adapters


def pool_mb(base, positions: int) -> float:
    """MiB of `positions` KV positions of the tiny model in float32."""
    config = load_model_config(base)
    per_position = kv_bytes_per_position(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                         head_dim=config.head_dim, dtype=torch.float32)
    return positions * per_position / MIB


def make_engine(base, adapters=(), **overrides) -> Engine:
    settings = dict(max_batch_size=8, max_active_adapters=4, max_seq_len=96, kv_block_size=BLOCK,
                    max_prefill_tokens=64)
    return tiny_engine(base, adapters, **{**settings, **overrides})


def prompt_ids(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(length)]


PREFIX = prompt_ids(37, seed=1)  # 9 full blocks of 4, then a partial one


def ask(engine: Engine, ids, **adapters) -> tuple[int, ...]:
    (result,) = engine.generate([Request(prompt_token_ids=tuple(ids), sampling=GREEDY, **adapters)])
    return result.token_ids


def test_a_prefix_cached_under_one_adapter_serves_no_other(model, tmp_path):
    base, adapters = model
    prompt = PREFIX + prompt_ids(3, seed=2)
    kinds = {"a": dict(adapter="a0"), "b": dict(adapter="a1"), "mix": dict(mix=(("a0", 0.5), ("a1", 0.5))),
             "mix_a": dict(mix=(("a0", 1.0),)), "half_a": dict(mix=(("a0", 0.5),)), "base": {}}
    fresh = {}
    for kind, adapter in kinds.items():  # each answer on a server that never saw the prompt
        fresh[kind] = ask(make_engine(base, adapters[:2]), prompt, **adapter)
    assert len({fresh[k] for k in ("a", "b", "mix", "half_a", "base")}) == 5, "adapters too weak to tell apart"

    engine = make_engine(base, adapters[:2])
    assert ask(engine, prompt, adapter="a0") == fresh["a"]
    queried, hits = engine.blocks.queries_tokens, engine.blocks.hit_tokens
    assert hits == 0 and queried == 36  # 9 cacheable blocks (the last prompt token never is)
    for kind in ("b", "mix", "half_a", "base"):
        assert ask(engine, prompt, **kinds[kind]) == fresh[kind], kind
    assert engine.blocks.hit_tokens == 0  # none of them met the blocks of a0
    # a weight-1 mix of a0 is a0 exactly: the same KV, legitimately shared
    assert ask(engine, prompt, **kinds["mix_a"]) == fresh["mix_a"] == fresh["a"]
    assert engine.blocks.hit_tokens == 36
    assert ask(engine, prompt, adapter="a0") == fresh["a"]
    assert engine.blocks.hit_tokens == 72
    engine.blocks.check()


def test_a_name_registered_again_with_other_files_never_meets_its_old_blocks(model):
    base, adapters = model
    prompt = PREFIX + prompt_ids(5, seed=3)
    fresh_c = ask(make_engine(base, [adapters[2]]), prompt, adapter="a0")
    engine = make_engine(base, adapters[:1])
    first = ask(engine, prompt, adapter="a0")
    assert first != fresh_c
    engine.unregister_adapter("a0")
    engine.register_adapter("a0", adapters[2])
    hits = engine.blocks.hit_tokens
    assert ask(engine, prompt, adapter="a0") == fresh_c
    assert engine.blocks.hit_tokens == hits  # the old a0's blocks are cached, but under its old content
    # the same files under another name are the same content: their blocks are shared
    engine.register_adapter("copy", adapters[2])
    assert ask(engine, prompt, adapter="copy") == fresh_c
    assert engine.blocks.hit_tokens == hits + (len(prompt) - 1) // BLOCK * BLOCK


def test_content_hash_follows_the_weights_not_the_name(model):
    base, adapters = model
    engine = make_engine(base, adapters[:2])
    engine.register_adapter("again", adapters[0])
    hashes = {record.name: record.content_hash for record in engine.adapters.records()}
    assert hashes["a0"] == hashes["again"] != hashes["a1"]
    assert all(len(value) == 32 for value in hashes.values())


def test_prefix_cache_off_computes_every_prompt(model):
    base, adapters = model
    engine = make_engine(base, adapters[:1], prefix_cache=False)
    prompt = PREFIX + prompt_ids(2, seed=4)
    first = ask(engine, prompt, adapter="a0")
    assert ask(engine, prompt, adapter="a0") == first
    assert engine.blocks.hit_tokens == 0 and engine.blocks.queries_tokens == 0


def test_preemption_under_a_pool_too_small_for_the_batch_loses_no_request(model):
    base, adapters = model
    requests = [Request(prompt_token_ids=tuple(prompt_ids(20 + 3 * i, seed=20 + i)),
                        adapter=None if i % 3 == 2 else f"a{i % 2}",
                        sampling=SamplingParams(max_new_tokens=24, ignore_eos=True)) for i in range(8)]
    roomy = make_engine(base, adapters[:2], max_batch_size=1)
    expected = [r.token_ids for r in roomy.generate(requests)]  # one at a time, never preempted
    # 8 sequences of up to 65 positions want ~130 blocks; the pool has 40 (160 positions)
    small = make_engine(base, adapters[:2], kv_cache_mb=pool_mb(base, 160), max_seq_len=96)
    assert small.blocks.num_blocks == 40
    results = small.generate(requests)
    assert small.stats().preemptions > 0
    assert [r.token_ids for r in results] == expected
    assert all(r.completion_tokens == 24 and r.finish_reason == "length" for r in results)
    small.blocks.check()
    assert small.blocks.usage() == 0.0 and small.adapters.get("a0").pins == 0


def test_a_pool_smaller_than_one_request_is_refused_at_start(model):
    base, _ = model
    with pytest.raises(ValueError, match="kv-cache-mb"):
        make_engine(base, kv_cache_mb=pool_mb(base, 40), max_seq_len=96)


def test_block_accounting_after_random_traffic_with_aborts(model):
    """1,000 random requests (shared prefixes, adapters, lengths) arrive, some are aborted
    while waiting, prefilling or decoding, through a pool small enough to preempt; every
    block ends free or cached, none referenced, and the completed answers match a roomy
    engine."""
    base, adapters = model
    rng = random.Random(7)
    engine = make_engine(base, adapters[:3], kv_cache_mb=pool_mb(base, 192), max_prefill_tokens=24)
    prefixes = [prompt_ids(16, seed=100 + k) for k in range(3)]
    submitted: dict[str, Request] = {}
    finished: dict[str, object] = {}
    aborted: set[str] = set()
    for index in range(1000):
        prompt = rng.choice(prefixes)[: rng.randrange(4, 17)] + prompt_ids(rng.randrange(1, 20), seed=index)
        adapter = rng.choice([None, "a0", "a1", "a2"])
        request = Request(prompt_token_ids=tuple(prompt), adapter=adapter,
                          sampling=SamplingParams(max_new_tokens=rng.randrange(1, 12), ignore_eos=True))
        engine.add_request(request)
        submitted[request.request_id] = request
        if rng.random() < 0.2:
            victim = rng.choice(list(submitted))
            engine.abort(victim)
            aborted.add(victim)
        for _ in range(rng.randrange(0, 3)):
            for output in engine.step():
                assert output.error is None, output.error
                if output.finished is not None:
                    finished[output.request_id] = output.finished
            engine.blocks.check()
    while engine.has_work():
        for output in engine.step():
            assert output.error is None, output.error
            if output.finished is not None:
                finished[output.request_id] = output.finished
    engine.blocks.check()
    assert engine.blocks.usage() == 0.0
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)
    assert set(finished) == set(submitted)
    completed = [rid for rid, result in finished.items() if result.finish_reason == "length"]
    assert len(completed) > 500
    roomy = make_engine(base, adapters[:3])
    sample = completed[::6]
    answers = roomy.generate([submitted[rid] for rid in sample])
    assert [a.token_ids for a in answers] == [finished[rid].token_ids for rid in sample]
