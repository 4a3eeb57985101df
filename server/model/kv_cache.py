"""Key/value cache preallocated once: one row of max_seq_len positions per sequence slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheConfig:
    num_slots: int  # sequences that can run at once
    max_seq_len: int  # prompt + generated tokens per sequence

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_seq_len < 2:
            raise ValueError(
                f"KV cache needs num_slots >= 1 and max_seq_len >= 2, got {self.num_slots}, "
                f"{self.max_seq_len}"
            )


class KVCache:
    """keys, values: [layers, num_slots, kv_heads, max_seq_len, head_dim], never reallocated."""

    def __init__(self, config: KVCacheConfig, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        shape = (num_layers, config.num_slots, num_kv_heads, config.max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """slots, positions: [T]; k, v: [T, kv_heads, head_dim]"""
        self.keys[layer, slots, :, positions] = k
        self.values[layer, slots, :, positions] = v

    def clear(self, slot: int) -> None:
        """Zero one slot's row: later sequences in the slot read finite values even where
        they are masked out (a masked NaN still poisons softmax(scores) @ values)."""
        self.keys[:, slot].zero_()
        self.values[:, slot].zero_()

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
