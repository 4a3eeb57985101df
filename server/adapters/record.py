"""One adapter's record in the registry: its files' identity and content hash, what kind
of adapter it is, and where its weights are (the tiers set `host`, `slot`, `pins`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loraquilt.server.adapters.device_tier import TIER_DEVICE
from loraquilt.server.adapters.host_tier import TIER_HOST

if TYPE_CHECKING:
    from loraquilt.server.adapters.derived import DerivedSource
    from loraquilt.server.adapters.loader import PendingRead
    from loraquilt.server.adapters.peft_folder import LoadedAdapter

TIER_DISK = "disk"


@dataclass
class AdapterRecord:
    name: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    dora: bool = False  # a DoRA adapter (use_dora): served alone, never in a mix
    heads: bool = False  # its own input embeddings / lm_head (heads.py): served alone at weight 1
    alora: tuple[int, ...] | None = None  # an aLoRA adapter's invocation tokens (alora.py): served alone
    fingerprint: tuple | None = field(default=None, repr=False)  # the files as registered
    content_hash: str = ""  # of the weights as registered (the prefix cache's adapter identity)
    host: LoadedAdapter | None = field(default=None, repr=False)  # set by the host tier
    slot: int | None = None  # set by the device tier
    pins: int = 0
    holds: int = 0  # waiting requests' HostHolds on it: its host copy is not evicted
    loading: PendingRead | None = field(default=None, repr=False)  # the read in flight on the loader thread
    retired: bool = False  # unregistered (while pinned: its slot frees at the last release)
    created: int = field(default_factory=lambda: int(time.time()))  # registration time (Unix seconds)
    derived: DerivedSource | None = field(default=None, repr=False)  # a merge's members (derived.py)

    @property
    def kind(self) -> str:
        """What it is: "lora", or what it has beyond plain LoRA joined by "+" ("dora",
        "heads": its own embeddings or lm_head, "alora"), or "merge:<method>" (derived)."""
        if self.derived is not None:
            return f"merge:{self.derived.spec.method}"
        kinds = [name for name, present in (("dora", self.dora), ("heads", self.heads), ("alora", self.alora))
                 if present]
        return "+".join(kinds) or "lora"

    @property
    def tier(self) -> str:
        if self.slot is not None:
            return TIER_DEVICE
        return TIER_HOST if self.host is not None else TIER_DISK
