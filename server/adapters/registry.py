"""Registered adapters: names, their records (files, content hashes) and their tiers,
disk -> host memory (host_tier.py, LRU) -> device slots (device_tier.py, LRU). The registry
owns the names and the one lock the tiers run under; `acquire` asks both tiers and returns
one tagged result (`Acquired`).

A running request pins the device slots it uses; unregistering an adapter that is pinned
hides it from new requests at once and frees its slot when the last request on it finishes.

No file is read by `acquire` (the engine calls it inside a step, under its lock): it pins
only adapters already in host memory or on the device. For an adapter that is only on
disk it returns a HostHold and queues a read on the loader thread, which validates the
files into the host tier; the caller asks again, with the same hold, after `on_loaded`
fired.

A non-linear merge of registered adapters is a derived adapter (derived.py): a record
made at first use, under a name no caller can give, whose weights the loader thread
builds where it would read files; it counts against neither --max-adapters nor the
listing of registrations, and goes when one of its members is unregistered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.adapters.derived import DERIVED_PREFIX, build_derived, derived_record
from loraquilt.server.adapters.device_tier import TIER_DEVICE, DeviceTier
from loraquilt.server.adapters.dora import with_dora_scales
from loraquilt.server.adapters.host_tier import TIER_HOST, AdapterChanged, HostTier
from loraquilt.server.adapters.loader import HostHold
from loraquilt.server.adapters.peft_folder import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoadedAdapter, load_peft_adapter,
)
from loraquilt.server.adapters.mix_rules import check_served_alone
from loraquilt.server.adapters.record import TIER_DISK, AdapterRecord
from loraquilt.server.adapters.slots import LoraSlots
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.torch_threads import one_thread_off_main
from loraquilt.server.model.config import ModelConfig

__all__ = ["AdapterChanged", "AdapterExists", "AdapterRecord", "AdapterRegistry", "Acquired", "HostHold", "Lease",
           "RegistryEvents", "TooManyAdapters", "UnknownAdapter", "file_fingerprint"]


class UnknownAdapter(KeyError):
    def __str__(self) -> str:
        name = self.args[0]
        if isinstance(name, str) and name.startswith(DERIVED_PREFIX):  # no caller names one: its merge went
            return f"the merged adapter {name!r} is gone: one of its members was unregistered"
        return f"adapter {name!r} is not registered"


class AdapterExists(ValueError):
    pass


class TooManyAdapters(RuntimeError):
    """The registry holds --max-adapters names already."""


@dataclass
class RegistryEvents:
    """Callbacks for metrics: load seconds, evictions."""

    on_load: Callable[[float], None] = lambda seconds: None
    on_evict: Callable[[str], None] = lambda tier: None
    on_derive: Callable[[float], None] = lambda seconds: None  # a derived adapter's weights were built


@dataclass(frozen=True)
class Lease:
    """Device slots pinned for one request, in the order its adapters were named."""

    slots: tuple[int, ...]
    records: tuple[AdapterRecord, ...]


@dataclass(frozen=True)
class Acquired:
    """What `acquire` got, tagged by `status`:
    LEASED: `lease` holds the pinned slots (admit the request);
    READING: an adapter is only on disk: its read is queued under `hold`; ask again with
      that hold after on_loaded fired;
    NO_ROOM: not enough slots can be freed now (the rest are pinned by running requests);
      nothing is pinned and `hold`, the one passed in, stays held."""

    LEASED, READING, NO_ROOM = "leased", "reading", "no_room"

    status: str
    lease: Lease | None = None
    hold: HostHold | None = None


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
        self.max_adapters = max_adapters
        self.events = events or RegistryEvents()
        # One lock over the records and both tiers (LRUs, slot owners, pins, holds, reads in
        # flight); reentrant. Files are read without it: register() and the loader thread
        # read first, then install under it.
        self._lock = threading.RLock()
        self._records: dict[str, AdapterRecord] = {}  # registered names only
        evicted = lambda tier: self.events.on_evict(tier)  # noqa: E731 - events may be replaced later
        self.host = HostTier(max_cpu_adapters, self._lock, lambda path: self._read(path), file_fingerprint, evicted,
                             on_loaded, build=self._build_derived)
        self.device = DeviceTier(slots, evicted, on_bring_in=self.host.touch)

    @property
    def max_cpu_adapters(self) -> int:
        return self.host.max_cpu_adapters

    @property
    def on_loaded(self) -> Callable[[], None]:
        return self.host.on_loaded

    @on_loaded.setter
    def on_loaded(self, callback: Callable[[], None]) -> None:
        self.host.on_loaded = callback

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
            self.host.keep(record, adapter)
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
                               size_bytes=adapter.size_bytes, dora=adapter.use_dora, heads=adapter.heads is not None,
                               alora=adapter.alora_invocation_tokens, fingerprint=before,
                               content_hash=adapter.content_hash)
        return record, adapter

    def _check_room(self, name: str) -> None:
        if name in self._records:
            raise AdapterExists(f"adapter {name!r} is already registered")
        if sum(1 for record in self._records.values() if record.derived is None) >= self.max_adapters:
            raise TooManyAdapters(f"this server holds its limit of {self.max_adapters} registered adapters "
                                  "(--max-adapters); unregister one first")

    def unregister(self, name: str) -> None:
        """Forget the name now; a slot still pinned by running requests is freed (and
        zeroed) when the last of them releases it."""
        with self._lock:
            record = self._get(name)
            if record.derived is not None:
                raise UnknownAdapter(name)  # a merge's adapter goes with its members, not by name
            for other in [r for r in self._records.values() if r.derived is not None and r.derived.involves(record)]:
                self._retire(other)
            self._retire(record)

    def _retire(self, record: AdapterRecord) -> None:
        del self._records[record.name]
        record.retired = True
        self.host.drop(record)
        if record.pins == 0:
            self.device.free(record)

    def derive(self, mix: Sequence[tuple[str, float]], spec) -> AdapterRecord:
        """The derived adapter of a non-linear merge (spec: a merge.MergeSpec that derives)
        of registered adapters with these weights: the one made for the same members'
        contents, weights and parameters before, or a new record whose weights the loader
        builds at its first acquire. Raises UnknownAdapter, or RequestError for a member
        that cannot be merged (DoRA) or a rank over the slots'."""
        with self._lock:
            made = derived_record(tuple(self._get(name) for name, _ in mix), tuple(float(w) for _, w in mix), spec,
                                  self.slots.config.max_rank)
            record = self._records.get(made.name)
            if record is None or record.content_hash != made.content_hash:
                if record is not None:  # 64 bits of the hash alike: the older one goes
                    self._retire(record)
                record = self._records[made.name] = made
                self._trim_derived()
            return record

    def _trim_derived(self) -> None:
        """Keep at most max_cpu_adapters derived records: the oldest ones no request uses
        or waits on go (they are rebuilt if asked for again)."""
        derived = [r for r in self._records.values() if r.derived is not None]
        for record in derived[:max(0, len(derived) - self.max_cpu_adapters)]:
            if not (record.pins or record.holds or record.loading):
                self._retire(record)

    def _build_derived(self, record: AdapterRecord) -> LoadedAdapter:
        """On the loader thread: a derived adapter's weights from its members."""
        one_thread_off_main()
        start = time.perf_counter()
        with self._lock:
            copies = [member.host for member in record.derived.members]
        adapter = build_derived(record.derived, copies, self.host.read_unchanged, max_rank=self.slots.config.max_rank,
                                dtype=self.slots.dtype)
        with self._lock:
            record.size_bytes, record.rank = adapter.size_bytes, adapter.rank
        self.events.on_derive(time.perf_counter() - start)
        return adapter

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            return self._get(name)

    def records(self) -> list[AdapterRecord]:
        """The registered adapters (not the derived ones)."""
        with self._lock:
            return [record for record in self._records.values() if record.derived is None]

    def resident_derived(self) -> list[AdapterRecord]:
        """The derived adapters whose weights are in host memory or a slot."""
        with self._lock:
            return [record for record in self._records.values()
                    if record.derived is not None and record.tier != TIER_DISK]

    def _get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise UnknownAdapter(name)
        return record

    def _read(self, path: Path) -> LoadedAdapter:
        one_thread_off_main()  # an RPC worker or the loader thread: no OpenMP team of its own
        start = time.perf_counter()
        adapter = load_peft_adapter(path, self.model, max_rank=self.slots.config.max_rank,
                                    dtype=self.slots.dtype)
        adapter = with_dora_scales(adapter, self.slots.base, self.model)  # a DoRA adapter's norms, on the base
        self.events.on_load(time.perf_counter() - start)
        return adapter

    # -- residency ----------------------------------------------------------------------

    def check_mix(self, pairs: Sequence[tuple[str, float]]) -> list[AdapterRecord]:
        """What a request's (adapter, weight) pairs must satisfy: every name registered
        (UnknownAdapter), and an adapter served alone (DoRA, own token tables, aLoRA) alone
        at weight 1 (mix_rules.py). Returns their records."""
        with self._lock:
            records = [self._get(name) for name, _ in pairs]
        check_served_alone(records, [weight for _, weight in pairs])
        return records

    def acquire(self, names: list[str], hold: HostHold | None = None) -> Acquired:
        """Pin device slots for every named adapter, from host memory or the device only
        (see Acquired for the three outcomes). Raises UnknownAdapter for a name not
        registered (also one unregistered while its read was in flight), RequestError for
        a mix that includes an adapter served alone (`check_mix`), AdapterError /
        AdapterChanged when a read started for this hold failed (its files are gone,
        rewritten or broken). On a lease or an error the hold passed in is released;
        nothing stays pinned after an error."""
        with self._lock:
            try:
                records = [self._get(name) for name in names]
                if len({id(r) for r in records}) != len(records):
                    raise ValueError(f"adapter named twice in {names}")
                check_served_alone(records)
                for load in hold.loads if hold is not None else ():
                    if load.error is not None and any(load.record is r for r in records):
                        raise load.error
                missing = [r for r in records if r.slot is None and r.host is None]
                if missing:
                    hold = hold or HostHold()
                    self.host.hold(hold, records)
                    if hold.records:  # granted: read what is missing (once per adapter)
                        for record in missing:
                            if not any(load.record is record and not load.done.is_set() for load in hold.loads):
                                hold.loads.append(self.host.start_read(record))
                    return Acquired(Acquired.READING, hold=hold)
                slots = self.device.pin(records)
            except BaseException:
                self.host.release(hold)
                raise
            if slots is None:
                return Acquired(Acquired.NO_ROOM, hold=hold)
            self.host.release(hold)
            return Acquired(Acquired.LEASED, lease=Lease(slots=slots, records=tuple(records)))

    def release_hold(self, hold: HostHold | None) -> None:
        """Give up a HostHold (its request went away before admission); a read in flight
        still lands in the host tier."""
        with self._lock:
            self.host.release(hold)

    def share(self, lease: Lease) -> Lease:
        """Another lease on the same pinned slots (a choice forked from the request that
        holds `lease`); each is released on its own."""
        with self._lock:
            slots = self.device.pin(list(lease.records))
        if slots != lease.slots:  # pinned slots never move
            raise AssertionError(f"shared lease got slots {slots}, the lease holds {lease.slots}")
        return Lease(slots=slots, records=lease.records)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self.device.unpin(list(lease.records))

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
            return self.device.in_use()

    def host_bytes(self) -> int:
        with self._lock:
            shared = self.slots.heads.shared_bytes(r.host.heads for r in self._records.values()
                                                   if r.host is not None and r.host.heads is not None)
            return self.host.bytes_in(self.slots.dtype) - shared  # token tables a CPU slot shares: counted there


def file_fingerprint(folder: Path) -> tuple | None:
    """(inode, size, mtime) of an adapter folder's two files; None when either is missing."""
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                     for st in ((folder / CONFIG_FILE).stat(), (folder / WEIGHTS_FILE).stat()))
    except OSError:
        return None
