"""Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

Everything the engine cannot honour is refused with an error that names it; nothing is
silently ignored. The result holds, per (layer, projection), A [r, in] and B [out, r]
with the module's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) already folded into B,
and for a DoRA adapter (`use_dora`) each module's magnitude vector m [out]; its output
scales m / ||W + s·B·A|| need the base weights and are computed apart (`dora.py`). An
adapter's own input embeddings and lm_head (`modules_to_save`, `trainable_token_indices`)
are read by `heads.py`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraquilt.server.adapters.errors import AdapterError
from loraquilt.server.adapters.heads import AdapterHeads, head_key, read_head_config, read_heads, update_digest
from loraquilt.server.json_input import JsonInputError, load_json
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20

# LoraConfig fields that only matter for training or bookkeeping: accepted whatever they hold.
HARMLESS_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying",
    "qalora_group_size", "use_dora",
    "alora_invocation_tokens",  # activated LoRA: where it applies (alora.py)
    # read by heads.py
    "modules_to_save", "trainable_token_indices",
})
# Features the engine does not implement, with the value that means "off".
UNSUPPORTED_FEATURES = {
    "bias": "trained biases (bias)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out weights",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}
_OFF_VALUES = (None, False, "none", [], {}, "")
# lora_A / lora_B weights, and DoRA's magnitude vectors (saved by PEFT as
# `...<proj>.lora_magnitude_vector`; an adapter name and `.weight` may follow)
_KEY = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\."
    r"(?:lora_([AB])(?:\.[^.]+)?\.weight|(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$"
)


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaling folded in

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoadedAdapter:
    path: Path
    rank: int  # largest module rank
    target_modules: tuple[str, ...]  # projection names present, in model order
    modules: dict[tuple[int, str], LoraModule] = field(repr=False)
    size_bytes: int
    warnings: tuple[str, ...] = ()
    content_hash: str = ""  # of every module's name, shape and scaled weights: what its KV depends on
    alora_invocation_tokens: tuple[int, ...] | None = None  # aLoRA: it applies from these tokens on (alora.py)
    # DoRA only (use_dora): per module its magnitude vector m [out] float32, read from the folder
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    # DoRA only: [L, C] float32, each module's output scale m / ||W + s·B·A|| in its columns
    # of its layer's row, ones elsewhere (dora.py: with_dora_scales, scale_columns)
    dora_scales: torch.Tensor | None = field(default=None, repr=False)
    # its own input embeddings and lm_head (modules_to_save, trainable_token_indices), in `dtype`
    heads: AdapterHeads | None = field(default=None, repr=False)

    @property
    def use_dora(self) -> bool:
        return bool(self.magnitudes)

    def nbytes_in(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        dora = sum(v.numel() * v.element_size() for v in self.magnitudes.values())
        dora += 0 if self.dora_scales is None else self.dora_scales.numel() * self.dora_scales.element_size()
        heads = self.heads.nbytes if self.heads is not None else 0
        return sum((m.a.numel() + m.b.numel()) * elem for m in self.modules.values()) + dora + heads


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: the first key k with re.match(rf"(.*\\.)?({k})$", module_name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _finite_number(value, what: str) -> float:
    try:  # an integer past float's range overflows
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AdapterError(f"{what} must be a finite number, got {repr(value)[:40]}")
    return number


def _rank(value, what: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{what} must be an integer, got {value!r}")
    if value < 1:
        raise AdapterError(f"{what} must be >= 1, got {value}")
    if value > max_rank:
        raise AdapterError(f"{what} = {value} is over the server's max LoRA rank {max_rank}")
    return value


def read_adapter_config(folder: Path, max_rank: int) -> dict:
    path = folder / CONFIG_FILE
    try:
        if not folder.is_dir():
            if folder.exists():
                raise AdapterError(f"adapter path {folder} is not a folder")
            raise AdapterError(f"adapter folder {folder} does not exist")
        if not path.is_file():
            raise AdapterError(f"{folder} has no {CONFIG_FILE}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_bytes()
    except OSError as error:  # a name too long, no permission
        raise AdapterError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        config = load_json(text)
    except JsonInputError as error:
        raise AdapterError(f"{CONFIG_FILE} is {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    refused = [label for key, label in UNSUPPORTED_FEATURES.items()
               if key in config and config[key] not in _OFF_VALUES]
    unknown = sorted(key for key in config
                     if key not in HARMLESS_FIELDS and key not in UNSUPPORTED_FEATURES
                     and config[key] not in _OFF_VALUES)
    if refused or unknown:
        names = refused + [f"unknown LoraConfig field {key!r}" for key in unknown]
        raise AdapterError("adapter uses features loraquilt does not implement: " + ", ".join(names))
    read_head_config(config)
    _rank(config.get("r", 8), "r", max_rank)
    _finite_number(config.get("lora_alpha", 8), "lora_alpha")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag, False), bool):
            raise AdapterError(f"{flag} must be true or false, got {config[flag]!r}")
    for field_name, check in (("rank_pattern", lambda v, what: _rank(v, what, max_rank)),
                              ("alpha_pattern", _finite_number)):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{field_name} must be a JSON object, got {type(patterns).__name__}")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as error:
                raise AdapterError(f"{field_name} key {key!r} is not a valid pattern: {error}") from None
            check(value, f"{field_name}[{key!r}]")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (list, str)):
        raise AdapterError(f"target_modules must be a list of names or a pattern, got {targets!r}")
    if isinstance(targets, list):
        bad = [t for t in targets if t not in PROJECTIONS]
        if bad:
            raise AdapterError(
                f"target_modules {bad} are not supported; loraquilt applies LoRA to "
                f"{', '.join(PROJECTIONS)}"
            )
    return config


def _invocation(config: dict) -> tuple[int, ...] | None:
    """An aLoRA adapter's invocation token ids (None: a plain adapter)."""
    tokens = config.get("alora_invocation_tokens")
    if tokens in (None, []):
        return None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                                               for t in tokens):
        raise AdapterError(f"alora_invocation_tokens must be a list of token ids, got {str(tokens)[:60]}")
    return tuple(tokens)


def load_peft_adapter(folder: Path | str, model: ModelConfig, *, max_rank: int,
                      dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """Validate a PEFT LoRA folder against `model` and return its scaled weights (CPU)."""
    folder = Path(folder)
    config = read_adapter_config(folder, max_rank)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
        if pickles:
            raise AdapterError(
                f"{folder} has only {pickles[0]} (pickle); refused for security, "
                f"save the adapter with safetensors ({WEIGHTS_FILE})"
            )
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}")
    head_config = read_head_config(config)
    _check_file_size(weights_path, model, max_rank, head_config.max_bytes(model))

    default_r, default_alpha = config.get("r", 8), float(config.get("lora_alpha", 8))
    rslora, dora = config.get("use_rslora", False), config.get("use_dora", False)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    tables: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}  # (module, kind) -> (key, tensor)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            for key in handle.keys():
                match = _KEY.match(key)
                if match is None and head_key(key) is not None:
                    if head_key(key) in tables:
                        raise AdapterError(f"{WEIGHTS_FILE} holds {key!r} and {tables[head_key(key)][0]!r}")
                    tables[head_key(key)] = (key, handle.get_tensor(key))
                    continue
                if match is None:
                    raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}")
                layer, group, proj, half = int(match[1]), match[2], match[3], match[4] or "M"
                if half == "M" and not dora:
                    raise AdapterError(f"tensor {key!r} is a DoRA magnitude, but use_dora is not set")
                if proj not in PROJECTIONS or (group == "self_attn") != (proj in ATTENTION_PROJECTIONS):
                    raise AdapterError(f"tensor {key!r} targets unsupported module {group}.{proj}")
                if layer >= model.num_layers:
                    raise AdapterError(f"tensor {key!r}: layer {layer} but the model has {model.num_layers}")
                halves.setdefault((layer, proj), {})[half] = handle.get_tensor(key)
    except SafetensorError as error:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {error}") from None
    except (OSError, RuntimeError, ValueError) as error:
        if isinstance(error, AdapterError):
            raise
        raise AdapterError(f"cannot read {WEIGHTS_FILE}: {error}") from None
    if not halves:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    heads = read_heads(head_config, tables, model, dtype, WEIGHTS_FILE)
    if heads is not None and _invocation(config) is not None:
        raise AdapterError("an activated LoRA (alora_invocation_tokens) with its own input embeddings or lm_head "
                           "(modules_to_save, trainable_token_indices) is not served: its rows before the "
                           "invocation run on the base model, which PEFT's tables do not")

    # shapes and ranks first, then every module's A and scaled B into one flat buffer of
    # the slot dtype (one allocation per adapter, one finiteness pass over all of it)
    checked: list[tuple[tuple[int, str], str, torch.Tensor, torch.Tensor, float, float, int]] = []
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, proj), pair in sorted(halves.items(), key=lambda item: (item[0][0], PROJECTIONS.index(item[0][1]))):
        group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
        name = f"model.layers.{layer}.{group}.{proj}"
        for half, label in (("A", "lora_A weight"), ("B", "lora_B weight"), ("M", "DoRA lora_magnitude_vector")):
            if half not in pair and (half != "M" or dora):
                raise AdapterError(f"{name}: {label} missing")
        r = _rank(_pattern_value(config.get("rank_pattern") or {}, name, default_r), f"rank of {name}", max_rank)
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, default_alpha))
        a, b = pair["A"], pair["B"]
        out_features, in_features = model.projection_shape(proj)
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise AdapterError(
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model; expected ({r}, {in_features}) / ({out_features}, {r})"
            )
        for half, tensor in (("lora_A", a), ("lora_B", b), ("lora_magnitude_vector", pair.get("M", a))):
            if not tensor.dtype.is_floating_point:
                raise AdapterError(f"{name}.{half} has dtype {tensor.dtype}; a float dtype is required")
        if dora:
            magnitude = pair["M"]
            if tuple(magnitude.shape) != (out_features,):
                raise AdapterError(f"{name}: lora_magnitude_vector {tuple(magnitude.shape)} does not fit the base "
                                   f"model; expected ({out_features},)")
            magnitudes[(layer, proj)] = magnitude.to(torch.float32)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        checked.append(((layer, proj), name, a, b, scaling, alpha, r))

    flat = torch.empty(sum(a.numel() + b.numel() for _, _, a, b, *_ in checked), dtype=dtype)
    modules: dict[tuple[int, str], LoraModule] = {}
    offset = 0
    for key, _, a, b, scaling, _, _ in checked:
        module_a = flat[offset : offset + a.numel()].view(a.shape)  # [r, in]
        offset += a.numel()
        module_b = flat[offset : offset + b.numel()].view(b.shape)  # [out, r]
        offset += b.numel()
        module_a.copy_(a.to(torch.float32))  # the value rounded once from float32, as B
        module_b.copy_(b.to(torch.float32) * scaling)
        modules[key] = LoraModule(a=module_a, b=module_b)
    low, high = torch.aminmax(flat)  # NaN propagates through both: one pass, no mask
    if not (math.isfinite(low) and math.isfinite(high)):
        raise _non_finite_error(checked, dtype)
    for key, magnitude in magnitudes.items():
        if not bool(torch.isfinite(magnitude).all()):
            raise AdapterError(f"{dict((k, n) for k, n, *_ in checked)[key]}.lora_magnitude_vector has NaN or "
                               "infinite values")
    targets = tuple(p for p in PROJECTIONS if any(proj == p for _, proj in modules))
    digest = hashlib.blake2b(digest_size=16)
    for (layer, proj), module in modules.items():
        digest.update(f"{layer}.{proj}:{tuple(module.a.shape)}:{tuple(module.b.shape)};".encode())
    digest.update(str(dtype).encode())
    digest.update(flat.view(torch.uint8).numpy().data)
    for key, magnitude in magnitudes.items():  # a DoRA adapter's output depends on them too
        digest.update(f"m{key}".encode())
        digest.update(magnitude.contiguous().view(torch.uint8).numpy().data)
    update_digest(digest, heads)  # a row's KV depends on its embeddings, its logits on its lm_head
    return LoadedAdapter(
        path=folder,
        rank=max(m.rank for m in modules.values()),
        target_modules=targets,
        modules=modules,
        size_bytes=weights_path.stat().st_size,
        content_hash=digest.hexdigest(),
        alora_invocation_tokens=_invocation(config),
        magnitudes=magnitudes,
        heads=heads,
    )


def _non_finite_error(checked, dtype: torch.dtype) -> AdapterError:
    """Which module made the adapter's weights non-finite, and how (the slow path of a
    refused folder only)."""
    for _, name, a, b, scaling, alpha, r in checked:
        for half, tensor in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(tensor).all()):
                return AdapterError(f"{name}.{half} has NaN or infinite values")
        scaled = ((a.to(torch.float32)).to(dtype), (b.to(torch.float32) * scaling).to(dtype))
        if not all(bool(torch.isfinite(t).all()) for t in scaled):
            return AdapterError(
                f"{name}: weights overflow once scaled by {scaling:g} (lora_alpha {alpha:g}, "
                f"r {r}) and stored as {str(dtype).removeprefix('torch.')}"
            )
    return AdapterError("the adapter's weights are not finite")  # unreachable: some module is


def _check_file_size(path: Path, model: ModelConfig, max_rank: int, tables: int = 0) -> None:
    """Refuse before reading a weights file larger than any valid adapter could be
    (tables: the most its token tables may take)."""
    per_layer = sum(sum(model.projection_shape(p)) for p in PROJECTIONS)
    limit = model.num_layers * per_layer * max_rank * 8 + tables + (1 << 20)  # fp64 worst case + header
    size = path.stat().st_size
    if size > limit:
        raise AdapterError(
            f"{WEIGHTS_FILE} is {size} bytes, more than any rank-{max_rank} adapter of this "
            f"model can be ({limit} bytes)"
        )
