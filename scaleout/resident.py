"""Which adapters one replica's engine holds, and for whom.

An adapter stays registered in the engine while something holds it: a resident routing
key (an entry of Ray Serve's multiplex LRU) or a request in flight. When the last hold
goes (the key was evicted and its requests finished) the engine unregisters it, freeing
its host copy and device slot; below that, the engine's own tiers (device slots, host
memory) move it as usual. Holding before registering means nothing can unregister a name
between the check and the request's submission.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable

from loraquilt.scaleout.directory import Registration
from loraquilt.server.adapters.registry import AdapterChanged
from loraquilt.server.engine import Engine


class ResidentAdapters:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()  # releases also come from Ray's unload thread
        self._holds: Counter[str] = Counter()
        self._generation: dict[str, int] = {}  # registered in the engine: name -> directory generation
        self._registering = asyncio.Lock()  # one registration at a time: no name registered twice

    async def acquire(self, registrations: dict[str, Registration]) -> int:
        """Hold every named adapter and make the engine hold the directory's generation of
        it (reading the files if needed, in a worker thread). Returns how many were read.
        Raises AdapterChanged when the files differ from those validated at registration."""
        names = list(registrations)
        with self._lock:
            self._holds.update(names)
        try:
            return await self._register_missing(registrations)
        except BaseException:
            self.release(names)
            raise

    def release(self, names) -> None:
        with self._lock:
            for name in names:
                self._holds[name] -= 1
                if self._holds[name] <= 0:
                    del self._holds[name]
                    self._drop(name)

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._holds)

    def registered(self) -> dict[str, int]:
        with self._lock:
            return dict(self._generation)

    async def _register_missing(self, registrations: dict[str, Registration]) -> int:
        read = 0
        async with self._registering:
            for name, entry in registrations.items():
                with self._lock:
                    current = self._generation.get(name)
                    if current is not None and current != entry.generation:
                        self._drop(name)  # registered again since: running requests finish on the old files
                        current = None
                if current is not None:
                    continue
                record = await asyncio.to_thread(self.engine.register_adapter, name, entry.path)
                if record.fingerprint != entry.fingerprint:
                    self.engine.unregister_adapter(name)
                    raise AdapterChanged(f"the files of adapter {name!r} were deleted or rewritten since it "
                                         "was registered; unregister and register it again")
                with self._lock:
                    self._generation[name] = entry.generation
                read += 1
        return read

    def _drop(self, name: str) -> None:  # under self._lock
        if self._generation.pop(name, None) is not None:
            self.engine.unregister_adapter(name)


class ResidentKey:
    """The object Ray Serve's multiplexer keeps for one routing key: holds its adapters
    until the LRU evicts it (Ray calls __del__ then; the garbage collector may call it again)."""

    def __init__(self, adapters: ResidentAdapters, key: str, names: tuple[str, ...],
                 on_release: Callable[[str], None] = lambda key: None):
        self.adapters, self.key, self.names, self.on_release = adapters, key, names, on_release
        self._released = False
        self._once = threading.Lock()

    def __del__(self) -> None:
        with self._once:
            if self._released:
                return
            self._released = True
        self.on_release(self.key)
        self.adapters.release(self.names)
