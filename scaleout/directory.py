"""The registered adapters of a scaled-out server, in one place every replica asks.

Registration is validated once and loaded lazily: RegisterAdapter reaches one replica,
which reads and checks the folder against the base model, then records it here; no
replica loads it until a request needs it. Broadcasting instead would load every adapter
on every replica, the very thrashing that adapter-affinity routing avoids, and would make
a registration depend on every replica being up. Unregister removes the name here: from
then on every replica answers NOT_FOUND for it and drops its copy when Ray Serve's LRU
evicts it. A name registered again gets a new generation, so replicas holding the old
files read the new ones before serving it.

Also kept here: each replica's report (its actor name, metrics endpoint, hit/load counts),
for `serve-ray` to print scrape targets and for `bench scaleout`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from loraquilt.server.engine_config import EngineConfig


@dataclass(frozen=True)
class Registration:
    name: str
    path: str  # resolved, inside the adapter root
    generation: int
    fingerprint: tuple | None  # the files' (inode, size, mtime) when validated
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))  # registration time (Unix seconds)


class AdapterDirectory:
    """Runs as a one-replica Ray Serve deployment; its methods are called through a handle.
    Outcomes are return values, not exceptions, so callers map them to gRPC statuses.

    With a state folder (`serve-ray --state-dir`), every add/remove is written there
    atomically before it returns (server/adapters/state_file.py), and a directory that
    starts takes the recorded registrations back whose files are unchanged (same
    fingerprint, so the same validation outcome); the others are left out and named in
    `restore_report()`."""

    def __init__(self, max_adapters: int = EngineConfig.max_adapters, state_dir: str | None = None):
        self.max_adapters = max_adapters
        self._entries: dict[str, Registration] = {}
        self._generations = itertools.count(1)
        self._replicas: dict[str, dict] = {}
        self._state = None
        self._skipped: list[str] = []
        if state_dir is not None:
            from pathlib import Path

            from loraquilt.server.adapters.registry import file_fingerprint
            from loraquilt.server.adapters.state_file import RegistrationState

            self._state = RegistrationState(Path(state_dir))
            for entry in self._state.load():  # serve-ray read it once before starting: it parses
                if file_fingerprint(Path(entry.path)) != entry.fingerprint:
                    self._skipped.append(entry.name)
                    continue
                self._entries[entry.name] = Registration(entry.name, entry.path, next(self._generations),
                                                         entry.fingerprint, entry.rank, entry.target_modules,
                                                         entry.size_bytes)

    def restore_report(self) -> dict:
        """{"restored": names, "skipped": names whose files changed or went away}."""
        return {"restored": sorted(self._entries), "skipped": list(self._skipped)}

    def _record(self) -> None:
        if self._state is not None:
            self._state.save(self._entries.values())

    def add(self, name: str, path: str, fingerprint: tuple | None, rank: int,
            target_modules: tuple[str, ...], size_bytes: int) -> str:
        """'ok', 'exists' or 'full'."""
        if name in self._entries:
            return "exists"
        if len(self._entries) >= self.max_adapters:
            return "full"
        self._entries[name] = Registration(name, path, next(self._generations), fingerprint, rank,
                                           tuple(target_modules), size_bytes)
        self._record()
        return "ok"

    def remove(self, name: str) -> bool:
        removed = self._entries.pop(name, None) is not None
        if removed:
            self._record()
        return removed

    def lookup(self, names: list[str]) -> dict[str, Registration | None]:
        return {name: self._entries.get(name) for name in names}

    def entries(self) -> list[Registration]:
        return sorted(self._entries.values(), key=lambda entry: entry.name)

    def report(self, replica: str, info: dict) -> None:
        self._replicas[replica] = info

    def replicas(self) -> dict[str, dict]:
        return dict(self._replicas)
