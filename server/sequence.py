"""One request's running state inside the engine (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from loraquilt.server.request import Request


@dataclass(eq=False)
class Sequence:
    request: Request
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    cache_slot: int | None = None  # KV cache row while admitted
    adapter_slots: list[tuple[int, float]] = field(default_factory=list)  # pinned (slot, weight)
    adapter_lease: Any = None  # the registry's Lease behind adapter_slots
    prefilled: bool = False
    finish_reason: str | None = None
    error: Exception | None = None  # why it was rejected or failed, if it was
    scrub_cache: bool = False  # its KV row may hold non-finite values: zero it on release
    text: str = ""  # generated text so far (stop strings cut)
    emitted_chars: int = 0  # text already handed out
    generator: Any = None  # torch.Generator for sampled requests (set by the runner)
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None
    first_token_time: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_input(self) -> list[int]:
        """Tokens to feed this step: the whole prompt first, then the last generated token."""
        return list(self.prompt_ids) if not self.prefilled else [self.output_ids[-1]]

    def next_position(self) -> int:
        return 0 if not self.prefilled else self.num_tokens - 1
