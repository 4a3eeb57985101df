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
    adapter_hold: Any = None  # while waiting: the registry's HostHold (its adapters are being read)
    num_computed_tokens: int = 0  # prompt tokens already in the KV cache
    num_scheduled_tokens: int = 0  # prompt tokens of this step's chunk (set by the scheduler)
    prefilled: bool = False  # the whole prompt is in the cache and the first token was sampled
    finish_reason: str | None = None
    error: Exception | None = None  # why it was rejected or failed, if it was
    scrub_cache: bool = False  # its KV row may hold non-finite values: zero it on release
    text: str = ""  # generated text so far (stop strings cut)
    emitted_chars: int = 0  # text already handed out
    generator: Any = None  # random stream of a sampled request (made by the runner at its first draw)
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

    @property
    def remaining_prompt(self) -> int:
        """Prompt tokens not yet in the KV cache."""
        return len(self.prompt_ids) - self.num_computed_tokens

    def next_input(self) -> list[int]:
        """Tokens to feed this step: the scheduled chunk of the prompt (the rest of it when
        no chunk was scheduled), then the last generated token."""
        if self.prefilled:
            return [self.output_ids[-1]]
        start = self.num_computed_tokens
        end = start + self.num_scheduled_tokens if self.num_scheduled_tokens else len(self.prompt_ids)
        return self.prompt_ids[start:end]

    def next_position(self) -> int:
        """Cache position of the first token next_input() feeds."""
        return self.num_tokens - 1 if self.prefilled else self.num_computed_tokens

    @property
    def samples_this_step(self) -> bool:
        """Whether this step's forward yields a token for it: a decode, or the prompt chunk
        that completes the prompt (an earlier chunk only fills the KV cache)."""
        return self.prefilled or self.num_computed_tokens + len(self.next_input()) >= len(self.prompt_ids)

    def finish_chunk(self) -> bool:
        """Record that this step's prompt chunk is in the cache; True when that completed
        the prompt (the step's sampled token is then the first generated token; for an
        earlier chunk it is discarded)."""
        self.num_computed_tokens += len(self.next_input())
        self.num_scheduled_tokens = 0
        return self.num_computed_tokens >= len(self.prompt_ids)
