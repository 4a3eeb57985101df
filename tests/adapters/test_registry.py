"""The adapter registry: registration, the disk -> host -> device tiers, LRU eviction,
pinning by running requests, unregistering while pinned, and reads from disk on the
loader thread (acquire itself never reads a file)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from loraquilt.server.adapters.peft_folder import AdapterError, load_peft_adapter
from loraquilt.server.adapters.registry import (
    AdapterChanged,
    AdapterExists,
    AdapterRegistry,
    HostHold,
    Lease,
    RegistryEvents,
    UnknownAdapter,
)
from loraquilt.server.adapters.slots import LoraSlots, SlotConfig
from loraquilt.server.model.config import ATTENTION_PROJECTIONS, PROJECTIONS, ModelConfig, model_config_from_hf

MAX_RANK = 16
QV = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def model() -> ModelConfig:
    return model_config_from_hf(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))


@pytest.fixture
def slots(model) -> LoraSlots:
    return LoraSlots(model, SlotConfig(num_slots=2, max_rank=MAX_RANK, backend="torch"),
                     torch.float32, torch.device("cpu"))


class EventLog:
    def __init__(self):
        self.loads: list[float] = []
        self.evictions: list[str] = []

    def events(self) -> RegistryEvents:
        return RegistryEvents(on_load=self.loads.append, on_evict=self.evictions.append)


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
def registry(model, slots, log) -> AdapterRegistry:
    return AdapterRegistry(model, slots, max_cpu_adapters=2, events=log.events())


@pytest.fixture
def make(tmp_path, model):
    """make(name, targets, r) writes a valid PEFT LoRA folder with its own random weights."""
    seeds = iter(range(1000))

    def write(name: str, targets=QV, r: int = 4) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                  "target_modules": list(targets)}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        generator = torch.Generator().manual_seed(next(seeds))
        tensors = {}
        for layer in range(model.num_layers):
            for proj in targets:
                group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
                out_features, in_features = model.projection_shape(proj)
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=generator)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=generator)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    return write


def acquire_now(registry: AdapterRegistry, names: list[str]) -> Lease | None:
    """acquire() as a waiting request sees it over several engine steps: whatever must be
    read from disk is read on the loader thread, then the next try pins it."""
    hold = None
    for _ in range(1000):
        result = registry.acquire(names, hold)
        if not isinstance(result, HostHold):
            if result is None:
                registry.release_hold(hold)
            return result
        hold = result
        assert hold.wait(timeout=30)
    raise AssertionError(f"{names} never became resident")


def register_all(registry: AdapterRegistry, make, *names: str, targets=QV) -> None:
    for name in names:
        registry.register(name, make(name, targets))


def assert_slot_holds(slots: LoraSlots, slot: int, folder: Path, model: ModelConfig) -> None:
    """The slot's buffers hold exactly the adapter in `folder`: its A/B in the first r rows,
    zero padding after them, and zero on every projection it does not target."""
    adapter = load_peft_adapter(folder, model, max_rank=MAX_RANK, dtype=torch.float32)
    for layer in range(model.num_layers):
        for proj in PROJECTIONS:
            a, b = slots.a[layer][proj][slot], slots.b[layer][proj][slot]
            module = adapter.modules.get((layer, proj))
            if module is None:
                assert not a.any() and not b.any(), f"leftover on layer {layer} {proj}"
                continue
            r = module.rank
            assert torch.equal(a[:r], module.a)
            assert torch.equal(b[:, :r], module.b)
            assert not a[r:].any() and not b[:, r:].any(), f"leftover padding on layer {layer} {proj}"
    assert slots.targets[slot] == frozenset(adapter.target_modules)


def assert_slot_empty(slots: LoraSlots, slot: int) -> None:
    for layer in range(len(slots.a)):
        for proj in PROJECTIONS:
            assert not slots.a[layer][proj][slot].any() and not slots.b[layer][proj][slot].any()
    assert slots.targets[slot] == frozenset()


def tiers(registry: AdapterRegistry) -> dict[str, str]:
    return {record.name: record.tier for record in registry.records()}


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

    hold = registry.acquire(["a"])
    assert isinstance(hold, HostHold) and hold.records == (registry.get("a"),)
    assert reads.started.wait(timeout=30)
    assert registry.get("a").tier == "disk" and registry.loads_in_flight() == 1
    assert registry.acquire(["a"], hold) is hold  # still reading: the same hold, no second read
    reads.gate.set()
    assert hold.wait(timeout=30) and woken.wait(timeout=30)
    assert reads.threads == ["loraquilt-adapter-loader"]
    assert registry.get("a").tier == "host" and registry.loads_in_flight() == 0

    lease = registry.acquire(["a"], hold)
    assert isinstance(lease, Lease)
    assert_slot_holds(slots, lease.slots[0], folder_a, model)
    assert hold.records == () and registry.get("a").holds == 0  # released with the lease
    assert tiers(registry) == {"a": "device", "b": "disk", "c": "host"}


def test_two_requests_for_the_same_adapter_share_one_read(registry, make, log):
    register_all(registry, make, "a", "b", "c")
    loads_before = len(log.loads)
    first, second = registry.acquire(["a"]), registry.acquire(["a"])
    assert isinstance(first, HostHold) and isinstance(second, HostHold) and first is not second
    assert first.wait(timeout=30) and second.wait(timeout=30)
    assert len(log.loads) == loads_before + 1
    assert isinstance(registry.acquire(["a"], first), Lease)
    assert isinstance(registry.acquire(["a"], second), Lease)
    assert registry.get("a").pins == 2 and registry.get("a").holds == 0


def test_a_mix_larger_than_the_host_tier_is_held_in_until_admitted(model, make, log):
    """Host tier of 2, a mix of 3 adapters all on disk: reading the third must not evict
    the first (the request could never be admitted), so held adapters stay over the bound
    until the lease takes them; the tier shrinks back after."""
    slots = LoraSlots(model, SlotConfig(num_slots=3, max_rank=MAX_RANK, backend="torch"),
                      torch.float32, torch.device("cpu"))
    registry = AdapterRegistry(model, slots, max_cpu_adapters=2, events=log.events())
    register_all(registry, make, "a", "b", "c", "d", "e")  # a, b, c on disk
    hold = registry.acquire(["a", "b", "c"])
    assert isinstance(hold, HostHold) and hold.wait(timeout=30)
    assert {name for name, tier in tiers(registry).items() if tier == "host"} == {"a", "b", "c"}
    lease = registry.acquire(["a", "b", "c"], hold)
    assert isinstance(lease, Lease) and sorted(lease.slots) == [0, 1, 2]
    assert registry.tier_counts() == {"disk": 2, "host": 0, "device": 3}
    assert sum(r.host is not None for r in registry.records()) == 2  # back within the bound


def test_holds_are_granted_within_half_the_host_tier(registry, make):
    """max_cpu_adapters=2: holds keep at most one adapter on host together; a second
    request for another on-disk adapter waits for room and reads nothing meanwhile."""
    register_all(registry, make, "a", "b", "c", "d")  # a, b on disk
    reads = GatedReads(registry)
    first = registry.acquire(["a"])
    second = registry.acquire(["b"])
    assert first.records and second.records == () and second.loads == []
    assert first.wait(timeout=30) and reads.threads == ["loraquilt-adapter-loader"]
    assert registry.acquire(["b"], second).records == ()  # still no room: a is held
    assert isinstance(registry.acquire(["a"], first), Lease)  # a admitted: its hold goes
    second = registry.acquire(["b"], second)
    assert second.records == (registry.get("b"),) and second.wait(timeout=30)
    assert isinstance(registry.acquire(["b"], second), Lease)


def test_released_hold_lets_the_host_tier_shrink_back(registry, make):
    register_all(registry, make, "a", "b", "c")  # a on disk
    hold = registry.acquire(["a"])
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
    hold = registry.acquire(["a"])
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
    hold = registry.acquire(["a"])
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
    hold = registry.acquire(["a"])
    assert reads.started.wait(timeout=30)
    old = registry.get("a")
    registry.unregister("a")
    reads.gate.set()
    assert hold.wait(timeout=30)
    assert old.host is None and old.loading is None  # the read was dropped, not installed
    assert "a" not in registry._host_lru
    with pytest.raises(UnknownAdapter):
        registry.acquire(["a"], hold)
    assert hold.records == () and registry._held == 0
    assert registry.tier_counts() == {"disk": 0, "host": 2, "device": 0}

    registry.register("a", folder_a)  # the name works again, with a fresh read
    assert acquire_now(registry, ["a"]) is not None


def test_the_loader_thread_exits_when_idle(registry, make):
    register_all(registry, make, "a", "b", "c")
    hold = registry.acquire(["a"])  # a on disk
    assert hold.wait(timeout=30)
    assert isinstance(registry.acquire(["a"], hold), Lease)
    deadline = time.monotonic() + 30
    while registry._loader._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registry._loader._thread is None and registry._loader.pending() == 0
    hold = registry.acquire(["b"])  # reading a pushed b to disk; the next read starts a new thread
    assert isinstance(hold, HostHold) and hold.wait(timeout=30)
    assert isinstance(registry.acquire(["b"], hold), Lease)
