"""Registered adapters and their tiers: disk -> host memory (LRU) -> device slots (LRU).

A running request pins the device slots it uses; a pinned slot is never evicted or
reused. Unregistering an adapter that is pinned hides it from new requests at once and
frees its slot when the last request on it finishes.

No file is read by `acquire` (the engine calls it inside a step, under its lock): it pins
only adapters already in host memory or on the device. For an adapter that is only on
disk it returns a HostHold and queues a read on the loader thread (`loader.Loader`), which
validates the files into the host tier; the caller asks again, with the same hold, after
`on_loaded` fired. Until the hold is released (the request is admitted, fails or goes
away) its adapters stay in host memory, so a request on more adapters than the host tier
holds still gets all of them in at once. Holds are granted to at most `max_held` adapters
together (half the host tier; any number when no other hold exists, so the first request
in line always makes progress), which bounds the host memory they keep and the reads
queued ahead.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraquilt.server.adapters.loader import HostHold, Loader, PendingRead
from loraquilt.server.adapters.peft_folder import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoadedAdapter, load_peft_adapter,
)
from loraquilt.server.adapters.slots import LoraSlots
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.torch_threads import one_thread_off_main
from loraquilt.server.model.config import ModelConfig

TIER_DISK, TIER_HOST, TIER_DEVICE = "disk", "host", "device"


class UnknownAdapter(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not registered"


class AdapterExists(ValueError):
    pass


class AdapterChanged(AdapterError):
    """A registered adapter's files were deleted or rewritten after registration."""


class TooManyAdapters(RuntimeError):
    """The registry holds --max-adapters names already."""


@dataclass
class AdapterRecord:
    name: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    fingerprint: tuple | None = field(default=None, repr=False)  # the files as registered
    content_hash: str = ""  # of the weights as registered (the prefix cache's adapter identity)
    host: LoadedAdapter | None = field(default=None, repr=False)
    slot: int | None = None
    pins: int = 0
    holds: int = 0  # waiting requests' HostHolds on it: its host copy is not evicted
    loading: PendingRead | None = field(default=None, repr=False)  # the read in flight on the loader thread
    retired: bool = False  # unregistered (while pinned: its slot frees at the last release)
    created: int = field(default_factory=lambda: int(time.time()))  # registration time (Unix seconds)

    @property
    def tier(self) -> str:
        if self.slot is not None:
            return TIER_DEVICE
        return TIER_HOST if self.host is not None else TIER_DISK


@dataclass
class RegistryEvents:
    """Callbacks for metrics: load seconds, evictions."""

    on_load: Callable[[float], None] = lambda seconds: None
    on_evict: Callable[[str], None] = lambda tier: None


@dataclass(frozen=True)
class Lease:
    """Device slots pinned for one request, in the order its adapters were named."""

    slots: tuple[int, ...]
    records: tuple[AdapterRecord, ...]


class AdapterRegistry:
    def __init__(self, model: ModelConfig, slots: LoraSlots, *, max_cpu_adapters: int,
                 max_adapters: int = EngineConfig.max_adapters, events: RegistryEvents | None = None,
                 on_loaded: Callable[[], None] = lambda: None):
        """on_loaded: called on the loader thread after each read from disk finished (or
        failed), outside the registry lock: the engine wakes up to admit what waited."""
        if max_cpu_adapters < 1 or max_adapters < 1:
            raise ValueError(f"max_cpu_adapters and max_adapters must be >= 1, got "
                             f"{max_cpu_adapters} and {max_adapters}")
        self.model, self.slots = model, slots
        self.max_cpu_adapters, self.max_adapters = max_cpu_adapters, max_adapters
        self.max_held = max(1, max_cpu_adapters // 2)  # adapters HostHolds keep on host together
        self.events = events or RegistryEvents()
        self.on_loaded = on_loaded
        # One lock over all the state below (records, both LRUs, slot owners, pins, holds,
        # reads in flight); reentrant. Files are read without it: register() and the
        # loader thread read first, then install under it.
        self._lock = threading.RLock()
        self._records: dict[str, AdapterRecord] = {}  # registered names only
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        self._slot_owner: list[AdapterRecord | None] = [None] * slots.config.num_slots
        self._device_lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots
        self._held = 0  # records with holds > 0
        self._loader = Loader()

    # -- registration -------------------------------------------------------------------

    def register(self, name: str, path: Path | str) -> AdapterRecord:
        """Load and validate now (errors surface here, not at first use); keep it on host.

        The files' identity (inode, size, mtime) is remembered: if they are deleted or
        rewritten later, reading them back fails with AdapterChanged rather than serving
        different weights under the same name."""
        with self._lock:
            self._check_room(name)
        record, adapter = self._inspect(name, Path(path))
        with self._lock:
            self._check_room(name)
            self._records[name] = record
            self._keep_on_host(record, adapter)
            return record

    def inspect(self, name: str, path: Path | str) -> AdapterRecord:
        """The record register() would make, validated the same way, without registering
        or keeping anything (one replica of a scaled-out server checks a folder for all)."""
        return self._inspect(name, Path(path))[0]

    def _inspect(self, name: str, path: Path) -> tuple[AdapterRecord, LoadedAdapter]:
        before = file_fingerprint(path)
        adapter = self._read(path)
        if file_fingerprint(path) != before:
            raise AdapterError(f"the files under {path} changed while they were being read; retry")
        record = AdapterRecord(name=name, path=path, rank=adapter.rank, target_modules=adapter.target_modules,
                               size_bytes=adapter.size_bytes, fingerprint=before,
                               content_hash=adapter.content_hash)
        return record, adapter

    def _check_room(self, name: str) -> None:
        if name in self._records:
            raise AdapterExists(f"adapter {name!r} is already registered")
        if len(self._records) >= self.max_adapters:
            raise TooManyAdapters(f"this server holds its limit of {self.max_adapters} registered adapters "
                                  "(--max-adapters); unregister one first")

    def unregister(self, name: str) -> None:
        """Forget the name now; a slot still pinned by running requests is freed (and
        zeroed) when the last of them releases it."""
        with self._lock:
            record = self._get(name)
            del self._records[name]
            record.retired = True
            self._drop_host(record)
            if record.pins == 0:
                self._free_slot(record)

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            return self._get(name)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return list(self._records.values())

    def _get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise UnknownAdapter(name)
        return record

    # -- residency ----------------------------------------------------------------------

    def acquire(self, names: list[str], hold: HostHold | None = None) -> Lease | HostHold | None:
        """Pin device slots for every named adapter, from host memory or the device only.

        Returns a Lease; None when not enough slots can be freed now (the rest are pinned
        by running requests; nothing is pinned, a hold passed in stays held); or a HostHold
        when an adapter is only on disk: its read is queued on the loader thread, nothing
        is read here, and the caller tries again with that hold after on_loaded fired.
        Raises UnknownAdapter for a name not registered (also one unregistered while its
        read was in flight), AdapterError / AdapterChanged when a read started for this
        hold failed (its files are gone, rewritten or broken). On a Lease or an error the
        hold passed in is released; nothing stays pinned after an error."""
        with self._lock:
            try:
                records = [self._get(name) for name in names]
                if len({id(r) for r in records}) != len(records):
                    raise ValueError(f"adapter named twice in {names}")
                for load in hold.loads if hold is not None else ():
                    if load.error is not None and any(load.record is r for r in records):
                        raise load.error
                missing = [r for r in records if r.slot is None and r.host is None]
                if missing:
                    hold = hold or HostHold()
                    self._hold(hold, records)
                    if hold.records:  # granted: read what is missing (once per adapter)
                        for record in missing:
                            if not any(load.record is record and not load.done.is_set() for load in hold.loads):
                                hold.loads.append(self._start_load(record))
                    return hold
                lease = self._pin(records)
            except BaseException:
                self._release_hold(hold)
                raise
            if lease is not None:
                self._release_hold(hold)
            return lease

    def release_hold(self, hold: HostHold | None) -> None:
        """Give up a HostHold (its request went away before admission); a read in flight
        still lands in the host tier."""
        with self._lock:
            self._release_hold(hold)

    def _pin(self, records: list[AdapterRecord]) -> Lease | None:
        pinned = [r for r in records if r.slot is not None]
        for record in pinned:  # residents first, so loading the others cannot evict them
            self._device_lru.pop(record.slot, None)
            record.pins += 1
        missing = [r for r in records if r.slot is None]
        if len(missing) > self._slot_owner.count(None) + len(self._device_lru):
            self._unpin(pinned)
            return None
        try:
            for record in missing:
                self._bring_to_device(record)
                record.pins += 1
                pinned.append(record)
        except BaseException:
            self._unpin(pinned)
            raise
        return Lease(slots=tuple(r.slot for r in records), records=tuple(records))

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._unpin(list(lease.records))

    def _unpin(self, records: list[AdapterRecord]) -> None:
        for record in records:
            record.pins -= 1
            if record.pins == 0:
                if record.retired:
                    self._free_slot(record)
                elif record.slot is not None:
                    self._device_lru[record.slot] = None

    def _bring_to_device(self, record: AdapterRecord) -> None:
        """Copy a host-resident adapter into a slot (a free one, else the LRU unpinned one)."""
        self._host_lru.move_to_end(record.name)
        slot = self._slot_owner.index(None) if None in self._slot_owner else self._evict_device()
        self.slots.load(slot, record.host)
        self._slot_owner[slot] = record
        record.slot = slot

    def _evict_device(self) -> int:
        slot, _ = self._device_lru.popitem(last=False)
        owner = self._slot_owner[slot]
        owner.slot = None
        self._slot_owner[slot] = None
        self.events.on_evict(TIER_DEVICE)
        return slot

    def _free_slot(self, record: AdapterRecord) -> None:
        if record.slot is not None:
            self._device_lru.pop(record.slot, None)
            self.slots.clear(record.slot)
            self._slot_owner[record.slot] = None
            record.slot = None

    def _read(self, path: Path) -> LoadedAdapter:
        one_thread_off_main()  # an RPC worker or the loader thread: no OpenMP team of its own
        start = time.perf_counter()
        adapter = load_peft_adapter(path, self.model, max_rank=self.slots.config.max_rank,
                                    dtype=self.slots.dtype)
        self.events.on_load(time.perf_counter() - start)
        return adapter

    def _keep_on_host(self, record: AdapterRecord, adapter: LoadedAdapter) -> None:
        record.host = adapter
        self._host_lru[record.name] = None
        self._host_lru.move_to_end(record.name)
        self._trim_host()

    def _trim_host(self) -> None:
        """Evict least recently used host copies down to max_cpu_adapters, skipping held
        ones (a tier full of held adapters stays over its bound until their holds go)."""
        excess = len(self._host_lru) - self.max_cpu_adapters
        if excess <= 0:
            return
        victims = [name for name in self._host_lru if not self._records[name].holds][:excess]
        for victim in victims:  # names in the host LRU are registered (unregister drops them)
            del self._host_lru[victim]
            self._records[victim].host = None
            self.events.on_evict(TIER_HOST)

    def _drop_host(self, record: AdapterRecord) -> None:
        self._host_lru.pop(record.name, None)
        record.host = None

    # -- holds and the loader thread ----------------------------------------------------

    def _hold(self, hold: HostHold, records: list[AdapterRecord]) -> None:
        """Hold these records for the request, if there is room (else hold nothing yet)."""
        if len(hold.records) == len(records) and all(a is b for a, b in zip(hold.records, records)):
            return
        self._release_hold(hold)
        new = sum(1 for r in records if not r.holds)
        if self._held and self._held + new > self.max_held:
            return
        for record in records:
            record.holds += 1
        self._held += new
        hold.records = tuple(records)

    def _release_hold(self, hold: HostHold | None) -> None:
        if hold is None or not hold.records:
            return
        for record in hold.records:
            record.holds -= 1
            if record.holds == 0:
                self._held -= 1
        hold.records = ()
        self._trim_host()

    def _start_load(self, record: AdapterRecord) -> PendingRead:
        if record.loading is None:
            record.loading = PendingRead(record)
            self._loader.submit(lambda load=record.loading: self._run_load(load))
        return record.loading

    def _run_load(self, load: PendingRead) -> None:
        """On the loader thread: read and check the files, then install them on host."""
        record, adapter = load.record, None
        try:
            changed = AdapterChanged(f"the files of adapter {record.name!r} were deleted or rewritten since "
                                     "it was registered; unregister and register it again")
            if file_fingerprint(record.path) != record.fingerprint:
                raise changed
            adapter = self._read(record.path)
            if file_fingerprint(record.path) != record.fingerprint:
                raise changed
        except BaseException as error:  # noqa: BLE001 - delivered to the requests waiting on it
            adapter, load.error = None, error
        with self._lock:
            record.loading = None
            if adapter is not None and not record.retired and record.host is None:
                self._keep_on_host(record, adapter)  # an unregistered one is dropped here
            load.done.set()
        self.on_loaded()

    def loads_in_flight(self) -> int:
        """Reads queued or running on the loader thread."""
        with self._lock:
            return sum(record.loading is not None for record in self._records.values())

    # -- accounting ---------------------------------------------------------------------

    def tier_counts(self) -> dict[str, int]:
        with self._lock:
            counts = {TIER_DISK: 0, TIER_HOST: 0, TIER_DEVICE: 0}
            for record in self._records.values():
                counts[record.tier] += 1
            return counts

    def slots_in_use(self) -> int:
        """Device slots holding an adapter: resident registered ones, plus unregistered
        ones still pinned by running requests (their slots free at the last release)."""
        with self._lock:
            return sum(owner is not None for owner in self._slot_owner)

    def host_bytes(self) -> int:
        with self._lock:
            return sum(r.host.nbytes_in(self.slots.dtype) for r in self._records.values() if r.host)


def file_fingerprint(folder: Path) -> tuple | None:
    """(inode, size, mtime) of an adapter folder's two files; None when either is missing."""
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                     for st in ((folder / CONFIG_FILE).stat(), (folder / WEIGHTS_FILE).stat()))
    except OSError:
        return None
