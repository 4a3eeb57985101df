"""The QLoRA model: the base loaded by transformers + bitsandbytes as NF4 (blocksize 64,
double quantization), prepared with PEFT's `prepare_model_for_kbit_training`, with LoRA
layers from `get_peft_model` on the chosen projections.

The NF4 values are the ones `loraquilt serve` computes with: both quantize the same
checkpoint with the same bitsandbytes call. On CPU the frozen base may be held as those NF4
values dequantized once ("dequantized", bit-identical to what `Linear4bit` dequantizes at
every forward and backward); the adapter is trained against exactly the served base either
way, the dequantized form is only faster on a CPU.
"""

from __future__ import annotations

import contextlib

import random
from pathlib import Path

import torch
from torch import nn

from loraquilt.train.config import Runtime, TrainConfig


def load_nf4_for_training(folder: Path, runtime: Runtime) -> nn.Module:
    """transformers CausalLM with every projection as bitsandbytes NF4, ready for k-bit training."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = getattr(torch, runtime.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map={"": runtime.device}, dtype=compute_dtype,
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # In eval mode on AVX512-BF16 CPUs, Linear4bit would repack its weight for a
            # bf16 kernel; keep the fp32 arithmetic the server uses (eval loss runs in eval mode).
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=runtime.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def dequantize_frozen_base(model: nn.Module) -> int:
    """Swap every bitsandbytes `Linear4bit` for a frozen `nn.Linear` holding its dequantized
    NF4 weight (the exact values its forward multiplies by). Returns how many were swapped."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, bnb.nn.Linear4bit):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        state = child.weight.quant_state
        weight = dequantize_4bit(child.weight.data, state).to(child.compute_dtype or torch.float32)
        dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight.reshape(child.out_features, child.in_features), requires_grad=False)
        if child.bias is not None:
            dense.bias = nn.Parameter(child.bias.detach().to(weight.dtype), requires_grad=False)
        setattr(parent, name, dense)
    return len(swaps)


def build_qlora_model(folder: Path, config: TrainConfig, runtime: Runtime,
                      invocation: list[int] | None = None) -> nn.Module:
    """NF4 base + fresh LoRA layers (A: kaiming, B: zeros, seeded), in train mode;
    invocation: an activated LoRA's invocation token ids (PEFT's alora_invocation_tokens)."""
    from peft import LoraConfig, get_peft_model

    model = load_nf4_for_training(folder, runtime)
    if runtime.frozen_base == "dequantized":
        dequantize_frozen_base(model)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.targets), bias="none", alora_invocation_tokens=invocation,
    )
    torch.manual_seed(config.seed)
    model = get_peft_model(model, lora)
    model.train()
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, config: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW on the LoRA weights: bitsandbytes' paged AdamW on CUDA, torch's on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    if runtime.optimizer == "bitsandbytes.optim.PagedAdamW":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=config.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def _alora_offsets(model: nn.Module, input_ids: torch.Tensor):
    """An activated LoRA's per-row offsets for a forward that bypasses PeftModel.forward
    (which computes them): PEFT's own hooks, given the offsets of each row's last
    invocation; a no-op context for a plain adapter."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "alora_invocation_tokens", None):
        return contextlib.nullcontext()
    from peft.tuners.lora.variants import calculate_alora_offsets

    offsets = calculate_alora_offsets(model.peft_config, model.active_adapter, input_ids)
    return model.base_model._enable_peft_forward_hooks(alora_offsets=offsets)


def completion_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of the batch.

    The logits are computed only where a label is kept (the completion), not over the
    whole vocabulary at every prompt position.
    batch: input_ids, attention_mask, labels, each [B, L]
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with _alora_offsets(model, batch["input_ids"]):
        hidden = causal_lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
        ).last_hidden_state  # [B, L, H]
    targets = batch["labels"][:, 1:]  # [B, L-1]: token t+1 is predicted at position t
    keep = targets != -100  # [B, L-1]
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    return nn.functional.cross_entropy(logits.float(), targets[keep])


class ScaleJitter:
    """Scales every LoRA delta by one random factor in [low, high] per step, so that the
    adapter keeps its behaviour at partial weight - in a mix, each adapter is applied at
    its weight (0.5 in a 50/50 mix). `restore()` puts PEFT's own scaling back."""

    def __init__(self, model: nn.Module, low: float, high: float, seed: int):
        from peft.tuners.lora import LoraLayer

        self.layers = [(m, dict(m.scaling)) for m in model.modules() if isinstance(m, LoraLayer)]
        self.low, self.high = low, high
        self.rng = random.Random(seed)

    def step(self) -> float:
        factor = self.rng.uniform(self.low, self.high)
        for module, scaling in self.layers:
            for name, value in scaling.items():
                module.scaling[name] = value * factor
        return factor

    def restore(self) -> None:
        for module, scaling in self.layers:
            module.scaling.update(scaling)
