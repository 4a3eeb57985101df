"""Adapters with their own input embeddings and lm_head through the engine against
transformers + PEFT on the same NF4 weights (float32).

PEFT adapters on a tiny untied Llama: modules_to_save of embed_tokens and lm_head, of the
lm_head only, and trainable_token_indices of both (their tables redrawn so that they
differ from the base's); and on a tied one, trainable tokens of the embedding (which PEFT
ties into the lm_head) and a saved embed_tokens (which leaves the lm_head the base's).
Each row equals PEFT's model of its adapter alone (prefill logits within 1e-3, greedy
tokens identical, prompt and generated log probabilities within 1e-4), in one batch with a
plain LoRA row and a base row; every row of that batch equals its answer alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model, load_nf4_reference, prefill_logits, tiny_engine
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loraquilt.server.request import Request, SamplingParams

NEW_TOKENS = 10
TOP = 3
PROMPTS = {
    "both": "The quick brown fox jumps over",
    "head": "Rivers carry water to the sea and",
    "tokens": "In the morning the market opens",
    "plain": "Books on the shelf were old",
    None: "Once upon a time there was",
    "tied_tokens": "The quick brown fox jumps over",
    "tied_embed": "Rivers carry water to the sea and",
}
UNTIED = ("both", "head", "tokens", "plain", None)  # the rows of the mixed batch
TIED = ("tied_tokens", "tied_embed", None)


def redraw_tables(folder, seed: int) -> None:
    """PEFT saves the tables as the base's: move whole ones, redraw trained token rows."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(tensors):
        if key.endswith("trainable_tokens_delta"):
            tensors[key] = torch.randn(tensors[key].shape, generator=generator) * 0.6
        elif key.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=generator) * 0.3
    save_file(tensors, str(path), metadata={"format": "pt"})


def as_lora_only(folder, out_folder):
    """The same A and B without the tables (modules_to_save, trainable_token_indices)."""
    out_folder.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(modules_to_save=None, trainable_token_indices=None)
    (out_folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if ".lora_" in k}
    save_file(tensors, str(out_folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_folder


def token_ids(base, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return sorted(set(AutoTokenizer.from_pretrained(base)(text)["input_ids"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    untied = build_tiny_model(root / "base", "llama", seed=23)
    tied = build_tiny_model(root / "tied", "llama", seed=24, tie_word_embeddings=True)
    prompt_tokens = token_ids(untied, PROMPTS["tokens"])
    adapters = {
        "both": build_peft_adapter(untied, root / "both", r=8, seed=51, scale=0.2,
                                   modules_to_save=["embed_tokens", "lm_head"]),
        "head": build_peft_adapter(untied, root / "head", r=4, seed=52, scale=0.2,
                                   target_modules=["o_proj", "down_proj"], modules_to_save=["lm_head"]),
        "tokens": build_peft_adapter(untied, root / "tokens", r=4, seed=53, scale=0.2,
                                     target_modules=["q_proj", "k_proj"],
                                     trainable_token_indices={"embed_tokens": prompt_tokens[:4],
                                                              "lm_head": list(range(20, 60))}),
        "plain": build_peft_adapter(untied, root / "plain", r=8, seed=54, scale=0.2),
        "tied_tokens": build_peft_adapter(tied, root / "tied_tokens", r=4, seed=55, scale=0.2,
                                          trainable_token_indices=token_ids(tied, PROMPTS["tied_tokens"])[:3]
                                          + list(range(30, 60))),
        "tied_embed": build_peft_adapter(tied, root / "tied_embed", r=4, seed=56, scale=0.2,
                                         modules_to_save=["embed_tokens"]),
    }
    for seed, name in enumerate(("both", "head", "tokens", "tied_tokens", "tied_embed")):
        redraw_tables(adapters[name], 60 + seed)
    lora_only = {f"{name}-lora-only": as_lora_only(adapters[name], root / f"{name}-lora-only")
                 for name in ("both", "head", "tokens")}
    return {"untied": untied, "tied": tied}, {**adapters, **lora_only}


@pytest.fixture(scope="module")
def peft_models(folders):
    """One PeftModel per adapter (PEFT wraps embed_tokens for one kind of table only)."""
    bases, adapters = folders
    models = {None: load_nf4_reference(bases["untied"]).eval()}
    models["tied_base"] = load_nf4_reference(bases["tied"]).eval()
    for name, folder in adapters.items():
        if name.endswith("lora-only"):
            continue
        base = bases["tied" if name.startswith("tied") else "untied"]
        models[name] = PeftModel.from_pretrained(load_nf4_reference(base), folder).eval()
    return models


@pytest.fixture(scope="module", params=["torch", "reference"])
def engines(request, folders):
    bases, adapters = folders
    untied = tiny_engine(bases["untied"], max_batch_size=8, max_active_adapters=4, lora_backend=request.param)
    tied = tiny_engine(bases["tied"], max_batch_size=8, max_active_adapters=4, lora_backend=request.param)
    for name, folder in adapters.items():
        if not name.endswith("lora-only"):
            (tied if name.startswith("tied") else untied).register_adapter(name, folder)
    return {"untied": untied, "tied": tied}


def request_on(adapter: str | None, **sampling) -> Request:
    return Request(prompt=PROMPTS[adapter], adapter=adapter,
                   sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, **sampling))


@torch.no_grad()
def peft_answer(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy NEW_TOKENS tokens and the log-softmax at every position of prompt + tokens."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens, rows = [], [out.logits[0].float()]
    for _ in range(NEW_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        rows.append(out.logits[0].float())
    return tokens, torch.cat(rows)


def engine_prefill_logits(engine, adapters) -> torch.Tensor:
    """One prefill step of the requests on `adapters` in one batch -> last logits [N, vocab]."""
    return prefill_logits(engine, [engine.encode(request_on(adapter)) for adapter in adapters], adapters)


@pytest.mark.parametrize("kind, rows", [("untied", UNTIED), ("tied", TIED)])
def test_rows_equal_peft_alone_in_one_batch(engines, peft_models, kind, rows):
    """Prefill logits within 1e-3, greedy tokens identical, prompt and generated log
    probabilities within 1e-4, each row beside rows on other adapters and the base."""
    engine = engines[kind]
    logits = engine_prefill_logits(engine, rows)
    results = engine.generate([request_on(adapter, prompt_logprobs=TOP, logprobs=TOP) for adapter in rows])
    for row, (adapter, result) in enumerate(zip(rows, results)):
        model = peft_models["tied_base" if adapter is None and kind == "tied" else adapter]
        ids = engine.encode(request_on(adapter))
        tokens, expected = peft_answer(model, ids)
        diff = (logits[row] - expected[len(ids) - 1]).abs().max().item()
        assert diff <= 1e-3, f"{adapter}: max abs logit diff {diff}"
        assert list(result.token_ids) == tokens, adapter
        logprobs = torch.log_softmax(expected, dim=-1)  # [P + NEW_TOKENS, vocab]
        scored = [(p, entry) for p, entry in enumerate(result.prompt_logprobs[1:])]
        scored += [(len(ids) - 1 + step, entry) for step, entry in enumerate(result.logprobs)]
        worst = max(abs(entry.logprob - float(logprobs[p, entry.token_id])) for p, entry in scored)
        assert worst < 1e-4, f"{adapter}: log probability off by {worst}"


@pytest.mark.parametrize("kind, rows", [("untied", UNTIED), ("tied", TIED)])
def test_every_row_of_a_mixed_batch_equals_its_answer_alone(engines, kind, rows):
    engine = engines[kind]
    batched_logits = engine_prefill_logits(engine, rows)
    batched = engine.generate([request_on(adapter) for adapter in rows])
    for row, adapter in enumerate(rows):
        alone_logits = engine_prefill_logits(engine, (adapter,))[0]
        torch.testing.assert_close(batched_logits[row], alone_logits, atol=1e-5, rtol=1e-5)
        assert batched[row].token_ids == engine.generate([request_on(adapter)])[0].token_ids, adapter


def test_the_tables_change_the_output(engines, folders):
    """The same LoRA weights without the tables give other logits: the tables are applied."""
    engine = engines["untied"]
    _, adapters = folders
    for adapter in ("both", "head", "tokens"):
        name = f"{adapter}-lora-only"
        if name not in {record.name for record in engine.adapters.records()}:
            engine.register_adapter(name, adapters[name])
        PROMPTS[name] = PROMPTS[adapter]
        with_tables, without = engine_prefill_logits(engine, (adapter, name))
        assert (with_tables - without).abs().max().item() > 0.05, adapter


# -- the engine: head places, memory, the prefix cache ---------------------------------------


def test_one_head_place_serves_two_head_adapters_in_turn(folders, engines):
    """--max-lora-head-adapters 1: requests on two adapters with tables wait for the place
    in turn (none fails) and each answers as it does alone with room to spare."""
    bases, adapters = folders
    engine = tiny_engine(bases["untied"], max_batch_size=8, max_active_adapters=4, max_lora_head_adapters=1)
    for name in ("both", "tokens", "plain"):
        engine.register_adapter(name, adapters[name])
    loaded = []
    load = engine.slots.heads.load
    engine.slots.heads.load = lambda slot, heads: (loaded.append(heads is not None), load(slot, heads))[1]
    order = ("both", "tokens", "plain", "both", "tokens", None)
    results = engine.generate([request_on(adapter) for adapter in order])
    roomy = engines["untied"]
    for adapter, result in zip(order, results):
        assert result.token_ids == roomy.generate([request_on(adapter)])[0].token_ids, adapter
    assert loaded.count(True) >= 2 and engine.slots.heads.free == 0


def test_memory_of_the_tables_is_in_the_metrics(folders):
    from prometheus_client import generate_latest

    from loraquilt.server.metrics import Metrics

    bases, adapters = folders
    engine = tiny_engine(bases["untied"], max_active_adapters=2, max_lora_head_adapters=2)
    engine.register_adapter("both", adapters["both"])
    metrics = Metrics()
    metrics.watch(engine)

    def value(kind: str) -> float:
        text = generate_latest(metrics.registry).decode()
        line = next(line for line in text.splitlines() if line.startswith(kind))
        return float(line.rsplit(" ", 1)[1])

    table = engine.model.config.vocab_size * engine.model.config.hidden_size * 4
    host = value('loraquilt_memory_bytes{kind="adapters_host"}')
    assert value('loraquilt_memory_bytes{kind="adapter_heads"}') == 0
    engine.generate([request_on("both")])  # now in a slot: its two tables counted there, once
    assert value('loraquilt_memory_bytes{kind="adapter_heads"}') == 2 * table
    assert value('loraquilt_memory_bytes{kind="adapters_host"}') == host - 2 * table
    assert value('loraquilt_adapter_head_places{state="used"}') == 1
    assert value('loraquilt_adapter_head_places{state="free"}') == 1


def test_the_prefix_cache_keeps_apart_adapters_that_differ_only_in_their_tables(folders):
    """Same LoRA weights, one with its own embeddings: the KV of a prompt is not shared."""
    bases, adapters = folders
    engine = tiny_engine(bases["untied"], max_active_adapters=4, kv_block_size=4)
    uncached = tiny_engine(bases["untied"], max_active_adapters=4, kv_block_size=4, prefix_cache=False)
    for target in (engine, uncached):
        target.register_adapter("both", adapters["both"])
        target.register_adapter("lora", adapters["both-lora-only"])
    prompt = "The quick brown fox jumps over the lazy dog and runs far away into the woods"
    on = {name: Request(prompt=prompt, adapter=name, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
          for name in ("both", "lora")}
    assert engine.adapters.get("both").content_hash != engine.adapters.get("lora").content_hash
    [warm] = engine.generate([on["lora"]])
    [first] = engine.generate([on["both"]])
    assert first.cached_tokens == 0
    [again] = engine.generate([on["both"]])
    assert again.cached_tokens > 0
    [expected] = uncached.generate([on["both"]])
    assert first.token_ids == again.token_ids == expected.token_ids != warm.token_ids
