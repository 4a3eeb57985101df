"""The adapter registry: registration and its refusals, unregistering (while pinned,
idle, on host or disk), re-registering a name, tier counts and the load/eviction events."""

from __future__ import annotations

import pytest
import torch
from fixtures_registry import QV, acquire_now, assert_slot_empty, assert_slot_holds, register_all, tiers

from loraquilt.server.adapters.peft_folder import AdapterError
from loraquilt.server.adapters.registry import AdapterExists, UnknownAdapter


# -- registration -------------------------------------------------------------------------


def test_register_keeps_the_adapter_on_host(registry, make, log):
    folder = make("a", QV, r=4)
    record = registry.register("a", folder)

    assert record.tier == "host"
    assert (record.name, record.path, record.rank, record.target_modules) == ("a", folder, 4, QV)
    assert record.size_bytes == (folder / "adapter_model.safetensors").stat().st_size
    assert registry.get("a") is record
    assert registry.records() == [record]
    assert registry.tier_counts() == {"disk": 0, "host": 1, "device": 0}
    assert len(log.loads) == 1 and log.loads[0] >= 0
    assert registry.host_bytes() == (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) * 4 * 2


def test_register_twice_raises_adapter_exists(registry, make):
    registry.register("a", make("a"))
    with pytest.raises(AdapterExists, match="'a'"):
        registry.register("a", make("other"))
    assert [r.name for r in registry.records()] == ["a"]


def test_register_an_invalid_folder_registers_nothing(registry, tmp_path):
    with pytest.raises(AdapterError):
        registry.register("a", tmp_path / "missing")
    assert registry.records() == []
    with pytest.raises(UnknownAdapter):
        registry.get("a")


def test_unknown_name_raises_unknown_adapter(registry, make):
    registry.register("a", make("a"))
    with pytest.raises(UnknownAdapter) as info:
        registry.get("nope")
    assert "nope" in str(info.value)
    with pytest.raises(UnknownAdapter):
        acquire_now(registry, ["a", "nope"])
    with pytest.raises(UnknownAdapter):
        registry.unregister("nope")
    assert registry.get("a").pins == 0  # the failed acquire pinned nothing


# -- unregister ---------------------------------------------------------------------------


def test_unregister_while_pinned_hides_at_once_and_frees_after_release(registry, slots, make, model):
    folder_a = make("a")
    registry.register("a", folder_a)
    lease_a = acquire_now(registry, ["a"])
    [slot_a] = lease_a.slots
    registry.unregister("a")

    with pytest.raises(UnknownAdapter):
        registry.get("a")
    with pytest.raises(UnknownAdapter):
        acquire_now(registry, ["a"])
    assert registry.records() == []
    assert registry.tier_counts() == {"disk": 0, "host": 0, "device": 0}
    assert_slot_holds(slots, slot_a, folder_a, model)  # the running request still uses it

    register_all(registry, make, "b", "c")
    [slot_b] = acquire_now(registry, ["b"]).slots
    assert slot_b != slot_a
    assert acquire_now(registry, ["c"]) is None  # a's slot is still pinned

    registry.release(lease_a)
    assert_slot_empty(slots, slot_a)
    assert acquire_now(registry, ["c"]).slots == (slot_a,)


def test_unregister_idle_clears_the_slot(registry, slots, make):
    register_all(registry, make, "a", "b")
    lease_a = acquire_now(registry, ["a"])
    [slot_a] = lease_a.slots
    registry.release(lease_a)
    acquire_now(registry, ["b"])
    registry.unregister("a")

    assert_slot_empty(slots, slot_a)
    assert tiers(registry) == {"b": "device"}
    assert registry.tier_counts() == {"disk": 0, "host": 0, "device": 1}
    registry.register("a", registry.get("b").path)  # the name is free again
    assert registry.get("a").tier == "host"


def test_unregister_a_host_or_disk_adapter(registry, make):
    register_all(registry, make, "a", "b", "c")
    registry.unregister("a")  # on disk
    registry.unregister("b")  # on host
    assert tiers(registry) == {"c": "host"}
    assert registry.host_bytes() == registry.get("c").host.nbytes_in(torch.float32)


def test_tier_counts_cover_every_tier(registry, make):
    register_all(registry, make, "a", "b", "c", "d")
    acquire_now(registry, ["d"])
    assert tiers(registry) == {"a": "disk", "b": "disk", "c": "host", "d": "device"}
    assert registry.tier_counts() == {"disk": 2, "host": 1, "device": 1}


def test_events_report_loads_and_evictions(registry, make, log):
    register_all(registry, make, "a", "b", "c")  # a goes to disk
    assert len(log.loads) == 3 and all(seconds >= 0 for seconds in log.loads)
    assert log.evictions == ["host"]

    for name in ("b", "c"):
        registry.release(acquire_now(registry, [name]))
    acquire_now(registry, ["a"])  # reload from disk, evict b from host and from its slot
    assert len(log.loads) == 4
    assert sorted(log.evictions) == ["device", "host", "host"]


