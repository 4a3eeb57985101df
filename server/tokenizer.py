"""The model folder's tokenizer and the token ids that end a generation."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer


def load_tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


def stop_token_ids(folder: Path, tokenizer) -> frozenset[int]:
    """eos ids from generation_config.json (int or list) plus the tokenizer's eos token."""
    ids: set[int] = set()
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
