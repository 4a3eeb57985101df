"""One request's running state inside the engine (no torch).

A sequence is its tokens (prompt, then generated) and how many of them have their KV in
the cache (`num_computed_tokens`). Every step feeds it the next chunk of the tokens not yet
computed: a prompt chunk, the whole prompt and generated tokens again after a preemption
(recomputation), or, once only the last token is left, that one token (a decode). The step
whose chunk reaches the last token samples the next one.

A request asking for prompt log probabilities also gets, from each prompt chunk, the
logits of its positions: position p scores prompt token p + 1. `prompt_logprobs` grows in
position order and is never recomputed: after a preemption the recomputed chunks score
only the positions past it, and at admission the prefix cache may serve only positions
already scored (`max_cached_tokens`), so no entry is lost or doubled.

A request sampling several choices (n > 1, best_of) starts as one sequence, choice 0,
holding the others unstarted in `forks`: it prefills every prompt token but the last
(`fork_at`) alone; then the scheduler forks it (the others get copies of its block table,
sharing its full blocks) and each feeds the last prompt token itself, so each draws its
first token with its own random stream. Until then it counts as `width` sequences of the
batch.
"""

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
    token_ids: list[int] = field(default_factory=list)  # prompt_ids + output_ids (set in __post_init__)
    block_table: Any = None  # the block manager's BlockTable while admitted
    adapter_key: str = ""  # what its KV depends on besides the tokens: its adapters' content hashes
    adapters: tuple[tuple[str, float], ...] = ()  # (name, weight) it runs on: its request's, or a merge's derived one
    lora_start: int = 0  # positions before it run on the base model (an aLoRA adapter's invocation; alora.py)
    adapter_slots: list[tuple[int, float]] = field(default_factory=list)  # pinned (slot, weight)
    adapter_lease: Any = None  # the registry's Lease behind adapter_slots
    adapter_hold: Any = None  # while waiting: the registry's HostHold (its adapters are being read)
    num_computed_tokens: int = 0  # leading tokens whose KV is in the cache
    num_scheduled_tokens: int = 0  # tokens of this step's chunk (set by the scheduler)
    num_cached_tokens: int = 0  # leading prompt tokens found in the prefix cache at the last admission
    output_logprobs: list = field(default_factory=list)  # TokenLogprob per output token, when asked for
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob of prompt tokens 1, 2, ... scored so far
    preemptions: int = 0  # times its blocks were taken back and its tokens recomputed
    finish_reason: str | None = None
    error: Exception | None = None  # why it was rejected or failed, if it was
    scrub_cache: bool = False  # its KV blocks may hold non-finite values: zero them on release
    detokenizer: Any = None  # the postprocessor's IncrementalDetokenizer (made at the first token)
    generator: Any = None  # random stream of a sampled request (made by the runner at its first draw)
    matcher: Any = None  # a constrained request's structured_output.RowMatcher (has accepted output_ids)
    index: int = 0  # which choice of its request it samples (n > 1)
    group: Any = None  # the choices.ChoiceGroup of a request sampling several choices
    forks: list = field(default_factory=list)  # the other choices' sequences, until they fork from this one
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = [*self.prompt_ids, *self.output_ids]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def width(self) -> int:
        """Rows of the batch it stands for: itself and the choices still to fork from it."""
        return 1 + len(self.forks)

    @property
    def seed(self) -> int | None:
        """Its random stream's seed: the request's, offset by the choice index (so choices
        differ, and a seeded request's choices repeat)."""
        seed = self.request.sampling.seed
        return None if seed is None else (seed + self.index) % 2**64

    @property
    def fork_at(self) -> int | None:
        """Computed tokens after which it forks (every prompt token but the last), or None
        when nothing forks from it."""
        return len(self.prompt_ids) - 1 if self.forks else None

    @property
    def schedulable_tokens(self) -> int:
        """Tokens the next chunks may feed: up to the fork point while it has forks to make,
        else every remaining one."""
        end = self.fork_at if self.forks else self.num_tokens
        return end - self.num_computed_tokens

    @property
    def remaining_tokens(self) -> int:
        """Tokens not yet in the KV cache (at least 1 while it runs)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def prefilled(self) -> bool:
        """Decoding: a token was generated and every token before the last is in the cache."""
        return bool(self.output_ids) and self.remaining_tokens == 1

    def append_token(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)

    def next_input(self) -> list[int]:
        """Tokens to feed this step: the scheduled chunk (all remaining tokens when none was
        scheduled)."""
        start = self.num_computed_tokens
        end = start + (self.num_scheduled_tokens or self.remaining_tokens)
        return self.token_ids[start:end]

    def base_rows(self, start: int, count: int) -> int:
        """Of `count` positions from `start`, how many lead before lora_start (run on the base)."""
        return max(0, min(count, self.lora_start - start))

    def next_position(self) -> int:
        """Cache position of the first token next_input() feeds."""
        return self.num_computed_tokens

    @property
    def samples_this_step(self) -> bool:
        """Whether this step's forward yields a token for it: its chunk reaches the last
        token (an earlier chunk only fills the KV cache), and it generates at all."""
        return (self.num_computed_tokens + len(self.next_input()) >= self.num_tokens
                and self.request.sampling.max_new_tokens > 0)

    @property
    def max_cached_tokens(self) -> int | None:
        """Leading positions the prefix cache may serve at admission (None: any): a request
        scoring its prompt may skip only the positions it has scored already."""
        scored = len(self.prompt_logprobs)
        if self.request.sampling.prompt_logprobs is None or scored >= len(self.prompt_ids) - 1:
            return None
        return scored

    def scored_positions(self) -> range:
        """Positions of this step's chunk whose logits score a prompt token (the next one):
        those not scored yet, before the last prompt token (whose logits sample)."""
        if self.request.sampling.prompt_logprobs is None:
            return range(0)
        start = max(self.num_computed_tokens, len(self.prompt_logprobs))
        end = min(self.num_computed_tokens + len(self.next_input()), len(self.prompt_ids) - 1)
        return range(start, max(start, end))

    def finish_chunk(self) -> bool:
        """Record that this step's chunk is in the cache; True when that reached the last
        token (the step's sampled token is then the next generated token; for an earlier
        chunk it is discarded)."""
        self.num_computed_tokens += len(self.next_input())
        self.num_scheduled_tokens = 0
        return self.num_computed_tokens >= self.num_tokens

    def reset_for_recompute(self) -> None:
        """Preempted: no KV left; every token is fed again when it is readmitted."""
        self.num_computed_tokens = self.num_scheduled_tokens = 0
        self.block_table = None
        self.preemptions += 1
