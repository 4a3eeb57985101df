"""The device tier: acquire pins slots (reused, in request order, LRU-evicted, never a
pinned one), slots hold exactly their adapter, and a failed acquire leaves no pin and
evicts nobody."""

from __future__ import annotations

import shutil

import pytest
from fixtures_registry import QV, acquire_now, assert_slot_empty, assert_slot_holds, register_all, tiers

from loraquilt.server.adapters.peft_folder import AdapterError
from loraquilt.server.adapters.registry import Lease
from loraquilt.server.model.config import PROJECTIONS


# -- device slots -------------------------------------------------------------------------


def test_acquire_loads_the_adapter_into_a_slot(registry, slots, make, model):
    folder = make("a", QV)
    registry.register("a", folder)
    lease = acquire_now(registry, ["a"])
    [slot] = lease.slots

    assert isinstance(lease, Lease) and lease.records == (registry.get("a"),)
    assert registry.get("a").tier == "device"
    assert registry.get("a").slot == slot
    assert_slot_holds(slots, slot, folder, model)
    assert registry.tier_counts() == {"disk": 0, "host": 0, "device": 1}


def test_acquire_of_a_resident_adapter_reuses_its_slot(registry, make, log):
    register_all(registry, make, "a")
    first = acquire_now(registry, ["a"])
    second = acquire_now(registry, ["a"])
    assert first.slots == second.slots
    assert first.records[0] is second.records[0] is registry.get("a")
    assert registry.get("a").pins == 2
    registry.release(second)
    assert registry.get("a").pins == 1
    assert len(log.loads) == 1  # only the registration read the folder


def test_acquire_returns_slots_in_request_order(registry, make):
    register_all(registry, make, "a", "b")
    lease_ab = acquire_now(registry, ["a", "b"])
    slots_ab = lease_ab.slots
    assert slots_ab == (registry.get("a").slot, registry.get("b").slot)
    assert lease_ab.records == (registry.get("a"), registry.get("b"))
    assert sorted(slots_ab) == [0, 1]
    lease_ba = acquire_now(registry, ["b", "a"])
    assert lease_ba.slots == slots_ab[::-1]
    assert lease_ba.records == lease_ab.records[::-1]


def test_device_lru_evicts_the_least_recently_used(registry, make, log):
    register_all(registry, make, "a", "b", "c")
    for name in ("a", "b"):
        registry.release(acquire_now(registry, [name]))
    slot_a = registry.get("a").slot

    assert acquire_now(registry, ["c"]).slots == (slot_a,)
    assert registry.get("a").tier in ("host", "disk")
    assert registry.get("b").tier == "device"
    assert log.evictions.count("device") == 1


def test_reacquiring_refreshes_lru_order(registry, make):
    register_all(registry, make, "a", "b", "c")
    for name in ("a", "b", "a"):
        registry.release(acquire_now(registry, [name]))
    slot_b = registry.get("b").slot
    assert acquire_now(registry, ["c"]).slots == (slot_b,)
    assert registry.get("a").tier == "device"


def test_pinned_slots_are_never_evicted(registry, make):
    register_all(registry, make, "a", "b", "c")
    lease_a, lease_b = acquire_now(registry, ["a"]), acquire_now(registry, ["b"])
    [slot_a], [slot_b] = lease_a.slots, lease_b.slots

    assert acquire_now(registry, ["c"]) is None
    assert (registry.get("a").slot, registry.get("b").slot) == (slot_a, slot_b)
    assert registry.get("c").slot is None and registry.get("c").pins == 0

    registry.release(lease_b)
    assert acquire_now(registry, ["c"]).slots == (slot_b,)
    assert registry.get("a").slot == slot_a


def test_acquire_needing_more_slots_than_exist_returns_none(registry, make):
    register_all(registry, make, "a", "b", "c")
    assert acquire_now(registry, ["a", "b", "c"]) is None
    assert all(record.pins == 0 for record in registry.records())


def test_reused_slot_has_no_leftovers(registry, slots, make, model):
    """a (all 7 projections, rank 8) is evicted for c (q_proj only, rank 2): c's slot must
    be zero on the other six projections and beyond rank 2 on q_proj."""
    folder_c = make("c", ("q_proj",), r=2)
    registry.register("a", make("a", PROJECTIONS, r=8))
    registry.register("b", make("b"))
    lease_a = acquire_now(registry, ["a"])
    [slot_a] = lease_a.slots
    registry.release(lease_a)
    acquire_now(registry, ["b"])
    registry.register("c", folder_c)

    assert acquire_now(registry, ["c"]).slots == (slot_a,)
    assert_slot_holds(slots, slot_a, folder_c, model)


# -- acquire failures and re-registration ---------------------------------------------------


def test_acquire_does_not_evict_an_adapter_of_the_same_request(registry, make):
    """b is resident but unpinned and owns the only unpinned slot; c pins the other.
    acquire(["a", "b"]) cannot be served now and must return None, pinning nothing."""
    register_all(registry, make, "a", "b", "c")
    registry.release(acquire_now(registry, ["b"]))
    slot_b = registry.get("b").slot
    lease_c = acquire_now(registry, ["c"])

    assert acquire_now(registry, ["a", "b"]) is None
    assert registry.get("a").pins == 0 and registry.get("a").slot is None
    assert registry.get("b").tier == "device" and registry.get("b").slot == slot_b
    assert registry.get("b").pins == 0

    # b's slot went back to the LRU: once c is released, a and b fit together.
    registry.release(lease_c)
    lease_ab = acquire_now(registry, ["a", "b"])
    assert lease_ab is not None
    assert lease_ab.slots[1] == slot_b  # b kept its slot, a took c's


def test_failed_acquire_leaves_no_pins(registry, make):
    folder_gone = make("gone")
    registry.register("gone", folder_gone)
    register_all(registry, make, "a", "b")  # gone is pushed to disk
    shutil.rmtree(folder_gone)

    with pytest.raises(AdapterError):
        acquire_now(registry, ["a", "gone"])
    assert all(record.pins == 0 for record in registry.records())
    lease_b = acquire_now(registry, ["b"])
    assert lease_b is not None
    registry.release(lease_b)
    assert acquire_now(registry, ["b", "a"]) is not None


def test_failed_acquire_of_a_resident_and_a_deleted_adapter_unpins_the_resident(registry, make):
    """The resident adapter is pinned first; the failed read of the other must undo it."""
    folder_gone = make("gone")
    registry.register("gone", folder_gone)
    register_all(registry, make, "a", "b")  # gone is pushed to disk
    registry.release(acquire_now(registry, ["a"]))
    shutil.rmtree(folder_gone)

    with pytest.raises(AdapterError):
        acquire_now(registry, ["a", "gone"])
    assert registry.get("a").pins == 0 and registry.get("a").tier == "device"
    slot_a = registry.get("a").slot
    assert acquire_now(registry, ["b"]) is not None  # takes the free slot and stays pinned
    register_all(registry, make, "c")
    assert acquire_now(registry, ["c"]).slots == (slot_a,)  # a's slot was unpinned: evictable


def test_failed_read_does_not_evict_a_resident_adapter(registry, slots, make, model, log):
    """Both slots hold idle adapters; acquiring one whose folder was deleted fails
    before anyone is evicted: the residents keep their slots and their weights."""
    folder_gone = make("gone")
    registry.register("gone", folder_gone)
    folder_a, folder_b = make("a"), make("b")
    registry.register("a", folder_a)
    registry.register("b", folder_b)  # gone is pushed to disk
    registry.release(acquire_now(registry, ["a", "b"]))
    slot_a, slot_b = registry.get("a").slot, registry.get("b").slot
    shutil.rmtree(folder_gone)
    evictions_before = list(log.evictions)

    with pytest.raises(AdapterError, match="deleted or rewritten since it was registered"):
        acquire_now(registry, ["gone"])
    assert (registry.get("a").slot, registry.get("b").slot) == (slot_a, slot_b)
    assert tiers(registry) == {"gone": "disk", "a": "device", "b": "device"}
    assert_slot_holds(slots, slot_a, folder_a, model)
    assert_slot_holds(slots, slot_b, folder_b, model)
    assert log.evictions == evictions_before
    assert all(record.pins == 0 for record in registry.records())
    # and the registry keeps working: a and b are still served from their slots
    assert acquire_now(registry, ["b", "a"]).slots == (slot_b, slot_a)


def test_naming_an_adapter_twice_raises_and_pins_nothing(registry, make):
    register_all(registry, make, "a", "b")
    registry.release(acquire_now(registry, ["a"]))  # a resident, b on host

    for names in (["a", "a"], ["b", "b"], ["a", "b", "a"], ["b", "a", "b"]):
        with pytest.raises(ValueError, match="twice"):
            acquire_now(registry, names)
        assert all(record.pins == 0 for record in registry.records()), names
    assert registry.get("b").slot is None  # nothing was loaded either
    lease = acquire_now(registry, ["a", "b"])
    assert lease is not None and sorted(lease.slots) == [0, 1]


def test_reregister_while_the_old_adapter_is_pinned(registry, slots, make, model):
    """Unregister a while a request uses it, register a new a, then the old request ends:
    the old slot must be freed and the new a must be unpinned and usable."""
    folder_old, folder_new = make("a"), make("a2", ("q_proj",))
    registry.register("a", folder_old)
    old_lease = acquire_now(registry, ["a"])
    [old_slot] = old_lease.slots
    registry.unregister("a")
    new_record = registry.register("a", folder_new)
    assert new_record is not old_lease.records[0]
    assert_slot_holds(slots, old_slot, folder_old, model)  # the old request still uses it

    registry.release(old_lease)  # the old request finishes
    assert registry.get("a") is new_record and new_record.pins == 0
    assert old_lease.records[0].pins == 0 and old_lease.records[0].slot is None
    assert_slot_empty(slots, old_slot)
    register_all(registry, make, "b")
    lease_a = acquire_now(registry, ["a"])
    assert lease_a is not None and lease_a.records == (new_record,)
    assert_slot_holds(slots, lease_a.slots[0], folder_new, model)
    assert acquire_now(registry, ["b"]) is not None


def test_slots_in_use_counts_unregistered_adapters_until_their_last_release(registry, make):
    register_all(registry, make, "a", "b")
    assert registry.slots_in_use() == 0
    lease_a = acquire_now(registry, ["a"])
    registry.release(acquire_now(registry, ["b"]))
    assert registry.slots_in_use() == 2  # b is idle but resident
    registry.unregister("a")  # pinned: its slot stays owned until the request ends
    assert registry.slots_in_use() == 2 and registry.tier_counts()["device"] == 1
    registry.release(lease_a)
    assert registry.slots_in_use() == 1 == registry.tier_counts()["device"]
    registry.unregister("b")
    assert registry.slots_in_use() == 0


