"""The adapter loader: one background thread that reads adapters from disk beside the
engine steps, never inside one (the registry decides what to read and installs the result)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraquilt.server.adapters.record import AdapterRecord


@dataclass(eq=False)
class PendingRead:
    """One read of an adapter's files into the host tier, on the loader thread."""

    record: AdapterRecord
    error: BaseException | None = None  # why the read failed (set before `done`)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class HostHold:
    """A waiting request's claim on host memory while the loader reads its adapters
    (AdapterRegistry.acquire hands it out; the registry's lock guards its fields).

    Opaque to the caller: hand it back to acquire() at the next try, or to release_hold()
    if the request goes away before it is admitted."""

    records: tuple[AdapterRecord, ...] = ()  # held now (empty: no room yet, nothing read)
    loads: list[PendingRead] = field(default_factory=list)  # reads started for this request

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every read started for this hold finished; True if they did."""
        return all(load.done.wait(timeout) for load in self.loads)


class Loader:
    """Runs submitted jobs one at a time, in submission order, on one background thread.

    The thread starts at a submit that finds none running and exits once the queue is
    empty, so an idle registry holds no thread. Jobs handle their own errors."""

    def __init__(self, name: str = "loraquilt-adapter-loader"):
        self._name = name
        self._lock = threading.Lock()  # guards _jobs and _thread only; jobs run without it
        self._jobs: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def pending(self) -> int:
        """Jobs queued and not started yet."""
        with self._lock:
            return len(self._jobs)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs.popleft()
            job()
