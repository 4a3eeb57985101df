"""The device tier: which adapter each LoRA slot holds, pins by running requests, and the
LRU of unpinned resident slots. A pinned slot is never evicted or reused; an adapter
unregistered while pinned frees (and zeroes) its slot at its last unpin.

An adapter with its own token tables (input embeddings, lm_head: heads.py) also needs one
of the slots' head places (--max-lora-head-adapters, head_pool.py): when none is free the
least recently used unpinned slot holding tables is evicted, and when every such slot is
pinned `pin` answers None like for slots (the request waits).

Runs under the registry's lock (every method assumes the caller holds it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from loraquilt.server.adapters.slots import LoraSlots

if TYPE_CHECKING:
    from loraquilt.server.adapters.record import AdapterRecord

TIER_DEVICE = "device"


class DeviceTier:
    def __init__(self, slots: LoraSlots, on_evict: Callable[[str], None],
                 on_bring_in: Callable[[AdapterRecord], None] = lambda record: None):
        """on_evict(tier) after an eviction; on_bring_in(record) before a record is copied in
        (the host tier counts it as used)."""
        self.slots = slots
        self._on_evict, self._on_bring_in = on_evict, on_bring_in
        self._owner: list[AdapterRecord | None] = [None] * slots.config.num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first

    def pin(self, records: list[AdapterRecord]) -> tuple[int, ...] | None:
        """Pin a slot for every record (each in host memory or already on the device), in
        their order; None when not enough slots can be freed now (nothing stays pinned)."""
        pinned = [r for r in records if r.slot is not None]
        for record in pinned:  # residents first, so loading the others cannot evict them
            self._lru.pop(record.slot, None)
            record.pins += 1
        # adapters with token tables first: each takes a head place (a free one, else an
        # evicted slot's); evicting a slot for a plain adapter frees no place they count on
        missing = sorted((r for r in records if r.slot is None), key=lambda r: not _has_heads(r))
        heads = self.slots.heads
        room_for_heads = heads.free + sum(1 for slot in self._lru if heads.holds(slot))
        if len(missing) > self._owner.count(None) + len(self._lru) or \
                sum(1 for r in missing if _has_heads(r)) > room_for_heads:
            self.unpin(pinned)
            return None
        try:
            for record in missing:
                self._bring_in(record)
                record.pins += 1
                pinned.append(record)
        except BaseException:
            self.unpin(pinned)
            raise
        return tuple(r.slot for r in records)

    def unpin(self, records: list[AdapterRecord]) -> None:
        for record in records:
            record.pins -= 1
            if record.pins == 0:
                if record.retired:
                    self.free(record)
                elif record.slot is not None:
                    self._lru[record.slot] = None

    def free(self, record: AdapterRecord) -> None:
        """Zero and release the record's slot, if it has one."""
        if record.slot is not None:
            self._lru.pop(record.slot, None)
            self.slots.clear(record.slot)
            self._owner[record.slot] = None
            record.slot = None

    def in_use(self) -> int:
        """Slots holding an adapter (registered, or unregistered and still pinned)."""
        return sum(owner is not None for owner in self._owner)

    def _bring_in(self, record: AdapterRecord) -> None:
        """Copy a host-resident adapter into a slot (a free one, else the LRU unpinned one)."""
        self._on_bring_in(record)
        if _has_heads(record) and not self.slots.heads.free:  # the LRU slot holding tables
            slot = self._evict(next(slot for slot in self._lru if self.slots.heads.holds(slot)))
        else:
            slot = self._owner.index(None) if None in self._owner else self._evict()
        self.slots.load(slot, record.host)
        self._owner[slot] = record
        record.slot = slot

    def _evict(self, slot: int | None = None) -> int:
        """Take an unpinned slot (`slot`, else the least recently used) from its owner."""
        if slot is None:
            slot, _ = self._lru.popitem(last=False)
        else:
            del self._lru[slot]
        owner = self._owner[slot]
        owner.slot = None
        self._owner[slot] = None
        self._on_evict(TIER_DEVICE)
        return slot


def _has_heads(record: AdapterRecord) -> bool:
    """Whether a record not on the device brings token tables (its host copy has them)."""
    return record.host is not None and record.host.heads is not None
