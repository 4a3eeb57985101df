"""Key/value cache: one pool of fixed-size blocks, allocated once, shared by every sequence.

Which blocks a sequence's positions live in is the block manager's business
(server/block_manager.py); this module holds the tensors and turns block tables into
flat slots. Position p of a sequence with block table `table` is stored at flat slot
table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraquilt.kernels.attention import write_kv

MIB = 2**20


def kv_bytes_per_position(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token position takes in the cache (keys and values, every layer)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVCacheConfig:
    num_blocks: int
    block_size: int  # positions per block (the engine's --kv-block-size)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got {self.num_blocks}, "
                             f"{self.block_size}")

    @classmethod
    def for_budget(cls, budget_bytes: float, bytes_per_position: int, block_size: int) -> KVCacheConfig:
        """As many whole blocks as `budget_bytes` holds (at least one)."""
        return cls(max(1, int(budget_bytes // (bytes_per_position * block_size))), block_size)

    @property
    def num_positions(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv_cache(*, budget_mb: float | None, default_positions: int, bytes_per_position: int,
                  block_size: int, max_seq_len: int) -> KVCacheConfig:
    """The pool for `--kv-cache-mb` (None: `default_positions` positions' worth); refused
    when it cannot hold one request of `max_seq_len` positions."""
    budget = default_positions * bytes_per_position if budget_mb is None else budget_mb * MIB
    config = KVCacheConfig.for_budget(budget, bytes_per_position, block_size)
    if config.num_positions < max_seq_len:
        raise ValueError(
            f"--kv-cache-mb {budget / MIB:g} holds {config.num_positions} positions, fewer than one request of "
            f"--max-seq-len {max_seq_len} needs ({max_seq_len * bytes_per_position / MIB:.2f} MiB)")
    return config


class KVCache:
    """keys, values: [layers, num_blocks, block_size, kv_heads, head_dim], never reallocated."""

    def __init__(self, config: KVCacheConfig, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        shape = (num_layers, config.num_blocks, config.block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values of one layer: [num_blocks, block_size, kv_heads, head_dim] each."""
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slot_mapping: [T] flat slots; k, v: [T, kv_heads, head_dim]"""
        write_kv(self.keys[layer], self.values[layer], slot_mapping, k, v)

    def clear(self, block_ids: list[int]) -> None:
        """Zero some blocks: later sequences in them read finite values even where they are
        masked out (a masked NaN still poisons softmax(scores) @ values)."""
        if block_ids:
            index = torch.tensor(block_ids, dtype=torch.int64, device=self.keys.device)
            self.keys[:, index] = 0
            self.values[:, index] = 0

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks, (source, destination) pairs, in every layer: a forked table's
        own copy of a partly written block."""
        if pairs:
            source, destination = (torch.tensor(ids, dtype=torch.int64, device=self.keys.device)
                                   for ids in zip(*pairs))
            self.keys[:, destination] = self.keys[:, source]
            self.values[:, destination] = self.values[:, source]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
