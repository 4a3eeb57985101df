"""The offline builders in tests/support (fixtures_tokenizer, fixtures_models,
fixtures_adapters): tokenizer, tiny models, PEFT adapters, and the transformers +
bitsandbytes NF4 reference built on them."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from fixtures_models import (
    ARCHITECTURES,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PROJECTIONS,
    SAMPLE_PROMPTS,
    adapter_ranks,
    build_peft_adapter,
    build_tiny_model,
    build_tokenizer,
    greedy_tokens,
    load_nf4_reference,
    make_adapter_zoo,
    read_adapter_config,
)
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and much faster than two
    when another process keeps the other core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(root / arch, arch, seed=3) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def zoo(models, tmp_path_factory) -> list[Path]:
    return make_adapter_zoo(models["llama"], tmp_path_factory.mktemp("zoo"), count=8, seed=0)


@pytest.fixture(scope="module")
def base_generations(models) -> dict[str, list[int]]:
    model, tokenizer = _load(models["llama"]), AutoTokenizer.from_pretrained(models["llama"])
    return {prompt: greedy_tokens(model, tokenizer, prompt) for prompt in SAMPLE_PROMPTS}


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trips_and_reloads_with_chat_template(tmp_path):
    built = build_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 380 <= len(tokenizer) <= 400 and len(tokenizer) == len(built)
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.chat_template == CHAT_TEMPLATE
    for token in (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
        assert tokenizer.encode(token) == [tokenizer.convert_tokens_to_ids(token)]

    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "  leading and trailing spaces  ",
        "Tabs\tand\nnew lines\r\n, punctuation: !?;'\"()[]{}<>@#$%^&*_-+=~`|\\/",
        "Zebras quizzically vex JOCKEYS 0123456789 don't won't",
        "",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert ids == built.encode(text)  # no bos/eos added, same ids after the reload

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")


def test_tokenizer_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


# --- tiny models -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_model_loads_and_generates_varied_text(models, arch):
    folder = models[arch]
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _load(folder)
    config = model.config
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert config.model_type == arch
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (eos, eos, eos)
    assert config.max_position_embeddings == 256 and config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert model.generation_config.eos_token_id == eos
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            assert module.in_features % 64 == 0, name
    if arch == "qwen2":
        attention = model.model.layers[0].self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            assert projection.bias is not None and projection.bias.abs().min() > 0
        assert attention.o_proj.bias is None

    generations = [greedy_tokens(model, tokenizer, prompt) for prompt in SAMPLE_PROMPTS]
    assert all(len(tokens) == 16 for tokens in generations)
    assert all(len(set(tokens)) >= 4 for tokens in generations)  # not one repeated token
    assert len({tuple(tokens) for tokens in generations}) == len(SAMPLE_PROMPTS)


def test_tiny_model_is_deterministic_per_seed(tmp_path, models):
    again = _tensors(build_tiny_model(tmp_path / "again", "qwen2", seed=3))
    original = _tensors(models["qwen2"])
    assert again.keys() == original.keys()
    assert all(torch.equal(again[name], original[name]) for name in original)
    other = _tensors(build_tiny_model(tmp_path / "other", "qwen2", seed=4))
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])


def test_sharded_checkpoint_has_an_index_and_same_weights(tmp_path, models):
    folder = build_tiny_model(tmp_path / "sharded", "llama", seed=3, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert all((folder / shard).is_file() for shard in shards)
    sharded, single = _tensors(folder), _tensors(models["llama"])
    assert sharded.keys() == single.keys() == set(index["weight_map"])
    assert all(torch.equal(sharded[name], single[name]) for name in single)
    ids = torch.tensor([[5, 17, 99, 250]])
    with torch.no_grad():
        assert torch.equal(_load(folder)(ids).logits, _load(models["llama"])(ids).logits)


def test_tied_embeddings_and_bf16_weights(tmp_path):
    folder = build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True, dtype=torch.bfloat16)
    tensors = _tensors(folder)
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = _load(folder)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generations = [greedy_tokens(model, tokenizer, prompt) for prompt in SAMPLE_PROMPTS]
    assert sum(len(set(tokens)) >= 4 for tokens in generations) >= len(SAMPLE_PROMPTS) - 1


def test_in_features_must_fit_nf4_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple of 64"):
        build_tiny_model(tmp_path / "bad", "llama", hidden_size=48, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tmp_path / "bad", "gpt2")


# --- PEFT adapters -----------------------------------------------------------------------


def test_zoo_is_varied_and_saved_by_peft(zoo):
    configs = [read_adapter_config(folder) for folder in zoo]
    for folder, config in zip(zoo, configs):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                assert ".lora_A.weight" in key or ".lora_B.weight" in key, key
                assert handle.get_tensor(key).abs().min() > 0, key  # A and B are non-zero
    ranks = {rank for folder in zoo for rank in adapter_ranks(folder).values()}
    assert {1, 7, 16} <= ranks
    assert any(set(config["target_modules"]) == set(PROJECTIONS) for config in configs)
    assert sum(config["use_rslora"] for config in configs) == 1
    assert sum(bool(config["rank_pattern"]) for config in configs) == 1
    assert len({config["lora_alpha"] for config in configs}) >= 5
    assert len({frozenset(config["target_modules"]) for config in configs}) == len(configs)


def test_adapters_load_with_peft_and_change_greedy_outputs(models, zoo, base_generations):
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    for folder in zoo:
        model = PeftModel.from_pretrained(_load(models["llama"]), folder).eval()
        changed = sum(greedy_tokens(model, tokenizer, p) != base_generations[p] for p in SAMPLE_PROMPTS)
        assert changed > len(SAMPLE_PROMPTS) // 2, f"{folder.name}: only {changed} prompts changed"


def test_rank_and_alpha_patterns_take_effect(models, zoo):
    folder = next(f for f in zoo if read_adapter_config(f)["rank_pattern"])
    assert adapter_ranks(folder) == {
        "model.layers.0.self_attn.q_proj": 4,  # pattern "q_proj"
        "model.layers.1.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 8,  # r
        "model.layers.1.self_attn.v_proj": 8,
        "model.layers.0.mlp.down_proj": 8,  # r: the pattern names layer 1 only
        "model.layers.1.mlp.down_proj": 12,  # pattern "model.layers.1.mlp.down_proj"
    }
    model = PeftModel.from_pretrained(_load(models["llama"]), folder)
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.scaling["default"] == 2 / 4  # alpha_pattern q_proj: 2
    assert layers[0].self_attn.v_proj.scaling["default"] == 16 / 8
    assert layers[0].mlp.down_proj.scaling["default"] == 16 / 8
    assert layers[1].mlp.down_proj.scaling["default"] == 24 / 12


def test_pattern_keys_first_match_in_saved_order_wins(models, tmp_path):
    """PEFT takes the first pattern key that matches a module's name as a dotted suffix;
    adapter_config.json is written with sorted keys, so overlapping keys in any other order
    give tensors that the saved config can no longer load."""
    folder = build_peft_adapter(models["llama"], tmp_path / "overlap", target_modules=["down_proj"],
                                rank_pattern={"layers.1.mlp.down_proj": 12, "down_proj": 4})
    assert adapter_ranks(folder)["model.layers.1.mlp.down_proj"] == 12
    assert list(read_adapter_config(folder)["rank_pattern"]) == ["down_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(_load(models["llama"]), folder)


def test_extra_lora_config_is_passed_to_peft(models, tmp_path):
    dora = build_peft_adapter(models["llama"], tmp_path / "dora", use_dora=True)
    assert read_adapter_config(dora)["use_dora"]
    with safe_open(str(dora / "adapter_model.safetensors"), framework="pt") as handle:
        assert any(key.endswith("lora_magnitude_vector") for key in handle.keys())
    saved = build_peft_adapter(models["qwen2"], tmp_path / "saved", bias="lora_only", modules_to_save=["lm_head"])
    config = read_adapter_config(saved)
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["lm_head"]
    with safe_open(str(saved / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys  # qwen2 q/v biases


# --- NF4 reference -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_reference_with_peft_adapters_and_cat_mix(models, tmp_path, arch):
    base = models[arch]
    reference = load_nf4_reference(base)
    q_proj = reference.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and not reference.training
    state = q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested
    assert not isinstance(reference.lm_head, bnb.nn.Linear4bit)

    # exact_fp32: the projection is a float32 matmul by the dequantized weight
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight = bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
        expected = x @ weight.t() + (q_proj.bias if q_proj.bias is not None else 0)
        assert torch.equal(q_proj(x), expected)

    a = build_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    b = build_peft_adapter(base, tmp_path / "b", r=7, lora_alpha=14, seed=2,
                           target_modules=["v_proj", "o_proj", "down_proj"])
    model = PeftModel.from_pretrained(reference, a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], adapter_name="mix", combination_type="cat")
    model.eval()
    mix = model.peft_config["mix"]
    assert mix.r == mix.lora_alpha == 11 and set(mix.target_modules) == {"q_proj", "v_proj", "o_proj", "down_proj"}

    layer = model.base_model.model.model.layers[1]
    for module, parts in ((layer.self_attn.v_proj, ("a", "b")), (layer.self_attn.q_proj, ("a",)),
                          (layer.mlp.down_proj, ("b",))):
        def delta(name: str) -> torch.Tensor:
            return module.scaling[name] * (x_in @ module.lora_A[name].weight.t() @ module.lora_B[name].weight.t())

        x_in = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = sum({"a": 0.7, "b": 0.3}[name] * delta(name) for name in parts)
            torch.testing.assert_close(delta("mix"), expected, rtol=1e-5, atol=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(base)
    outputs = {}
    for name in ("a", "b", "mix"):
        model.set_adapter(name)
        outputs[name] = greedy_tokens(model, tokenizer, SAMPLE_PROMPTS[0])
    with model.disable_adapter():
        outputs["base"] = greedy_tokens(model, tokenizer, SAMPLE_PROMPTS[0])
    assert all(len(tokens) == 16 for tokens in outputs.values())
    assert len({tuple(tokens) for tokens in outputs.values()}) > 1


def test_cat_mix_takes_rslora_from_the_first_adapter(models, tmp_path):
    """add_weighted_adapter copies the first adapter's config: with an rsLoRA adapter first,
    the "cat" mix is scaled by sqrt(r_mix) instead of 1 and is not the weighted sum."""
    base = models["llama"]
    rs = build_peft_adapter(base, tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True, seed=1)
    plain = build_peft_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, seed=2)
    model = PeftModel.from_pretrained(_load(base), rs, adapter_name="rs")
    model.load_adapter(plain, adapter_name="plain")
    model.add_weighted_adapter(["rs", "plain"], [1.0, 1.0], adapter_name="rs_first", combination_type="cat")
    model.add_weighted_adapter(["plain", "rs"], [1.0, 1.0], adapter_name="plain_first", combination_type="cat")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["plain_first"] == 1.0
    assert q_proj.scaling["rs_first"] == pytest.approx(8**0.5)
