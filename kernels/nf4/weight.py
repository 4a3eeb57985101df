"""NF4 weights in bitsandbytes' layout (blocksize 64, NF4 code book): quantized once at
load time, the per-block absmax kept dequantized (float32), and the scratch buffers the
CPU paths dequantize into.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

NF4_BLOCKSIZE = 64


@dataclass(frozen=True)
class NF4Weight:
    """packed: [out*in/2] uint8 (two codes per byte, bitsandbytes order)
    absmax:  [out*in/64] float32 per-block scale (double quantization already undone)
    shape:   (out, in)
    state:   the bitsandbytes QuantState (kept for the CUDA path and for the reference)"""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    state: object

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> NF4Weight:
        """weight: [out, in] float; quantized on its device (blocksize 64, double quant)."""
        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE,
                                           compress_statistics=True, quant_type="nf4",
                                           quant_storage=torch.uint8)
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return cls(packed.view(-1), absmax.float().contiguous(), tuple(weight.shape), state)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def concat_rows(cls, parts: list[NF4Weight]) -> NF4Weight:
        """One weight whose rows are the parts' rows in order (q/k/v, gate/up: same `in`).

        Semantics: dequantize(concat_rows(parts)) == cat([dequantize(p) for p in parts], 0),
        bit for bit: each part's 64-value blocks and float32 block scales are kept as they
        are, which needs every part's size to be a multiple of the block (`can_concat`).
        The result's state holds the float32 scales (no double quantization)."""
        if not can_concat(parts):
            raise ValueError("NF4 weights concatenate only with equal in_features and "
                             f"out*in a multiple of {NF4_BLOCKSIZE}: {[p.shape for p in parts]}")
        from bitsandbytes.functional import QuantState

        packed = torch.cat([p.packed for p in parts])  # [sum(out)*in/2]
        absmax = torch.cat([p.absmax for p in parts]).contiguous()  # [sum(out)*in/64]
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        first = parts[0].state
        state = QuantState(absmax=absmax, shape=torch.Size(shape), code=first.code,
                           blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=first.dtype)
        return cls(packed, absmax, shape, state)


def can_concat(parts: list[NF4Weight]) -> bool:
    """Whether `NF4Weight.concat_rows(parts)` keeps every block inside one part."""
    return bool(parts) and all(p.shape[1] == parts[0].shape[1] and p.numel % NF4_BLOCKSIZE == 0
                               for p in parts)


class DequantScratch:
    """One reusable buffer per (device, dtype) for dequantized weights, and named float32
    CPU buffers for the fused kernel (`get`). Not thread-safe: one per model, used by its
    forward only."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._named: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        """A float32 CPU buffer of at least `numel` values, kept under `name`."""
        buffer = self._named.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=torch.float32)
            self._named[name] = buffer
        return buffer

    def view(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        numel = shape[0] * shape[1]
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)
