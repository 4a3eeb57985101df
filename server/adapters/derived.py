"""Derived adapters: a non-linear merge of registered adapters (TIES, DARE, SVD; see
merge.py), made into an adapter the tiers hold like any other.

Semantics:
- A derived adapter is identified by its members' content hashes and weights, in mix
  order, and the merge's parameters (`MergeSpec.key`): `derived_identity`. Its record's
  name is "~merge-" + the first 16 hex digits of that hash (a name no caller can register
  or ask for: "~" is not allowed in adapter names), its content_hash the whole hash, so
  its prefix-cache blocks and slots are shared by every request asking for the same
  merge and by no other (other weights, parameters or member files hash differently).
- Its weights are built at first use, on the registry's loader thread (no step waits on
  it), from the members' host copies or their files; it is then held in the host tier,
  evicted LRU like a read adapter, and built again when asked for after that.
- Unregistering a member drops the derived adapters it is in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.adapters.merge import MergeSpec, merge_adapters
from loraquilt.server.adapters.mix_rules import check_mergeable
from loraquilt.server.adapters.peft_folder import LoadedAdapter
from loraquilt.server.adapters.record import AdapterRecord
from loraquilt.server.request import RequestError

DERIVED_PREFIX = "~merge-"


@dataclass(frozen=True)
class DerivedSource:
    """How a derived adapter's weights are made: its members (registry records), their
    weights in mix order, and the merge."""

    members: tuple[AdapterRecord, ...]
    weights: tuple[float, ...]
    spec: MergeSpec

    def involves(self, record: AdapterRecord) -> bool:
        return any(member is record for member in self.members)


def derived_identity(members, weights, spec: MergeSpec) -> str:
    """The content hash of a merge: its members' content hashes with their weights, in mix
    order, and the merge's parameters."""
    digest = hashlib.sha256(f"merge\0{spec.key}".encode())
    for member, weight in zip(members, weights):
        digest.update(f"\0{member.content_hash}*{float(weight)!r}".encode())
    return digest.hexdigest()


def derived_name(identity: str) -> str:
    return DERIVED_PREFIX + identity[:16]


def derived_record(members: tuple[AdapterRecord, ...], weights: tuple[float, ...], spec: MergeSpec,
                   max_rank: int) -> AdapterRecord:
    """The record of the merge of these members (plain LoRA adapters only: RequestError
    otherwise, or for a rank over max_rank), weights not built yet."""
    check_mergeable(members)
    rank = spec.rank or max(member.rank for member in members)
    if rank > max_rank:
        raise RequestError("merge.rank" if spec.rank else "adapters",
                           f"the merged adapter's rank {rank} is over the server's max LoRA rank {max_rank} "
                           "(--max-lora-rank)")
    identity = derived_identity(members, weights, spec)
    name = derived_name(identity)
    targets = tuple(sorted({module for member in members for module in member.target_modules}))
    return AdapterRecord(name=name, path=Path(name), rank=rank, target_modules=targets, size_bytes=0,
                         content_hash=identity, derived=DerivedSource(members, weights, spec))


def build_derived(source: DerivedSource, host_copies: list[LoadedAdapter | None],
                  read_member: Callable[[AdapterRecord], LoadedAdapter], *, max_rank: int, dtype) -> LoadedAdapter:
    """The merged adapter's weights (on the loader thread): members on host are used as
    they are, the others read from their files (read_member checks they did not change)."""
    loaded = [copy if copy is not None else read_member(member)
              for member, copy in zip(source.members, host_copies)]
    return merge_adapters(loaded, source.weights, source.spec, max_rank=max_rank, dtype=dtype)
