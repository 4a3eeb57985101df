"""Where the model runs and in which compute dtype: `--device` and `--dtype`, declared once
(the flags are generated from these fields' metadata, server/config_flags.py). Torch is
imported only when a setting is resolved, so configs and parsers are built without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraquilt.server.model.dtype import DTYPE_CHOICES, DTYPE_ENV, resolve_compute_dtype

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DeviceConfig:
    """device "auto": CUDA when present, else CPU. dtype: see `server.model.dtype`
    (auto = bf16 on CUDA and on CPUs with native bf16 dot products, fp32 elsewhere)."""

    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    dtype: str = field(default="auto", metadata={
        "help": "compute dtype; float32 is the exact path", "choices": DTYPE_CHOICES, "env": DTYPE_ENV,
        "shown": f"${DTYPE_ENV} or auto: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, float32 elsewhere"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        device, dtype, _ = self.resolve_with_reason()
        return device, dtype

    def resolve_with_reason(self) -> tuple[torch.device, torch.dtype, str]:
        """(device, compute dtype, why that dtype)."""
        import torch

        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("device cuda requested but CUDA is not available")
        dtype, reason = resolve_compute_dtype(self.dtype, device)
        return device, dtype, reason
