"""The host tier: its LRU bound, adapters read back from disk, and the reads on the loader
thread (acquire itself never reads a file): holds, shared reads, failed and rewritten
files, unregistering during a read."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from fixtures_registry import MAX_RANK, acquire_now, assert_slot_holds, register_all, tiers

from loraquilt.server.adapters.registry import (
    Acquired, AdapterChanged, AdapterRegistry, HostHold, Lease, UnknownAdapter,
)
from loraquilt.server.adapters.slots import LoraSlots, SlotConfig


# -- host tier ----------------------------------------------------------------------------


def test_host_lru_bound_sends_the_oldest_to_disk(registry, make, log):
    register_all(registry, make, "a", "b", "c")
    assert tiers(registry) == {"a": "disk", "b": "host", "c": "host"}
    assert registry.tier_counts() == {"disk": 1, "host": 2, "device": 0}
    assert log.evictions == ["host"]


def test_acquire_reloads_an_adapter_from_disk(registry, slots, make, model, log):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")
    loads_before = len(log.loads)

    [slot] = acquire_now(registry, ["a"]).slots
    assert len(log.loads) == loads_before + 1
    assert_slot_holds(slots, slot, folder_a, model)
    # a is back on host, which pushed the least recently used (b) to disk.
    assert tiers(registry) == {"a": "device", "b": "disk", "c": "host"}
    assert registry.tier_counts() == {"disk": 1, "host": 1, "device": 1}


def test_deleted_folder_makes_acquire_fail_and_the_registry_keeps_working(registry, slots, make, model):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")
    shutil.rmtree(folder_a)

    with pytest.raises(AdapterChanged, match="deleted or rewritten since it was registered") as info:
        acquire_now(registry, ["a"])
    assert "'a'" in str(info.value)
    assert registry.get("a").tier == "disk" and registry.get("a").pins == 0

    slot_b, slot_c = acquire_now(registry, ["b", "c"]).slots  # both slots are still usable
    assert sorted([slot_b, slot_c]) == [0, 1]
    assert registry.tier_counts() == {"disk": 1, "host": 0, "device": 2}


# -- reads from disk on the loader thread ---------------------------------------------------


class GatedReads:
    """Wraps registry._read: records the reading thread, and blocks each read until the
    test opens the gate (so a test can act while a read is in flight)."""

    def __init__(self, registry: AdapterRegistry, gated: bool = False):
        self.registry, self.real = registry, registry._read
        self.threads: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        registry._read = self

    def __call__(self, path):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(timeout=30)
        return self.real(path)


def test_acquire_of_an_on_disk_adapter_reads_it_on_the_loader_thread(registry, slots, make, model, log):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")  # a is on disk now
    reads = GatedReads(registry, gated=True)
    woken = threading.Event()
    registry.on_loaded = woken.set

    got = registry.acquire(["a"])
    hold = got.hold
    assert got.status == Acquired.READING and hold.records == (registry.get("a"),)
    assert reads.started.wait(timeout=30)
    assert registry.get("a").tier == "disk" and registry.get("a").loading is not None
    assert registry.acquire(["a"], hold).hold is hold  # still reading: the same hold, no second read
    reads.gate.set()
    assert hold.wait(timeout=30) and woken.wait(timeout=30)
    assert reads.threads == ["loraquilt-adapter-loader"]
    assert registry.get("a").tier == "host" and registry.get("a").loading is None

    lease = registry.acquire(["a"], hold).lease
    assert isinstance(lease, Lease)
    assert_slot_holds(slots, lease.slots[0], folder_a, model)
    assert hold.records == () and registry.get("a").holds == 0  # released with the lease
    assert tiers(registry) == {"a": "device", "b": "disk", "c": "host"}


def test_two_requests_for_the_same_adapter_share_one_read(registry, make, log):
    register_all(registry, make, "a", "b", "c")
    loads_before = len(log.loads)
    first, second = registry.acquire(["a"]).hold, registry.acquire(["a"]).hold
    assert isinstance(first, HostHold) and isinstance(second, HostHold) and first is not second
    assert first.wait(timeout=30) and second.wait(timeout=30)
    assert len(log.loads) == loads_before + 1
    assert isinstance(registry.acquire(["a"], first).lease, Lease)
    assert isinstance(registry.acquire(["a"], second).lease, Lease)
    assert registry.get("a").pins == 2 and registry.get("a").holds == 0


def test_a_mix_larger_than_the_host_tier_is_held_in_until_admitted(model, make, log):
    """Host tier of 2, a mix of 3 adapters all on disk: reading the third must not evict
    the first (the request could never be admitted), so held adapters stay over the bound
    until the lease takes them; the tier shrinks back after."""
    slots = LoraSlots(model, SlotConfig(num_slots=3, max_rank=MAX_RANK, backend="torch"),
                      torch.float32, torch.device("cpu"))
    registry = AdapterRegistry(model, slots, max_cpu_adapters=2, events=log.events())
    register_all(registry, make, "a", "b", "c", "d", "e")  # a, b, c on disk
    hold = registry.acquire(["a", "b", "c"]).hold
    assert hold.records and hold.wait(timeout=30)
    assert {name for name, tier in tiers(registry).items() if tier == "host"} == {"a", "b", "c"}
    lease = registry.acquire(["a", "b", "c"], hold).lease
    assert isinstance(lease, Lease) and sorted(lease.slots) == [0, 1, 2]
    assert registry.tier_counts() == {"disk": 2, "host": 0, "device": 3}
    assert sum(r.host is not None for r in registry.records()) == 2  # back within the bound


def test_holds_are_granted_within_half_the_host_tier(registry, make):
    """max_cpu_adapters=2: holds keep at most one adapter on host together; a second
    request for another on-disk adapter waits for room and reads nothing meanwhile."""
    register_all(registry, make, "a", "b", "c", "d")  # a, b on disk
    reads = GatedReads(registry)
    first = registry.acquire(["a"]).hold
    second = registry.acquire(["b"]).hold
    assert first.records and second.records == () and second.loads == []
    assert first.wait(timeout=30) and reads.threads == ["loraquilt-adapter-loader"]
    assert registry.acquire(["b"], second).hold.records == ()  # still no room: a is held
    assert isinstance(registry.acquire(["a"], first).lease, Lease)  # a admitted: its hold goes
    second = registry.acquire(["b"], second).hold
    assert second.records == (registry.get("b"),) and second.wait(timeout=30)
    assert isinstance(registry.acquire(["b"], second).lease, Lease)


def test_released_hold_lets_the_host_tier_shrink_back(registry, make):
    register_all(registry, make, "a", "b", "c")  # a on disk
    hold = registry.acquire(["a"]).hold
    assert hold.wait(timeout=30)
    registry.release_hold(hold)  # the request went away before admission
    assert hold.records == () and registry.get("a").holds == 0
    assert registry.get("a").tier == "host"  # the read still landed
    assert sum(r.host is not None for r in registry.records()) == 2


def test_deleted_files_fail_the_hold_with_adapter_changed(registry, make):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")
    shutil.rmtree(folder_a)
    hold = registry.acquire(["a"]).hold
    assert hold.wait(timeout=30)
    with pytest.raises(AdapterChanged, match="deleted or rewritten since it was registered"):
        registry.acquire(["a"], hold)
    assert hold.records == () and registry.get("a").holds == 0 and registry.get("a").tier == "disk"
    with pytest.raises(AdapterChanged):  # a new request reads again, and fails the same way
        acquire_now(registry, ["a"])


def test_files_rewritten_during_the_read_fail_it(registry, make):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")
    reads = GatedReads(registry, gated=True)
    hold = registry.acquire(["a"]).hold
    assert reads.started.wait(timeout=30)
    weights = folder_a / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # same bytes, new inode
    reads.gate.set()
    assert hold.wait(timeout=30)
    with pytest.raises(AdapterChanged):
        registry.acquire(["a"], hold)
    assert registry.get("a").tier == "disk"


def test_unregister_while_its_read_is_in_flight(registry, make):
    folder_a = make("a")
    registry.register("a", folder_a)
    register_all(registry, make, "b", "c")
    reads = GatedReads(registry, gated=True)
    hold = registry.acquire(["a"]).hold
    assert reads.started.wait(timeout=30)
    old = registry.get("a")
    registry.unregister("a")
    reads.gate.set()
    assert hold.wait(timeout=30)
    assert old.host is None and old.loading is None  # the read was dropped, not installed
    assert "a" not in registry.host._lru
    with pytest.raises(UnknownAdapter):
        registry.acquire(["a"], hold)
    assert hold.records == () and registry.host._held == 0
    assert registry.tier_counts() == {"disk": 0, "host": 2, "device": 0}

    registry.register("a", folder_a)  # the name works again, with a fresh read
    assert acquire_now(registry, ["a"]) is not None


def test_the_loader_thread_exits_when_idle(registry, make):
    register_all(registry, make, "a", "b", "c")
    hold = registry.acquire(["a"]).hold  # a on disk
    assert hold.wait(timeout=30)
    assert isinstance(registry.acquire(["a"], hold).lease, Lease)
    deadline = time.monotonic() + 30
    while registry.host._loader._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registry.host._loader._thread is None and registry.host._loader.pending() == 0
    hold = registry.acquire(["b"]).hold  # reading a pushed b to disk; the next read starts a new thread
    assert isinstance(hold, HostHold) and hold.wait(timeout=30)
    assert isinstance(registry.acquire(["b"], hold).lease, Lease)
