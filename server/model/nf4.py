"""NF4 projections: weights quantized once at load time with bitsandbytes.

Blocksize 64, double quantization; one 4-bit copy of every weight in every compute dtype.
On CUDA the forward is bitsandbytes' own `matmul_4bit`. On CPU the plan (`kernels.nf4.dispatch`,
a rule of the CPU and dtype) sends a step either to the fused NF4 + LoRA kernel (one call
per projection group, LoRA deltas included) or to dequantize-then-GEMM into a scratch
buffer the whole model shares (bit-identical to bitsandbytes), followed by the LoRA
kernels. The per-block absmax is held in float32 (0.5625 bytes per parameter in all).
"""

from __future__ import annotations

import torch
from torch import nn

from loraquilt.kernels.nf4 import DequantScratch, NF4Plan, NF4Weight, can_concat, fused_lora, nf4_linear
from loraquilt.kernels.nf4.cpu import dequantize_nf4_into, nf4_linear_cpu
from loraquilt.server.model.batch import LoraHook


class NF4Linear(nn.Module):
    """y = x @ W.T + b with W held as NF4 (blocksize 64, double quantization).

    One module may hold several projections that read the same input, fused row-wise
    (q/k/v, gate/up): `parts` names them with their output sizes, in row order, and the
    forward returns their outputs side by side ([T, sum(out)])."""

    def __init__(self, weight: torch.Tensor | NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 scratch: DequantScratch | None = None, name: str = "proj",
                 parts: tuple[tuple[str, int], ...] | None = None):
        """weight: [out, in] (any float dtype, any device; quantized on its device), or an
                 NF4Weight already quantized (then `parts` says what its rows are)
        bias:   [out] or None, kept in compute_dtype
        scratch: dequantization buffer shared by every projection of one model"""
        super().__init__()
        if isinstance(weight, NF4Weight):
            self.weight = weight
            device = weight.packed.device
        else:
            if weight.dim() != 2:
                raise ValueError(f"NF4Linear weight must be 2-D, got {tuple(weight.shape)}")
            self.weight = NF4Weight.quantize(weight.to(compute_dtype))
            device = weight.device
        self.out_features, self.in_features = self.weight.shape
        self.parts = parts or ((name, self.out_features),)
        if sum(size for _, size in self.parts) != self.out_features:
            raise ValueError(f"parts {self.parts} do not add up to {self.out_features} rows")
        self.on_cpu = device.type == "cpu"
        if self.on_cpu and self.weight.state.nested:
            # keep the float32 absmax only: the state becomes a plain (non-nested) one
            state = self.weight.state
            state.absmax, state.nested, state.state2, state.offset = self.weight.absmax, False, None, None
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.scratch = scratch or DequantScratch()
        self.plan: NF4Plan | None = None  # CPU: the path per row count (set by the loader)
        self.layer = -1  # the decoder layer it belongs to (the LoRA slots are looked up by it)

    @classmethod
    def fuse(cls, linears: list[NF4Linear]) -> NF4Linear | None:
        """One module computing every linear's output side by side, with the same values
        bit for bit; None when their NF4 blocks do not align (see `can_concat`)."""
        weights = [linear.weight for linear in linears]
        if not can_concat(weights) or len({linear.bias is None for linear in linears}) != 1:
            return None
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
        parts = tuple(part for linear in linears for part in linear.parts)
        return cls(NF4Weight.concat_rows(weights), bias, linears[0].compute_dtype, linears[0].scratch,
                   parts=parts)

    def use_plan(self, plan: NF4Plan) -> None:
        """Take the CPU plan: the path per row count."""
        self.plan = plan

    def forward(self, x: torch.Tensor, lora: LoraHook | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out]: the projection (every part side by side) plus this step's
        LoRA deltas of each part; rows on a DoRA adapter times its output scale, then the
        bias (PEFT's DoRA scales W x + s·B·A·x, not the bias)."""
        dora = lora is not None and lora.has_dora
        if self.on_cpu and self.plan is not None:
            path = self.plan.path_for(x.shape[0])
            if path == "fused" and fused_lora.supports(x, self.weight) and (lora is None or lora.fuses_lora):
                fused = lora.fused_args(self.layer, self.parts) if lora is not None else None
                return fused_lora.nf4_lora_linear(x, self.weight, self.bias, *(fused or (None, ())),
                                                  scratch=self.scratch, isa=self.plan.isa,
                                                  row_scale=lora.dora_row_scale(self.layer, self.parts) if dora
                                                  else None)
            dequantizer = "bnb" if path == "dequant_bnb" else "auto"
            y = nf4_linear_cpu(x, self.weight, None if dora else self.bias, self.scratch, dequantizer)
        else:
            y = nf4_linear(x, self.weight, None if dora else self.bias, self.scratch)
        if lora is not None:
            start = 0
            for name, size in self.parts:
                lora.add_(y[:, start : start + size] if len(self.parts) > 1 else y, x, self.layer, name)
                start += size
        if dora:
            lora.dora_scale_(y, self.layer, self.parts)
            if self.bias is not None:
                y += self.bias
        return y

    def dequantized(self) -> torch.Tensor:
        """[out, in] in compute dtype: the exact values the forward multiplies by."""
        out = torch.empty(self.weight.shape, dtype=self.compute_dtype, device=self.weight.packed.device)
        return dequantize_nf4_into(self.weight, out)

    def quantized_bytes(self) -> int:
        """Bytes held for the weight: packed codes plus the scales in the form kept."""
        weight, state = self.weight, self.weight.state
        total = weight.packed.numel() * weight.packed.element_size()
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += state.state2.code.numel() * state.state2.code.element_size()
        return total + state.code.numel() * state.code.element_size()

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        names = "+".join(name for name, _ in self.parts)
        return f"{names}: in={self.in_features}, out={self.out_features}, nf4, bias={self.bias is not None}"
