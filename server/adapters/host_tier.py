"""The host tier: validated adapters kept in host memory (LRU, `max_cpu_adapters`), the
holds of requests waiting for reads from disk, and those reads on the loader thread.

A request whose adapter is only on disk gets a HostHold: its adapters are held in host
memory (not evicted) until the request is admitted, fails or goes away, so a request on
more adapters than the tier holds still gets all of them in at once. Holds are granted to
at most `max_held` adapters together (half the tier; any number when no other hold exists,
so the first request in line always makes progress), which bounds the memory they keep
and the reads queued ahead.

Runs under the registry's lock (every method but the loader thread's assumes the caller
holds it); files are read without it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraquilt.server.adapters.loader import HostHold, Loader, PendingRead
from loraquilt.server.adapters.peft_folder import AdapterError, LoadedAdapter

if TYPE_CHECKING:
    from loraquilt.server.adapters.record import AdapterRecord

TIER_HOST = "host"


class AdapterChanged(AdapterError):
    """A registered adapter's files were deleted or rewritten after registration."""


class HostTier:
    def __init__(self, max_cpu_adapters: int, lock: threading.RLock, read: Callable[[Path], LoadedAdapter],
                 fingerprint: Callable[[Path], tuple | None], on_evict: Callable[[str], None],
                 on_loaded: Callable[[], None], build: Callable[[AdapterRecord], LoadedAdapter] | None = None):
        """read: validate a folder into a LoadedAdapter (no lock held); fingerprint: the
        files' identity; on_loaded: after each read from disk finished or failed, outside
        the lock (the engine wakes up to admit what waited); build: makes a derived
        adapter's weights (a record with `derived` set: no files of its own), no lock held."""
        if max_cpu_adapters < 1:
            raise ValueError(f"max_cpu_adapters must be >= 1, got {max_cpu_adapters}")
        self.max_cpu_adapters = max_cpu_adapters
        self.max_held = max(1, max_cpu_adapters // 2)  # adapters HostHolds keep on host together
        self._lock, self._read, self._fingerprint, self._build = lock, read, fingerprint, build
        self._on_evict, self.on_loaded = on_evict, on_loaded
        self._lru: OrderedDict[str, AdapterRecord] = OrderedDict()  # registered names only
        self._held = 0  # records with holds > 0
        self._loader = Loader()
        # derived adapters build on a thread of their own: a read from disk never waits
        # seconds behind a merge's build
        self._builder = Loader("loraquilt-adapter-builder")

    # -- residency ------------------------------------------------------------------------

    def keep(self, record: AdapterRecord, adapter: LoadedAdapter) -> None:
        record.host = adapter
        self._lru[record.name] = record
        self._lru.move_to_end(record.name)
        self._trim()

    def touch(self, record: AdapterRecord) -> None:
        """The record was used (copied to the device): most recently used."""
        if record.name in self._lru:
            self._lru.move_to_end(record.name)

    def drop(self, record: AdapterRecord) -> None:
        self._lru.pop(record.name, None)
        record.host = None

    def bytes_in(self, dtype: torch.dtype) -> int:
        return sum(record.host.nbytes_in(dtype) for record in self._lru.values() if record.host)

    def _trim(self) -> None:
        """Evict least recently used host copies down to max_cpu_adapters, skipping held
        ones (a tier full of held adapters stays over its bound until their holds go)."""
        excess = len(self._lru) - self.max_cpu_adapters
        if excess <= 0:
            return
        victims = [name for name, record in self._lru.items() if not record.holds][:excess]
        for victim in victims:
            self._lru.pop(victim).host = None
            self._on_evict(TIER_HOST)

    # -- holds ---------------------------------------------------------------------------------

    def hold(self, hold: HostHold, records: list[AdapterRecord]) -> None:
        """Hold these records for the request, if there is room (else hold nothing yet)."""
        if len(hold.records) == len(records) and all(a is b for a, b in zip(hold.records, records)):
            return
        self.release(hold)
        new = sum(1 for r in records if not r.holds)
        if self._held and self._held + new > self.max_held:
            return
        for record in records:
            record.holds += 1
        self._held += new
        hold.records = tuple(records)

    def release(self, hold: HostHold | None) -> None:
        if hold is None or not hold.records:
            return
        for record in hold.records:
            record.holds -= 1
            if record.holds == 0:
                self._held -= 1
        hold.records = ()
        self._trim()

    # -- reads on the loader thread ----------------------------------------------------------

    def start_read(self, record: AdapterRecord) -> PendingRead:
        """The read of the record's files in flight (queued now unless one already is)."""
        if record.loading is None:
            record.loading = PendingRead(record)
            worker = self._builder if record.derived is not None else self._loader
            worker.submit(lambda load=record.loading: self._run_read(load))
        return record.loading

    def _run_read(self, load: PendingRead) -> None:
        """On the loader thread: read and check the files (a derived adapter: build its
        weights), then keep them on host."""
        record, adapter = load.record, None
        try:
            adapter = self._build(record) if record.derived is not None else self.read_unchanged(record)
        except BaseException as error:  # noqa: BLE001 - delivered to the requests waiting on it
            adapter, load.error = None, error
        with self._lock:
            record.loading = None
            if adapter is not None and not record.retired and record.host is None:
                self.keep(record, adapter)  # an unregistered one is dropped here
            load.done.set()
        self.on_loaded()

    def read_unchanged(self, record: AdapterRecord) -> LoadedAdapter:
        """The record's files, which must still be the ones registered (AdapterChanged);
        no lock held."""
        changed = AdapterChanged(f"the files of adapter {record.name!r} were deleted or rewritten since "
                                 "it was registered; unregister and register it again")
        if self._fingerprint(record.path) != record.fingerprint:
            raise changed
        adapter = self._read(record.path)
        if self._fingerprint(record.path) != record.fingerprint:
            raise changed
        return adapter
