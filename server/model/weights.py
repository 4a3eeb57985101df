"""Load a Llama-family checkpoint folder into a CausalLM, quantizing each projection as it
is read (peak memory: one layer in the compute dtype on top of the NF4 model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from loraquilt.kernels.nf4 import DequantScratch, plan_nf4
from loraquilt.server.model.device import DeviceConfig
from loraquilt.server.model.config import PROJECTIONS, ModelConfig, load_model_config
from loraquilt.server.model.layers import DecoderLayer
from loraquilt.server.model.llama import CausalLM, build_projection


class CheckpointReader:
    """Tensors by name from one or sharded safetensors files (never pickle)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in {folder}")
            weight_map = None
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in files}
        self._where = weight_map or {
            key: name for name, handle in self._handles.items() for key in handle.keys()
        }

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} missing from checkpoint")
        return self._handles[self._where[key]].get_tensor(key)

    def find(self, *candidates: str) -> torch.Tensor | None:
        for key in candidates:
            if key in self._where:
                return self.get(key)
        return None


def load_causal_lm(folder: Path, device_config: DeviceConfig = DeviceConfig(),
                   progress: bool = True, fuse_projections: bool = True, fused_kernel: bool = True) -> CausalLM:
    """fuse_projections: q/k/v and gate/up as one NF4 weight each (same values, fewer calls).
    fused_kernel: on CPU, the plan of `kernels.nf4.dispatch` (the fused NF4 + LoRA kernel for the
    row counts where this CPU runs it fastest); False: dequantize + GEMM for every step."""
    folder = Path(folder)
    config: ModelConfig = load_model_config(folder)
    device, dtype, dtype_reason = device_config.resolve_with_reason()
    reader = CheckpointReader(folder)

    def dense(key: str) -> torch.Tensor:
        return reader.get(key).to(device=device, dtype=dtype)

    scratch = DequantScratch()  # one dequantization buffer for every projection of this model
    layers = []
    for index in _progress(range(config.num_layers), progress, f"quantizing {config.num_layers} layers to NF4"):
        prefix = f"model.layers.{index}."
        projections = {}
        for name in PROJECTIONS:
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            weight = reader.get(f"{prefix}{group}.{name}.weight")
            bias = reader.find(f"{prefix}{group}.{name}.bias")
            projections[name] = build_projection(config, name, weight, bias, dtype, device, scratch)
        layers.append(DecoderLayer(
            config, index, projections,
            dense(f"{prefix}input_layernorm.weight"), dense(f"{prefix}post_attention_layernorm.weight"),
            fuse=fuse_projections,
        ))
    embed = dense("model.embed_tokens.weight")
    lm_head = None
    if not config.tie_word_embeddings:
        head = reader.find("lm_head.weight")
        lm_head = None if head is None else head.to(device=device, dtype=dtype)
    model = CausalLM(config, embed, layers, dense("model.norm.weight"), lm_head)
    model.dtype_reason = dtype_reason  # why this compute dtype (logged, shown by `info`)
    if device.type == "cpu":
        plan = plan_nf4(dtype) if fused_kernel else plan_nf4(dtype, fused_available=False,
                                                             why_not_fused="the fused kernel is switched off")
        for linear in model.quantized_linears():
            linear.use_plan(plan)
        model.nf4_paths = plan.describe()
    return model


def _progress(items, enabled: bool, label: str):
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=label, file=sys.stderr, unit="layer", leave=False)
