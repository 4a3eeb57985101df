"""Adapters with their own input embeddings and lm_head (PEFT modules_to_save of
embed_tokens / lm_head, trainable_token_indices) in the folder reader, the slots' head
places, the device tier and the registry: tables read as PEFT saves them (and tied as PEFT
ties them), refused naming what is wrong, part of the content hash and the host bytes;
at most max_head_adapters slots hold tables, the least recently used unpinned one is
evicted for another and a request waits while all are pinned; mixes refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fixtures_adapters import rewrite_tensors
from fixtures_registry import MAX_RANK, acquire_now, write_adapter
from safetensors.torch import load_file, save_file

from loraquilt.kernels.lora import TokenRows
from loraquilt.server.adapters.peft_folder import AdapterError, load_peft_adapter
from loraquilt.server.adapters.registry import Acquired, AdapterRegistry
from loraquilt.server.adapters.slots import LoraSlots, LoraSpan, SlotConfig
from loraquilt.server.request import RequestError

EMBED_KEY = "base_model.model.model.embed_tokens.weight"
HEAD_KEY = "base_model.model.lm_head.weight"
ROWS_KEY = "base_model.model.{}.token_adapter.trainable_tokens_delta"
ROWS_KEYS = {"embed_tokens": ROWS_KEY.format("model.embed_tokens"), "lm_head": ROWS_KEY.format("lm_head")}


def heads_folder(folder, model, seed: int, *, whole=(), tokens=None, **config):
    """A PEFT folder with random q/v LoRA weights and the tables PEFT saves for
    modules_to_save=whole and trainable_token_indices=tokens (a list or {module: ids})."""
    write_adapter(folder, model, seed)
    generator = torch.Generator().manual_seed(seed + 500)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for module in whole:
        tensors[EMBED_KEY if module == "embed_tokens" else HEAD_KEY] = \
            torch.randn(model.vocab_size, model.hidden_size, generator=generator)
    by_module = tokens if isinstance(tokens, dict) else {"embed_tokens": tokens} if tokens else {}
    for module, ids in by_module.items():
        tensors[ROWS_KEYS[module]] = torch.randn(len(ids), model.hidden_size, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings.update(modules_to_save=list(whole) or None, trainable_token_indices=tokens, **config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def load(folder, model):
    return load_peft_adapter(folder, model, max_rank=MAX_RANK)


@pytest.fixture(scope="module")
def tied(model):
    return replace(model, tie_word_embeddings=True)


# -- the folder ------------------------------------------------------------------------------


def test_whole_tables_are_read_as_saved(tmp_path, model):
    folder = heads_folder(tmp_path / "a", model, 1, whole=("embed_tokens", "lm_head"))
    raw = load_file(str(folder / "adapter_model.safetensors"))
    adapter = load(folder, model)
    assert torch.equal(adapter.heads.embed, raw[EMBED_KEY]) and torch.equal(adapter.heads.lm_head, raw[HEAD_KEY])
    plain = load(write_adapter(tmp_path / "p", model, 1), model)
    assert plain.heads is None
    assert adapter.nbytes_in(torch.float32) == plain.nbytes_in(torch.float32) + 2 * 128 * 64 * 4


def test_trained_token_rows_are_kept_sorted_and_alone(tmp_path, model):
    folder = heads_folder(tmp_path / "a", model, 2, tokens=[9, 3, 7])
    raw = load_file(str(folder / "adapter_model.safetensors"))[ROWS_KEYS["embed_tokens"]]
    heads = load(folder, model).heads
    assert isinstance(heads.embed, TokenRows) and heads.lm_head is None  # an untied base: the embedding only
    assert heads.embed.indices.tolist() == [3, 7, 9]
    assert torch.equal(heads.embed.values, raw[[1, 2, 0]])
    assert heads.nbytes == 3 * 8 + 3 * 64 * 4


def test_trained_tokens_of_both_modules(tmp_path, model):
    folder = heads_folder(tmp_path / "a", model, 3, tokens={"embed_tokens": [1, 2], "lm_head": [5, 6, 7]})
    heads = load(folder, model).heads
    assert heads.embed.indices.tolist() == [1, 2] and heads.lm_head.indices.tolist() == [5, 6, 7]


def test_a_tied_base_ties_trained_rows_into_the_lm_head_as_peft(tmp_path, tied):
    heads = load(heads_folder(tmp_path / "rows", tied, 4, tokens=[3, 5]), tied).heads
    assert heads.lm_head is heads.embed  # one copy, for both
    own = load(heads_folder(tmp_path / "own", tied, 4, tokens={"embed_tokens": [3], "lm_head": [8]}), tied).heads
    assert own.lm_head.indices.tolist() == [8]
    whole = load(heads_folder(tmp_path / "whole", tied, 4, whole=("embed_tokens",)), tied).heads
    assert whole.lm_head is None  # a saved embed_tokens leaves the head the base's (PEFT's copy unties it)


def test_tied_copies_are_kept_once(tmp_path, tied):
    folder = heads_folder(tmp_path / "a", tied, 5, whole=("embed_tokens", "lm_head"), ensure_weight_tying=True)
    rewrite_tensors(folder, lambda t: t.update({HEAD_KEY: t[EMBED_KEY].clone()}))
    heads = load(folder, tied).heads
    assert heads.lm_head is heads.embed and heads.nbytes == 128 * 64 * 4


def _resize(tensors):
    tensors[EMBED_KEY] = torch.randn(130, 64)


def _narrow(tensors):
    tensors[HEAD_KEY] = torch.randn(128, 32)


def _nan(tensors):
    tensors[EMBED_KEY][3, 4] = float("nan")


def _ints(tensors):
    tensors[HEAD_KEY] = torch.ones(128, 64, dtype=torch.int32)


def _drop_head(tensors):
    del tensors[HEAD_KEY]


def _extra_head(tensors):
    tensors[ROWS_KEYS["lm_head"]] = torch.randn(2, 64)


BOTH = ("embed_tokens", "lm_head")


@pytest.mark.parametrize("settings, change, fragments", [
    (dict(whole=BOTH), _resize, ["has 130 rows", "vocabulary 128", "added tokens"]),
    (dict(whole=BOTH), _narrow, ["lm_head.weight has shape (128, 32)", "(128, 64)"]),
    (dict(whole=BOTH), _nan, ["embed_tokens.weight has NaN or infinite values"]),
    (dict(whole=BOTH), _ints, ["dtype torch.int32"]),
    (dict(whole=BOTH), _drop_head, ["modules_to_save names lm_head", "holds no copy"]),
    (dict(tokens=[1, 2]), _extra_head, ["unexpected tensor", "lm_head.token_adapter"]),
    (dict(tokens=[1, 2], modules_to_save=["score"]), None, ["modules_to_save names 'score'", "embed_tokens and lm_head"]),
    (dict(modules_to_save="lm_head"), None, ["modules_to_save must be a list"]),
    (dict(tokens=[1, 200]), None, ["ids [200] are outside", "vocabulary of 128"]),
    (dict(tokens=[1, 1]), None, ["names a token id twice"]),
    (dict(tokens=[1, -2]), None, ["token ids (integers >= 0)"]),
    (dict(tokens={"classifier": [1]}), None, ["trainable_token_indices names 'classifier'"]),
    (dict(whole=("embed_tokens",), tokens={"embed_tokens": [1]}), None,
     ["embed_tokens is both in modules_to_save and in trainable_token_indices"]),
])
def test_broken_tables_are_refused(tmp_path, model, settings, change, fragments):
    tokens = settings.pop("tokens", None)
    whole = settings.pop("whole", ())
    folder = heads_folder(tmp_path / "a", model, 6, whole=whole,
                          tokens=tokens if not isinstance(tokens, dict) or "classifier" not in tokens else None)
    if tokens is not None:  # the config as given, whatever the tensors
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": tokens}))
    if settings:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **settings}))
    if change is not None:
        rewrite_tensors(folder, change)
    with pytest.raises(AdapterError) as info:
        load(folder, model)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_a_table_without_its_config_is_an_unexpected_tensor(tmp_path, model):
    folder = write_adapter(tmp_path / "a", model, 1)
    rewrite_tensors(folder, lambda t: t.update({HEAD_KEY: torch.zeros(128, 64)}))
    with pytest.raises(AdapterError, match=f"unexpected tensor '{HEAD_KEY}'"):
        load(folder, model)


def test_tied_bases_refuse_what_peft_cannot_run(tmp_path, tied):
    folder = heads_folder(tmp_path / "a", tied, 7, whole=("lm_head",), tokens=[1, 2])
    with pytest.raises(AdapterError, match="tied embeddings, trainable_token_indices of embed_tokens with lm_head"):
        load(folder, tied)
    folder = heads_folder(tmp_path / "b", tied, 7, whole=("embed_tokens",), ensure_weight_tying=True)
    with pytest.raises(AdapterError, match="ensure_weight_tying"):
        load(folder, tied)


@pytest.mark.parametrize("settings, key", [
    (dict(whole=("embed_tokens",)), EMBED_KEY),
    (dict(tokens=[4, 9]), ROWS_KEYS["embed_tokens"]),
    (dict(tokens={"lm_head": [4]}), ROWS_KEYS["lm_head"]),
])
def test_tables_are_part_of_the_content_hash(tmp_path, model, settings, key):
    """The prefix cache keys KV by content: a row's KV depends on its embeddings."""
    first = heads_folder(tmp_path / "a", model, 8, **settings)
    second = heads_folder(tmp_path / "b", model, 8, **settings)
    assert load(first, model).content_hash == load(second, model).content_hash
    rewrite_tensors(second, lambda t: t.update({key: t[key] * 1.5}))
    assert load(first, model).content_hash != load(second, model).content_hash
    lora_only = write_adapter(tmp_path / "c", model, 8)  # the same LoRA weights
    assert load(lora_only, model).content_hash != load(first, model).content_hash


# -- the slots, the device tier and the registry ------------------------------------------


@pytest.fixture
def head_registry(model):
    slots = LoraSlots(model, SlotConfig(num_slots=3, max_rank=MAX_RANK, backend="torch", max_head_adapters=1),
                      torch.float32, torch.device("cpu"))
    return AdapterRegistry(model, slots, max_cpu_adapters=4)


def test_one_head_place_two_head_adapters_take_turns(tmp_path, model, head_registry):
    registry, slots = head_registry, head_registry.slots
    registry.register("h1", heads_folder(tmp_path / "h1", model, 1, whole=("embed_tokens", "lm_head")))
    registry.register("h2", heads_folder(tmp_path / "h2", model, 2, tokens=[1, 2, 3]))
    registry.register("plain", write_adapter(tmp_path / "plain", model, 3))
    assert registry.get("h1").heads and not registry.get("plain").heads
    first = acquire_now(registry, ["h1"])
    plain = acquire_now(registry, ["plain"])  # a plain adapter takes no head place
    assert slots.heads.holds(first.slots[0]) and not slots.heads.holds(plain.slots[0])
    assert slots.heads.free == 0 and slots.heads.num_bytes == 2 * 128 * 64 * 4
    assert registry.acquire(["h2"]).status == Acquired.NO_ROOM  # h1 is pinned: h2 waits
    registry.release(first)
    second = acquire_now(registry, ["h2"])  # h1's slot, unpinned, is evicted for it
    assert registry.get("h1").slot is None and registry.get("h1").tier == "host"
    assert slots.heads.holds(second.slots[0]) and slots.heads.num_bytes == 3 * 8 + 3 * 64 * 4
    assert registry.get("plain").slot == plain.slots[0]  # the plain slot stayed
    registry.release(second)
    registry.release(plain)
    again = acquire_now(registry, ["h1"])
    assert torch.equal(slots.heads.get(again.slots[0]).embed, registry.get("h1").host.heads.embed)
    registry.release(again)
    registry.unregister("h1")
    assert slots.heads.free == 1 and slots.heads.num_bytes == 0


def test_tables_are_counted_once_in_host_and_slot_bytes(tmp_path, model, head_registry):
    """On a CPU device a slot keeps the host copy's tables: counted in the slots only."""
    registry, slots = head_registry, head_registry.slots
    registry.register("h1", heads_folder(tmp_path / "h1", model, 1, whole=("lm_head",)))
    table = 128 * 64 * 4
    host_before, slots_before = registry.host_bytes(), slots.num_bytes
    lease = acquire_now(registry, ["h1"])
    assert slots.heads.get(lease.slots[0]).lm_head is registry.get("h1").host.heads.lm_head  # no second copy
    assert slots.num_bytes == slots_before + table and registry.host_bytes() == host_before - table
    registry.release(lease)


def test_a_mix_or_a_weight_with_a_head_adapter_is_refused(tmp_path, model, head_registry):
    registry = head_registry
    registry.register("h1", heads_folder(tmp_path / "h1", model, 1, tokens=[2]))
    registry.register("plain", write_adapter(tmp_path / "plain", model, 3))
    for pairs in ([("h1", 0.5), ("plain", 0.5)], [("h1", 0.5)]):
        with pytest.raises(RequestError, match="'h1' has its own input embeddings or lm_head"):
            registry.check_mix(pairs)
    with pytest.raises(RequestError, match="'h1' has its own .* which is served alone"):
        registry.acquire(["plain", "h1"])
    assert all(record.pins == 0 for record in registry.records())
    registry.check_mix([("h1", 1.0)])


def test_the_step_reads_tables_only_for_rows_on_them(tmp_path, model, head_registry):
    registry, slots = head_registry, head_registry.slots
    registry.register("h1", heads_folder(tmp_path / "h1", model, 1, tokens=[2]))
    registry.register("plain", write_adapter(tmp_path / "plain", model, 3))
    heads, plain = acquire_now(registry, ["h1"]), acquire_now(registry, ["plain"])
    slots.begin_step([LoraSpan(3, ((plain.slots[0], 1.0),)), LoraSpan(1, ())])
    assert not slots.has_heads
    slots.begin_step([LoraSpan(3, ((plain.slots[0], 1.0),)), LoraSpan(2, ((heads.slots[0], 1.0),))])
    assert slots.has_heads
    with pytest.raises(ValueError, match="in a mix"):
        slots.begin_step([LoraSpan(2, ((heads.slots[0], 0.5), (plain.slots[0], 0.5)))])


def test_an_activated_lora_with_tables_is_refused(tmp_path, model):
    folder = heads_folder(tmp_path / "a", model, 9, tokens=[2], alora_invocation_tokens=[5, 6])
    with pytest.raises(AdapterError, match="activated LoRA"):
        load(folder, model)
