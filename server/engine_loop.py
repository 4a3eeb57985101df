"""Runs engine steps on a background thread and routes each step's outputs to the
request that waits for them (one queue per request), recording metrics on the way."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from loraquilt.server.engine import Engine
from loraquilt.server.metrics import Metrics, request_kind
from loraquilt.server.request import Request, StepOutput


class ShuttingDown(RuntimeError):
    pass


@dataclass
class _Tracked:
    request: Request
    stream: bool  # False: only the final output is delivered (one wake-up per request)
    outputs: queue.Queue | _AsyncioQueue = field(default_factory=queue.Queue)
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    adapter_tokens: list | None = None  # its per-adapter token counters, found at its first token


class _AsyncioQueue:
    """put() from the engine thread, get() awaited on the asyncio loop that made it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self):
        return await self._queue.get()


class RequestHandle:
    """What a caller holds for one request: a blocking iterator of its StepOutputs."""

    def __init__(self, loop: EngineLoop, tracked: _Tracked):
        self._loop, self._tracked = loop, tracked

    @property
    def request_id(self) -> str:
        return self._tracked.request.request_id

    @property
    def request(self) -> Request:
        return self._tracked.request

    def outputs(self, timeout: float | None = None):
        """Yield StepOutputs until the one carrying the result (or an error)."""
        while True:
            output: StepOutput = self._tracked.outputs.get(timeout=timeout)
            yield output
            if output.finished is not None or output.error is not None:
                return

    def cancel(self) -> None:
        self._loop.cancel(self.request_id)


class AsyncRequestHandle(RequestHandle):
    """The same for a caller on an asyncio loop: `async for output in handle.outputs()`."""

    async def outputs(self):  # type: ignore[override]
        while True:
            output: StepOutput = await self._tracked.outputs.get()
            yield output
            if output.finished is not None or output.error is not None:
                return


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine, self.metrics = engine, metrics
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="loraquilt-engine", daemon=True)

    def start(self) -> EngineLoop:
        """Run the loop on a background thread."""
        self._thread.start()
        return self

    def run_here(self) -> None:
        """Run the loop on the calling thread until stop() (the `serve` process gives it
        the main thread: torch's OpenMP pool was built there, and steps ran measurably
        slower from a second thread on this CPU)."""
        self._run()

    def submit(self, request: Request, stream: bool = True) -> RequestHandle:
        """Queue a request; raises what Engine.add_request raises, or ShuttingDown.

        stream=False delivers only the final output: the waiting thread wakes once, not
        at every step (on a 2-core machine, every wake-up competes with the forward)."""
        return RequestHandle(self, self._track(_Tracked(request, stream)))

    def submit_async(self, request: Request, stream: bool = True) -> AsyncRequestHandle:
        """submit() for a coroutine: outputs are awaited on the calling asyncio loop."""
        return AsyncRequestHandle(self, self._track(_Tracked(request, stream, outputs=_AsyncioQueue())))

    def _track(self, tracked: _Tracked) -> _Tracked:
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        request = tracked.request
        with self._lock:
            self._tracked[request.request_id] = tracked
        try:
            self.engine.add_request(request)
        except BaseException:
            with self._lock:
                self._tracked.pop(request.request_id, None)
            raise
        self._wake.set()
        return tracked

    def cancel(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def alive(self) -> bool:
        """False once the loop's background thread has stopped (or never started)."""
        return self._thread.is_alive()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._tracked)

    def stop_accepting(self) -> None:
        self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Wait until every accepted request has finished; True if they all did."""
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.in_flight() == 0

    def stop(self, timeout: float = 5.0) -> None:
        self._accepting = False
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self.engine.threads.tune()  # idle too: the next step starts from a fresh CPU estimate
                continue
            for output in self.engine.step():
                self._dispatch(output)

    def _dispatch(self, output: StepOutput) -> None:
        with self._lock:
            tracked = self._tracked.get(output.request_id)
            if tracked is not None and (output.finished is not None or output.error is not None):
                del self._tracked[output.request_id]
        if tracked is None:
            return
        if self.metrics is not None:
            self._observe(tracked, output)
        if tracked.stream or output.finished is not None or output.error is not None:
            tracked.outputs.put(output)

    def _observe(self, tracked: _Tracked, output: StepOutput) -> None:
        metrics, kind = self.metrics, request_kind(tracked.request.adapter_weights)
        now = time.monotonic()
        if output.new_token_ids:
            metrics.generated_tokens.inc(len(output.new_token_ids))
            if tracked.adapter_tokens is None:
                tracked.adapter_tokens = metrics.adapter_token_counters(tracked.request.adapter_weights)
            for counter in tracked.adapter_tokens:
                counter.inc(len(output.new_token_ids))
            if tracked.last_token is None:
                metrics.ttft.labels(kind=kind).observe(now - tracked.arrival)
            else:
                metrics.inter_token.labels(kind=kind).observe(now - tracked.last_token)
            tracked.last_token = now
        if output.finished is not None:  # request outcomes are counted by the service
            result = output.finished
            metrics.prompt_tokens.inc(result.prompt_tokens)
            metrics.latency.labels(kind=kind).observe(now - tracked.arrival)
            metrics.queue_time.observe(result.queue_seconds)
