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
    Outcomes are return values, not exceptions, so callers map them to gRPC statuses."""

    def __init__(self, max_adapters: int = 10000):
        self.max_adapters = max_adapters
        self._entries: dict[str, Registration] = {}
        self._generations = itertools.count(1)
        self._replicas: dict[str, dict] = {}

    def add(self, name: str, path: str, fingerprint: tuple | None, rank: int,
            target_modules: tuple[str, ...], size_bytes: int) -> str:
        """'ok', 'exists' or 'full'."""
        if name in self._entries:
            return "exists"
        if len(self._entries) >= self.max_adapters:
            return "full"
        self._entries[name] = Registration(name, path, next(self._generations), fingerprint, rank,
                                           tuple(target_modules), size_bytes)
        return "ok"

    def remove(self, name: str) -> bool:
        return self._entries.pop(name, None) is not None

    def lookup(self, names: list[str]) -> dict[str, Registration | None]:
        return {name: self._entries.get(name) for name in names}

    def entries(self) -> list[Registration]:
        return sorted(self._entries.values(), key=lambda entry: entry.name)

    def report(self, replica: str, info: dict) -> None:
        self._replicas[replica] = info

    def replicas(self) -> dict[str, dict]:
        return dict(self._replicas)
