"""Activated LoRA (aLoRA) adapters through the engine against transformers + PEFT's aLoRA
on the same NF4 weights, and the prefix cache shared across adapters before the
invocation.

An aLoRA adapter applies from the last occurrence of its invocation tokens in the prompt
on; before it, the base model. Its answers equal PEFT's generate (float32: greedy tokens
identical, first-token log probabilities within 1e-3), with the invocation inside a
prefill chunk or across chunks; a prompt without the invocation answers as the base; the
blocks before the invocation are the base model's and are shared by the base and every
aLoRA adapter, never by a plain LoRA adapter; rows of a mixed batch equal their answers
alone; a mix including an aLoRA adapter is refused.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model, load_nf4_reference, tiny_engine
from peft import PeftModel

from loraquilt.server.request import Request, RequestError, SamplingParams

NEW_TOKENS = 8
INVOCATION = [11, 12, 13]
OTHER_INVOCATION = [21, 22]
BLOCK = 4


def history(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(30, 250) for _ in range(length)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("alora")
    base = build_tiny_model(root / "base", "llama", seed=9)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {
        "alora": build_peft_adapter(base, root / "alora", r=8, lora_alpha=16, seed=71, scale=0.3,
                                    target_modules=targets, alora_invocation_tokens=INVOCATION),
        "alora2": build_peft_adapter(base, root / "alora2", r=4, lora_alpha=8, seed=72, scale=0.3,
                                     target_modules=["q_proj", "v_proj", "down_proj"],
                                     alora_invocation_tokens=OTHER_INVOCATION),
        "plain": build_peft_adapter(base, root / "plain", r=8, lora_alpha=16, seed=71, scale=0.3,
                                    target_modules=targets),
    }
    # the same weights as "alora" under another invocation: where it applies must key its blocks
    twin = shutil.copytree(adapters["alora"], root / "twin")
    config = json.loads((twin / "adapter_config.json").read_text())
    config["alora_invocation_tokens"] = OTHER_INVOCATION
    (twin / "adapter_config.json").write_text(json.dumps(config))
    adapters["twin"] = twin
    return base, adapters


@pytest.fixture(scope="module")
def peft_model(folders):
    base, adapters = folders
    model = PeftModel.from_pretrained(load_nf4_reference(base), adapters["alora"], adapter_name="alora")
    model.load_adapter(adapters["alora2"], adapter_name="alora2")
    return model.eval()


def make_engine(folders, **settings):
    base, adapters = folders
    engine = tiny_engine(base, max_batch_size=8, max_active_adapters=4, kv_block_size=BLOCK,
                         max_seq_len=160, **settings)
    for name, folder in adapters.items():
        engine.register_adapter(name, folder)
    return engine


@pytest.fixture(scope="module")
def engine(folders):
    return make_engine(folders, max_prefill_tokens=16)  # prompts of 30-60 tokens: several chunks


def request(ids, adapter=None, new_tokens: int = NEW_TOKENS, **sampling) -> Request:
    return Request(prompt_token_ids=tuple(ids), adapter=adapter,
                   sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **sampling))


@torch.no_grad()
def peft_answer(model, ids: list[int], adapter: str | None) -> tuple[list[int], torch.Tensor]:
    """PEFT's generate (aLoRA offsets from the prompt) and its prefill's last log-softmax."""
    tensor = torch.tensor([ids])

    def run():
        out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        logits = model(input_ids=tensor).logits[0, -1].float()
        return out[0, len(ids):].tolist(), torch.log_softmax(logits, dim=-1)

    if adapter is None:
        with model.disable_adapter():
            return run()
    model.set_adapter(adapter)
    return run()


def first_logprobs(engine, ids, adapter) -> list[tuple[int, float]]:
    (result,) = engine.generate([request(ids, adapter, new_tokens=1, logprobs=20)])
    return list(result.logprobs[0].top)


@pytest.mark.parametrize("where", [0, 5, 14, 30])  # the invocation at the start, in a chunk, across chunks, late
@pytest.mark.parametrize("adapter", ["alora", "alora2"])
def test_alora_equals_peft(engine, peft_model, where, adapter):
    invocation = INVOCATION if adapter == "alora" else OTHER_INVOCATION
    ids = history(where, seed=where) + invocation + history(6, seed=100 + where)
    tokens, log_softmax = peft_answer(peft_model, ids, adapter)
    (result,) = engine.generate([request(ids, adapter)])
    assert list(result.token_ids) == tokens
    for token, value in first_logprobs(engine, ids, adapter):
        assert abs(value - log_softmax[token].item()) <= 1e-3


def test_the_last_invocation_counts_and_none_means_the_base(engine, peft_model):
    ids = INVOCATION + history(10, seed=1) + INVOCATION + history(4, seed=2)
    assert list(engine.generate([request(ids, "alora")])[0].token_ids) == peft_answer(peft_model, ids, "alora")[0]
    plain = history(20, seed=3)  # no invocation: the base model throughout, as in PEFT
    assert engine.generate([request(plain, "alora")])[0].token_ids == engine.generate([request(plain)])[0].token_ids
    assert list(engine.generate([request(plain, "alora")])[0].token_ids) == peft_answer(peft_model, plain, "alora")[0]


def test_blocks_before_the_invocation_are_shared_with_the_base_and_other_alora_adapters(folders):
    engine = make_engine(folders)
    shared = history(41, seed=7)  # 10 full blocks, then the invocation in the 11th
    alone = {}
    for adapter, invocation in (("alora", INVOCATION), ("alora2", OTHER_INVOCATION), ("plain", INVOCATION)):
        fresh = make_engine(folders)
        alone[adapter] = fresh.generate([request(shared + invocation, adapter)])[0].token_ids
    engine.generate([request(shared + [5], None)])  # the base model reads the history first
    hits = engine.blocks.hit_tokens
    results = {}
    for adapter, invocation in (("alora", INVOCATION), ("alora2", OTHER_INVOCATION), ("plain", INVOCATION)):
        before = engine.blocks.hit_tokens
        results[adapter] = engine.generate([request(shared + invocation, adapter)])[0]
        results[adapter + "_hit"] = engine.blocks.hit_tokens - before
    assert results["alora_hit"] == results["alora2_hit"] == 40  # the base's blocks, all full ones before it
    assert results["plain_hit"] == 0  # a plain adapter's KV differs from the first position on
    assert all(results[a].token_ids == alone[a] for a in alone)
    assert engine.blocks.hit_tokens > hits


def test_the_same_weights_under_another_invocation_never_share_its_blocks(folders):
    engine = make_engine(folders)
    ids = history(6, seed=4) + INVOCATION + history(3, seed=5) + OTHER_INVOCATION + history(20, seed=6)
    first = engine.generate([request(ids, "alora")])[0].token_ids  # applies from INVOCATION (position 6)
    twin = engine.generate([request(ids, "twin")])[0].token_ids  # the same weights, from position 15
    assert twin == make_engine(folders).generate([request(ids, "twin")])[0].token_ids
    assert first == make_engine(folders).generate([request(ids, "alora")])[0].token_ids


def test_rows_of_a_mixed_batch_equal_their_answers_alone(engine):
    requests = [request(history(9, seed=8) + INVOCATION + [40, 41], "alora"),
                request(history(25, seed=9), "plain"), request(history(12, seed=10)),
                request(history(3, seed=11) + OTHER_INVOCATION + history(30, seed=12), "alora2"),
                Request(prompt_token_ids=tuple(history(7, seed=13) + INVOCATION), adapter="alora",
                        sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, n=2))]
    batched = engine.generate(requests)
    for req, result in zip(requests, batched):
        assert [c.token_ids for c in result.all_choices] == \
            [c.token_ids for c in engine.generate([req])[0].all_choices]


def test_an_alora_adapter_is_served_alone(engine):
    with pytest.raises(RequestError, match="aLoRA adapter"):
        engine.generate([Request(prompt="x", mix=(("alora", 0.5), ("plain", 0.5)))])
    from loraquilt.server.adapters.merge import MergeSpec

    with pytest.raises(RequestError, match="aLoRA adapter"):
        engine.generate([Request(prompt="x", mix=(("alora", 0.5), ("plain", 0.5)), merge=MergeSpec("svd"))])
    assert engine.adapters.get("alora").alora == tuple(INVOCATION)
