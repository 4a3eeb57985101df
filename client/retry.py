"""How the clients ride out a server or replica that goes away: calls that end with
UNAVAILABLE are tried again, with exponential backoff and jitter. No torch here.

Only calls that change nothing are retried: Generate, ListAdapters, and GenerateStream
until its first message (after that the caller has partial output, and a retry would
repeat it). Register/Unregister are not: they may have landed. This loop, not gRPC's own
retry policy, does it because a proxy in between (Ray Serve's) answers errors with an
empty message before the status, which commits a call as far as gRPC's policy goes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # in all; 1 = no retry
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    multiplier: float = 2.0
    on_retry: Callable[[grpc.RpcError, int], None] | None = None  # (error, retry number) before each wait

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based): full jitter."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry))

    def _again(self, error: grpc.RpcError, attempt: int) -> bool:
        again = attempt + 1 < self.attempts and error.code() in RETRYABLE
        if again and self.on_retry is not None:
            self.on_retry(error, attempt)
        return again

    def call(self, invoke: Callable[[], object]):
        for attempt in range(self.attempts):
            try:
                return invoke()
            except grpc.RpcError as error:
                if not self._again(error, attempt):
                    raise
            time.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    async def call_async(self, invoke: Callable[[], object]):
        for attempt in range(self.attempts):
            try:
                return await invoke()
            except grpc.RpcError as error:
                if not self._again(error, attempt):
                    raise
            await asyncio.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    async def stream_async(self, invoke: Callable[[], AsyncIterator]) -> AsyncIterator:
        for attempt in range(self.attempts):
            started = False
            try:
                async for item in invoke():
                    started = True
                    yield item
                return
            except grpc.RpcError as error:
                if started or not self._again(error, attempt):
                    raise
            await asyncio.sleep(self.backoff(attempt))


class RetryingStream:
    """Iterates a server-streaming call, starting it again on UNAVAILABLE until its first
    message; `cancel()` and the call's other methods reach the call in progress."""

    def __init__(self, policy: RetryPolicy, invoke: Callable[[], Iterator]):
        self._policy, self._invoke = policy, invoke
        self._call = invoke()
        self._attempt, self._started, self._cancelled = 0, False, False

    def __iter__(self) -> RetryingStream:
        return self

    def __next__(self):
        while True:
            try:
                item = next(self._call)
            except grpc.RpcError as error:
                if self._cancelled or self._started or not self._policy._again(error, self._attempt):
                    raise
                time.sleep(self._policy.backoff(self._attempt))
                self._attempt += 1
                self._call = self._invoke()
                continue
            self._started = True
            return item

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def __getattr__(self, name: str):  # code(), details(), is_active(), ...
        return getattr(self._call, name)
