"""Device-resident adapter slots: stacked, preallocated A/B buffers per layer and projection,
and the per-step LoRA hook the model calls after every projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraquilt.kernels import LoraBatchMeta, build_lora_meta, lora_add_
from loraquilt.server.adapters.peft_folder import LoadedAdapter
from loraquilt.server.model.config import PROJECTIONS, ModelConfig


@dataclass(frozen=True)
class SlotConfig:
    num_slots: int  # adapters resident on the device at once
    max_rank: int  # largest adapter rank accepted
    backend: str = "auto"  # kernels backend

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")

    @property
    def padded_rank(self) -> int:
        """Buffer rank, rounded up to 8 so every row of every buffer is 16-byte aligned."""
        return -(-self.max_rank // 8) * 8


class LoraSlots:
    """A[layer][proj]: [num_slots, R, in], B[layer][proj]: [num_slots, out, R].

    A slot's projections the adapter does not target stay zero, and rows on that slot
    skip those projections altogether (a per-projection view of the step's rows)."""

    def __init__(self, model: ModelConfig, config: SlotConfig, dtype: torch.dtype, device: torch.device):
        self.model, self.config = model, config
        self.dtype, self.device = dtype, device
        rank = config.padded_rank
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(model.num_layers):
            a_layer, b_layer = {}, {}
            for proj in PROJECTIONS:
                out_features, in_features = model.projection_shape(proj)
                a_layer[proj] = torch.zeros(config.num_slots, rank, in_features, dtype=dtype, device=device)
                b_layer[proj] = torch.zeros(config.num_slots, out_features, rank, dtype=dtype, device=device)
            self.a.append(a_layer)
            self.b.append(b_layer)
        self.targets: list[frozenset[str]] = [frozenset()] * config.num_slots
        self._step_meta: dict[str, LoraBatchMeta | None] = {}

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.a + self.b for t in layer.values())

    def load(self, slot: int, adapter: LoadedAdapter) -> None:
        """Copy an adapter into a slot (zero-padded to the buffer rank)."""
        self._check_slot(slot)
        if adapter.rank > self.config.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} over max_rank {self.config.max_rank}")
        self.clear(slot)
        for (layer, proj), module in adapter.modules.items():
            rank = module.rank
            self.a[layer][proj][slot, :rank].copy_(module.a)
            self.b[layer][proj][slot, :, :rank].copy_(module.b)
        self.targets[slot] = frozenset(adapter.target_modules)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in range(self.model.num_layers):
            for proj in PROJECTIONS:
                self.a[layer][proj][slot].zero_()
                self.b[layer][proj][slot].zero_()
        self.targets[slot] = frozenset()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.config.num_slots})")

    # -- per step ---------------------------------------------------------------------

    def begin_step(self, row_slots: torch.Tensor, row_weights: torch.Tensor) -> None:
        """row_slots, row_weights: [T, K] for the step's token rows (-1 = no adapter)."""
        self._step_meta = {}
        by_mask: dict[tuple, LoraBatchMeta | None] = {}
        slots_list = row_slots.tolist()
        for proj in PROJECTIONS:
            masked = [[s if s >= 0 and proj in self.targets[s] else -1 for s in row] for row in slots_list]
            key = tuple(map(tuple, masked))
            if key not in by_mask:
                if all(s < 0 for row in masked for s in row):
                    by_mask[key] = None
                else:
                    by_mask[key] = build_lora_meta(
                        torch.tensor(masked, dtype=torch.int64).view(row_slots.shape), row_weights,
                        num_slots=self.config.num_slots, device=self.device,
                    )
            self._step_meta[proj] = by_mask[key]

    def end_step(self) -> None:
        self._step_meta = {}

    def add_(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str) -> None:
        meta = self._step_meta.get(projection)
        if meta is not None:
            lora_add_(y, x, self.a[layer][projection], self.b[layer][projection], meta, self.config.backend)
