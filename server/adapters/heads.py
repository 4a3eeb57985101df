"""An adapter's own token tables: PEFT `modules_to_save` of embed_tokens / lm_head (whole
tables) and `trainable_token_indices` (some rows replaced), read and checked here.

What PEFT 0.21.2 saves and computes (PeftModel on tied and untied Llamas):
- `modules_to_save` names a module whose trained copy is saved whole, as
  `base_model.model.model.embed_tokens.weight` / `base_model.model.lm_head.weight`, and
  used in its place. Each copy stands alone, also on a base with tied embeddings: a saved
  embed_tokens leaves the lm_head the base's, and the other way round. With
  `ensure_weight_tying` on a tied base both are saved (tied: the same values).
- `trainable_token_indices`: a list of token ids (the input embedding's) or
  {module name: ids}; saved as `...<module>.token_adapter.trainable_tokens_delta` [K, H],
  the new values of those rows (not deltas), which replace the base table's rows. On a
  tied base the lm_head takes the embedding's replaced rows unless it has rows of its own.
  A tied base with trainable tokens of the embedding and the lm_head in modules_to_save
  does not run in PEFT (its forward raises): refused here.

Served as: per module (embed_tokens, lm_head) a whole [V, H] table or `TokenRows` (only
the trained rows, kept sorted by id), in the slots' dtype. The vocabulary is the base's:
a table of another size (added tokens, a resized embedding) is refused, since the server
tokenizes with the base's tokenizer and every row's logits share one width.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from loraquilt.kernels.lora import TokenRows, TokenTable
from loraquilt.server.adapters.errors import AdapterError
from loraquilt.server.model.config import ModelConfig

EMBED, HEAD = "embed_tokens", "lm_head"
HEAD_MODULES = (EMBED, HEAD)
WHOLE, ROWS = "whole", "rows"
# a module_to_save copy (`<module>.weight`, or `<module>.modules_to_save.<adapter>.weight`)
# and a trainable-tokens adapter's rows (`<module>.token_adapter.trainable_tokens_delta`)
_WHOLE_KEY = re.compile(r"^(?:.*\.)?(embed_tokens|lm_head)(?:\.modules_to_save\.[^.]+)?\.weight$")
_ROWS_KEY = re.compile(r"^(?:.*\.)?(embed_tokens|lm_head)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")


@dataclass(frozen=True)
class HeadConfig:
    """The token-table fields of an adapter_config.json, checked."""

    whole: frozenset[str] = frozenset()  # modules_to_save among HEAD_MODULES
    token_indices: tuple[tuple[str, tuple[int, ...]], ...] = ()  # trainable_token_indices per module
    ensure_weight_tying: bool = False

    def indices(self, module: str) -> tuple[int, ...] | None:
        return dict(self.token_indices).get(module)

    def max_bytes(self, model: ModelConfig) -> int:
        """The most its tensors can take in a weights file (float64 worst case)."""
        rows = len(self.whole) * model.vocab_size + sum(len(ids) for _, ids in self.token_indices)
        return rows * model.hidden_size * 8


@dataclass(frozen=True)
class AdapterHeads:
    """What the rows on an adapter read instead of the base's (None: the base's).

    embed:   the input embeddings: a whole [V, H] table or TokenRows over the base's
    lm_head: the output head, likewise (the same object as `embed` where they are tied)
    """

    embed: TokenTable | None = None
    lm_head: TokenTable | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held, each once (a table shared by both modules counts once)."""
        found: dict[int, torch.Tensor] = {}
        for table in (self.embed, self.lm_head):
            parts = () if table is None else (table.indices, table.values) if isinstance(table, TokenRows) else (table,)
            found.update((id(t), t) for t in parts)
        return list(found.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AdapterHeads:
        """On `device` (a table in place already is not copied); a shared table stays shared."""
        def move(table: TokenTable | None) -> TokenTable | None:
            return None if table is None else table.to(device, dtype)

        embed = move(self.embed)
        return AdapterHeads(embed, embed if self.lm_head is self.embed else move(self.lm_head))


def _module(entry: object, field: str) -> str:
    """A module name of modules_to_save / trainable_token_indices -> its HEAD_MODULES name."""
    if not isinstance(entry, str) or not entry:
        raise AdapterError(f"{field} entries must be module names, got {entry!r}")
    last = entry.rsplit(".", 1)[-1]
    if last not in HEAD_MODULES:
        raise AdapterError(f"{field} names {entry!r}; loraquilt serves {field} of {' and '.join(HEAD_MODULES)} "
                           "only (the input embeddings and the output head)")
    return last


def _token_ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise AdapterError(f"{what} must be a non-empty list of token ids, got {repr(value)[:60]}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise AdapterError(f"{what} must hold token ids (integers >= 0), got {repr(value)[:60]}")
    if len(set(value)) != len(value):
        raise AdapterError(f"{what} names a token id twice")
    return tuple(value)


def read_head_config(config: dict) -> HeadConfig:
    """The modules_to_save, trainable_token_indices and ensure_weight_tying fields, checked
    (any JSON value may arrive); AdapterError naming the field otherwise."""
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list):
        raise AdapterError(f"modules_to_save must be a list of module names, got {repr(saved)[:60]}")
    whole = frozenset(_module(entry, "modules_to_save") for entry in saved)
    tokens = config.get("trainable_token_indices")
    indices: dict[str, tuple[int, ...]] = {}
    if isinstance(tokens, dict):
        for name, ids in tokens.items():
            module = _module(name, "trainable_token_indices")
            if module in indices:
                raise AdapterError(f"trainable_token_indices names {module} twice")
            indices[module] = _token_ids(ids, f"trainable_token_indices[{name!r}]")
    elif tokens not in (None, []):
        indices[EMBED] = _token_ids(tokens, "trainable_token_indices")
    both = sorted(whole & set(indices))
    if both:
        raise AdapterError(f"{both[0]} is both in modules_to_save and in trainable_token_indices (PEFT refuses "
                           "that too)")
    tie = config.get("ensure_weight_tying", False)
    if not isinstance(tie, bool):
        raise AdapterError(f"ensure_weight_tying must be true or false, got {tie!r}")
    return HeadConfig(whole, tuple(sorted(indices.items())), tie)


def head_key(key: str) -> tuple[str, str] | None:
    """(module, WHOLE or ROWS) of a token-table tensor's key; None for any other key."""
    match = _WHOLE_KEY.match(key)
    if match:
        return match[1], WHOLE
    match = _ROWS_KEY.match(key)
    return (match[1], ROWS) if match else None


def read_heads(config: HeadConfig, found: dict[tuple[str, str], tuple[str, torch.Tensor]], model: ModelConfig,
               dtype: torch.dtype, weights_file: str) -> AdapterHeads | None:
    """The adapter's token tables from its tensors; found: (module, kind) -> (key, tensor),
    every token-table tensor of the file. None when the adapter has none."""
    for (module, kind), (key, _) in found.items():
        expected = module in config.whole if kind == WHOLE else config.indices(module) is not None
        if not expected:
            field = "modules_to_save" if kind == WHOLE else "trainable_token_indices"
            raise AdapterError(f"unexpected tensor {key!r} in {weights_file} ({field} does not name {module})")
    tables: dict[str, TokenTable] = {}
    for module in sorted(config.whole):
        if (module, WHOLE) not in found:
            raise AdapterError(f"modules_to_save names {module}, but {weights_file} holds no copy of it")
        key, tensor = found[(module, WHOLE)]
        tables[module] = _checked(tensor, key, model, (model.vocab_size, model.hidden_size), dtype)
    for module, ids in config.token_indices:
        if (module, ROWS) not in found:
            raise AdapterError(f"trainable_token_indices names {module}, but {weights_file} holds no "
                               f"{module}.token_adapter.trainable_tokens_delta")
        key, tensor = found[(module, ROWS)]
        too_large = [i for i in ids if i >= model.vocab_size]
        if too_large:
            raise AdapterError(f"trainable_token_indices of {module}: ids {too_large[:4]} are outside the base "
                               f"model's vocabulary of {model.vocab_size}")
        values = _checked(tensor, key, model, (len(ids), model.hidden_size), dtype)
        order = torch.tensor(ids, dtype=torch.int64).sort()
        tables[module] = TokenRows(order.values, values.index_select(0, order.indices).contiguous())
    if not tables:
        return None
    heads = AdapterHeads(tables.get(EMBED), tables.get(HEAD))
    if model.tie_word_embeddings:
        heads = _tied(heads, config)
    if isinstance(heads.embed, torch.Tensor) and isinstance(heads.lm_head, torch.Tensor) \
            and heads.embed is not heads.lm_head and torch.equal(heads.embed, heads.lm_head):
        heads = replace(heads, lm_head=heads.embed)  # tied copies (ensure_weight_tying): one table
    return heads


def _tied(heads: AdapterHeads, config: HeadConfig) -> AdapterHeads:
    """PEFT's tying on a base whose lm_head is its embedding: trained rows of the
    embedding are the lm_head's too (unless it has rows of its own)."""
    if isinstance(heads.embed, TokenRows):
        if isinstance(heads.lm_head, torch.Tensor):
            raise AdapterError("on a base with tied embeddings, trainable_token_indices of embed_tokens with "
                               "lm_head in modules_to_save is not served (PEFT ties the rows into a head it "
                               "replaced; its forward fails)")
        if heads.lm_head is None:
            return replace(heads, lm_head=heads.embed)
    if config.ensure_weight_tying and EMBED in config.whole and heads.lm_head is None:
        raise AdapterError("ensure_weight_tying on a base with tied embeddings: PEFT saves the lm_head copy beside "
                           "embed_tokens, and this adapter has none")
    return heads


def _checked(tensor: torch.Tensor, key: str, model: ModelConfig, shape: tuple[int, int],
             dtype: torch.dtype) -> torch.Tensor:
    """The tensor in `dtype`, refused unless float, of `shape` and finite once converted."""
    if not tensor.dtype.is_floating_point:
        raise AdapterError(f"{key} has dtype {tensor.dtype}; a float dtype is required")
    if tensor.dim() == 2 and tensor.shape[1] == model.hidden_size and shape[0] == model.vocab_size \
            and tensor.shape[0] != model.vocab_size:
        raise AdapterError(f"{key} has {tensor.shape[0]} rows, the base model's vocabulary {model.vocab_size}: "
                           "adapters that resize the vocabulary (added tokens) are not served, the server "
                           "tokenizes with the base's tokenizer")
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"{key} has shape {tuple(tensor.shape)}; the base model needs {shape}")
    value = tensor.to(dtype).contiguous()
    low, high = torch.aminmax(value)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AdapterError(f"{key} has NaN or infinite values (in {str(dtype).removeprefix('torch.')})")
    return value


def update_digest(digest, heads: AdapterHeads | None) -> None:
    """Add the tables to an adapter's content hash (the KV of a row depends on its
    embeddings; its logits on its lm_head)."""
    if heads is None:
        return
    for name, table in ((EMBED, heads.embed), (HEAD, heads.lm_head)):
        if table is None:
            continue
        parts = (table.indices, table.values) if isinstance(table, TokenRows) else (table,)
        digest.update(f"{name}:{'rows' if isinstance(table, TokenRows) else 'whole'};".encode())
        for tensor in parts:
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype};".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().data)
