"""Per-request adapter merges: how a weighted mix of LoRA adapters becomes one adapter.

`MergeSpec` says how a mix is combined; `merge_adapters(members, weights, spec)` builds
the result as a `DerivedAdapter`, a `LoadedAdapter` (A [r, in], B [out, r] with the
scaling folded into B, per (layer, projection)) that the slots and the registry hold like
any adapter read from a PEFT folder. Pure torch on CPU, float32 compute.

Semantics:
- A member's delta on a module is ΔWᵢ = sᵢ·BᵢAᵢ (sᵢ its alpha/r or alpha/sqrt(r)), which
  is `module.b @ module.a` here. Only the members that target a module take part in it.
- Each method equals transformers + PEFT 0.21's `PeftModel.add_weighted_adapter(adapters,
  weights, name, combination_type=..., density=..., svd_rank=...)` on the same members,
  with PEFT's defaults for everything else (majority_sign_method "total", svd_clamp None):

  | method        | PEFT combination_type | result per module                          |
  |---------------|-----------------------|--------------------------------------------|
  | `linear`      | `cat`                 | Σ wᵢ·ΔWᵢ exactly, rank Σ rᵢ (A, B stacked) |
  | `cat`         | `cat`                 | the same as `linear`                       |
  | `svd`         | `svd`                 | Σ wᵢ·ΔWᵢ, truncated SVD at the rank        |
  | `ties`        | `ties_svd`            | TIES over the ΔWᵢ, truncated SVD           |
  | `dare_linear` | `dare_linear_svd`     | DARE over the ΔWᵢ, summed, truncated SVD   |
  | `dare_ties`   | `dare_ties_svd`       | DARE then TIES over the ΔWᵢ, truncated SVD |

  PEFT's own `linear`, `ties`, `dare_linear` and `dare_ties` are not these: they combine
  the A factors and the B factors separately (each with weight sqrt(|wᵢ·sᵢ|)), so the
  result holds the cross terms BᵢAⱼ, depends on how each delta happens to be factored,
  and needs every member at the same rank. The methods here act on the deltas
  themselves, which PEFT does in its `*_svd` variants (and `linear` here is the exact sum
  the kernels compute in place, which is PEFT's `cat`).
- TIES (`ties`, `dare_ties`): every ΔWᵢ keeps its int(density·numel) largest-magnitude
  entries (`ties`) or a Bernoulli(density) random subset rescaled by 1/density (`dare_*`);
  the sign of each entry is elected from the sum of the pruned, *unweighted* deltas; the
  result is Σ wᵢ·ΔWᵢ over the members whose pruned entry has the elected sign, divided by
  how many of them there are (at least 1). `dare_linear` sums wᵢ·ΔWᵢ after the random
  pruning. density 1 prunes nothing and draws nothing.
- Rank of a derived adapter (`svd`, `ties`, `dare_*`): `spec.rank`, or the largest rank of
  any member's modules; a module never gets more than min(out, in) (nor, for `svd`,
  more than its members' ranks summed: the sum has no other components). B holds U·S and A
  holds Vᴴ of the SVD of the merged delta (PEFT: r = lora_alpha = rank, scaling 1).
- Randomness (`dare_*`): `seed` s means `torch.manual_seed(s)` immediately before PEFT's
  `add_weighted_adapter`. PEFT first injects the new adapter, which draws from the global
  generator for every module it targets (nn.Linear's init of A [rank, in] and B
  [out, rank], then kaiming init of A again, for init_lora_weights=True as PEFT saves it),
  then draws one Bernoulli mask of a module's delta shape per member, module by module in
  the model's order (layer by layer; q, k, v, o, gate, up, down), members in mix order.
  Those draws are replayed on a `torch.Generator` seeded with s; the global generator is
  not touched. A dare method given no seed uses 0, so that a mix is reproducible and
  cacheable by default.
- One member: PEFT turns any method into its `linear`, which for a single adapter is the
  adapter times its weight; so does this module (no pruning, no SVD, the member's rank).
- `linear` and `cat` need no derived adapter (`MergeSpec.derives` is False): the kernels
  compute the same sum from the members' own slots. `merge_adapters` still builds the
  concatenation for callers that want the mix as one adapter; its rank is the sum of the
  members' ranks.

Refused: DoRA members (a DoRA module's output is not B·A alone, and PEFT's
add_weighted_adapter merges only A and B). Not modelled: PEFT copies the first adapter's
use_rslora into the merged adapter's config, which then scales its delta by sqrt(rank)
instead of 1 (so PEFT's result changes with the members' order whenever the first one is
rsLoRA; here it never does); PEFT's default rank also counts r / rank_pattern values no
module of a member has; and an init_lora_weights other than true in the first member's
config would make other draws before the masks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loraquilt.server.adapters.peft_folder import LoadedAdapter, LoraModule
from loraquilt.server.model.config import PROJECTIONS
from loraquilt.server.request import RequestError

MERGE_METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # need a density in (0, 1]
RANDOM_METHODS = ("dare_linear", "dare_ties")  # draw masks: take a seed
DERIVED_METHODS = ("ties", "dare_linear", "dare_ties", "svd")  # truncated SVD, take a rank
PEFT_COMBINATION_TYPE = {
    "linear": "cat", "cat": "cat", "svd": "svd", "ties": "ties_svd",
    "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd",
}
DEFAULT_SEED = 0
MAX_SEED = 2**64  # exclusive, as torch.Generator.manual_seed and a request's seed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeSpec:
    """How a weighted mix of adapters is combined (see the module's Semantics).

    method: one of MERGE_METHODS. density: fraction of each delta kept, in (0, 1]; only
    and always for ties / dare_linear / dare_ties. seed: the dare methods' random masks
    (default 0); no other method takes one. rank: the derived adapter's rank (svd, ties,
    dare_*; default the members' largest rank)."""

    method: str = "linear"
    density: float | None = None
    seed: int | None = None
    rank: int | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in MERGE_METHODS:
            raise RequestError("merge.method", f"must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        if self.method in DENSITY_METHODS:
            if self.density is None:
                raise RequestError("merge.density", f"{self.method} needs a density in (0, 1]")
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise RequestError("merge.density", f"must be a number in (0, 1], got {self.density!r}")
            if not 0.0 < self.density <= 1.0:  # NaN fails this too
                raise RequestError("merge.density", f"must lie in (0, 1], got {self.density!r}")
            object.__setattr__(self, "density", float(self.density))
        elif self.density is not None:
            raise RequestError("merge.density", f"{self.method} takes no density; only {', '.join(DENSITY_METHODS)} do")
        if self.method in RANDOM_METHODS:
            seed = DEFAULT_SEED if self.seed is None else self.seed
            if not _is_int(seed) or not 0 <= seed < MAX_SEED:
                raise RequestError("merge.seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
            object.__setattr__(self, "seed", seed)
        elif self.seed is not None:
            raise RequestError("merge.seed", f"{self.method} draws nothing at random; only "
                                       f"{', '.join(RANDOM_METHODS)} take a seed")
        if self.method in DERIVED_METHODS:
            if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
                raise RequestError("merge.rank", f"must be an integer >= 1, got {self.rank!r}")
        elif self.rank is not None:
            raise RequestError("merge.rank", f"{self.method} is exact and takes no rank; only "
                                       f"{', '.join(DERIVED_METHODS)} do")

    @property
    def derives(self) -> bool:
        """True when the mix needs a derived adapter (the in-kernel sum cannot compute it)."""
        return self.method in DERIVED_METHODS

    @property
    def peft_combination_type(self) -> str:
        """PEFT's add_weighted_adapter combination_type this method equals."""
        return PEFT_COMBINATION_TYPE[self.method]

    @property
    def key(self) -> str:
        """A stable text of every parameter that changes the result, for cache keys
        ("cat" is spelled "linear": same sum). Members and weights are not in it."""
        parts = ["linear" if self.method == "cat" else self.method]
        parts += [f"{name}={value!r}" for name, value in
                  (("density", self.density), ("seed", self.seed), ("rank", self.rank)) if value is not None]
        return ";".join(parts)


@dataclass(frozen=True)
class DerivedAdapter(LoadedAdapter):
    """A merge's result: a LoadedAdapter (path names the merge; nothing is on disk there;
    size_bytes is its weights' size) plus how it was made."""

    spec: MergeSpec = field(default_factory=MergeSpec)
    weights: tuple[float, ...] = ()  # one per member, in mix order
    member_hashes: tuple[str, ...] = ()  # the members' content_hash, in mix order


def merge_adapters(members: Sequence[LoadedAdapter], weights: Sequence[float], spec: MergeSpec = MergeSpec(),
                   *, max_rank: int | None = None, dtype: torch.dtype | None = None) -> DerivedAdapter:
    """Combine `members` with `weights` as `spec` says (see Semantics).

    max_rank: refuse (RequestError, before any work) a result whose rank would exceed it.
    dtype: of the result's tensors (default: the first member's). Raises RequestError for
    a mix that cannot be merged, ValueError for members of different base models.

    Cost: `svd`, `linear` and `cat` work on the factors (QR of the stacked A and B, an SVD
    of a Σr x Σr core). `ties` and `dare_*` form every member's dense delta and take a full
    SVD per module, as PEFT does: about 20 s for one 4096 x 4096 module on 2 cores, so a
    caller runs them off the engine's thread and caches the result by `spec.key`, members
    and weights."""
    if not members:
        raise RequestError("adapters", "a merge needs at least one adapter")
    if len(weights) != len(members):
        raise RequestError("adapters.weight", f"{len(weights)} weights for {len(members)} adapters")
    dora = [i for i, member in enumerate(members) if getattr(member, "magnitudes", None)]  # DoRA members
    if dora:
        raise RequestError("adapters", f"DoRA adapters cannot be merged (adapter {dora[0]} of the mix uses "
                                       "DoRA): their output depends on the base weights, not on B·A alone")
    weights = tuple(float(w) for w in weights)
    if not all(math.isfinite(w) for w in weights):
        raise RequestError("adapters.weight", f"weights must be finite, got {weights}")
    dtype = dtype or next(iter(members[0].modules.values())).a.dtype
    keys = _module_keys(members)
    ranks = _result_ranks(members, keys, spec)
    if max_rank is not None and max(ranks.values()) > max_rank:
        name = "merge.rank" if spec.rank is not None else "adapters"
        raise RequestError(name, f"the merged adapter's rank {max(ranks.values())} is over the server's "
                                 f"max LoRA rank {max_rank}")

    if len(members) == 1:
        merged = {key: (members[0].modules[key].a.float(), members[0].modules[key].b.float() * weights[0])
                  for key in keys}
    elif not spec.derives:
        merged = {key: _concatenate(members, weights, key) for key in keys}
    else:
        generator = None
        if spec.method in RANDOM_METHODS and spec.density < 1.0:
            generator = torch.Generator().manual_seed(spec.seed)
            _replay_injection_draws(generator, members, keys, spec.rank or max(m.rank for m in members))
        merged = {}
        for key in keys:  # model order: the order PEFT draws masks in
            present = [(m.modules[key], w) for m, w in zip(members, weights) if key in m.modules]
            if spec.method == "svd":
                merged[key] = _truncate(*_low_rank_sum(present), ranks[key])
            else:
                merged[key] = _leading_components(_combine_deltas(present, spec, generator), ranks[key])
    return _build(merged, members, weights, spec, dtype)


# -- shapes and ranks --------------------------------------------------------------------


def _module_keys(members: Sequence[LoadedAdapter]) -> list[tuple[int, str]]:
    """Every (layer, projection) some member targets, in the model's module order; each
    module's shape checked to agree across members."""
    shapes: dict[tuple[int, str], tuple[int, int]] = {}
    for member in members:
        for key, module in member.modules.items():
            shape = (int(module.b.shape[0]), int(module.a.shape[1]))  # (out, in)
            if shapes.setdefault(key, shape) != shape:
                raise ValueError(f"adapters disagree on layer {key[0]} {key[1]}: (out, in) {shapes[key]} "
                                 f"and {shape}; they were made for different base models")
    return sorted(shapes, key=lambda key: (key[0], PROJECTIONS.index(key[1])))


def _result_ranks(members: Sequence[LoadedAdapter], keys, spec: MergeSpec) -> dict[tuple[int, str], int]:
    if len(members) == 1:
        return {key: members[0].modules[key].rank for key in keys}
    if not spec.derives:
        return {key: sum(m.modules[key].rank for m in members if key in m.modules) for key in keys}
    rank = spec.rank or max(m.rank for m in members)
    ranks = {}
    for key in keys:
        module = next(m.modules[key] for m in members if key in m.modules)
        ranks[key] = min(rank, int(module.b.shape[0]), int(module.a.shape[1]))
    return ranks


# -- the math, per module (float32) ------------------------------------------------------


def _concatenate(members, weights, key) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's cat: A rows and B columns stacked, weights on A; exact Σ wᵢ·BᵢAᵢ."""
    present = [(m.modules[key], w) for m, w in zip(members, weights) if key in m.modules]
    a = torch.cat([module.a.float() * w for module, w in present], dim=0)  # [Σr, in]
    b = torch.cat([module.b.float() for module, _ in present], dim=1)  # [out, Σr]
    return a, b


def _low_rank_sum(present: list[tuple[LoraModule, float]]):
    """SVD of Σ wᵢ·BᵢAᵢ without forming it: QR of the stacked factors, SVD of the small
    core. Returns U [out, k], S [k], Vh [k, in], k = min(out, in, Σr)."""
    b = torch.cat([module.b.float() * w for module, w in present], dim=1)  # [out, R]
    a = torch.cat([module.a.float() for module, _ in present], dim=0)  # [R, in]
    q_b, r_b = torch.linalg.qr(b)  # [out, k_b], [k_b, R]
    q_a, r_a = torch.linalg.qr(a.T)  # [in, k_a], [k_a, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [k_b, k], [k], [k, k_a]
    return q_b @ u, s, vh @ q_a.T


def _combine_deltas(present: list[tuple[LoraModule, float]], spec: MergeSpec,
                    generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's ties / dare_linear / dare_ties (merge_utils) on the members' deltas: [out, in]."""
    deltas = [module.b.float() @ module.a.float() for module, _ in present]  # each [out, in]
    density = spec.density
    if density < 1.0:
        if spec.method == "ties":
            deltas = [_keep_largest(delta, density) for delta in deltas]
        else:
            deltas = [delta * torch.bernoulli(torch.full_like(delta, density), generator=generator) / density
                      for delta in deltas]
    weights = [w for _, w in present]
    if spec.method == "dare_linear":
        return sum(delta * w for delta, w in zip(deltas, weights))
    elected = (sum(deltas) >= 0).to(deltas[0].dtype).mul_(2).sub_(1)  # [out, in]: ±1, the unweighted sum's sign
    total = torch.zeros_like(elected)  # [out, in]: Σ wᵢ·|ΔWᵢ| over the members agreeing with it
    count = torch.zeros_like(elected)  # [out, in]: how many agree (pruned zeros never do)
    for delta, weight in zip(deltas, weights):
        aligned = (delta * elected).clamp_(min=0)  # |ΔWᵢ| where its sign is the elected one, else 0
        total.add_(aligned, alpha=weight)
        count.add_(aligned > 0)
    return total.mul_(elected).div_(count.clamp_(min=1.0))


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density·numel) largest-magnitude entries of delta, the rest zero (PEFT takes
    them with topk; the k-th largest magnitude as a threshold keeps the same entries
    unless magnitudes tie at it; numpy's partition finds it 10x faster than torch's
    kthvalue or topk on CPU)."""
    keep = int(density * delta.numel())
    if keep == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs()
    flat = magnitude.reshape(-1).numpy()
    threshold = float(np.partition(flat, flat.size - keep)[flat.size - keep])
    return delta * (magnitude >= threshold)


def _leading_components(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [out, k]) with B·A the k = min(rank, out, in) leading singular
    components of delta [out, in]: A = V_kᵀ, B = U_k·S_k, as PEFT's truncated SVD gives
    them (up to each component's sign, which B·A does not see). Computed from the
    eigenvectors of the smaller Gram matrix (a symmetric eigenproblem of min(out, in), a
    few times faster than the full SVD PEFT takes)."""
    out_features, in_features = delta.shape
    k = min(rank, out_features, in_features)
    if in_features <= out_features:
        _, vectors = torch.linalg.eigh(delta.T @ delta)  # [in, in], ascending eigenvalues
        v = vectors[:, -k:].flip(-1)  # [in, k]
        return v.T.contiguous(), delta @ v  # V_kᵀ, U_k·S_k
    _, vectors = torch.linalg.eigh(delta @ delta.T)  # [out, out]
    u = vectors[:, -k:].flip(-1)  # [out, k]
    scaled = u.T @ delta  # [k, in] = S_k·V_kᵀ
    norms = scaled.norm(dim=1, keepdim=True).clamp_min(torch.finfo(delta.dtype).tiny)  # [k, 1]
    return (scaled / norms).contiguous(), u * norms.T


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [out, k]) = (Vh, U·S) of the leading k = min(rank, len(S)) components."""
    k = min(rank, s.shape[0])
    return vh[:k].contiguous(), u[:, :k] * s[:k]


def _replay_injection_draws(generator: torch.Generator, members, keys, rank: int) -> None:
    """The global-generator draws PEFT's add_weighted_adapter makes before its first mask:
    per module it injects the new adapter into, nn.Linear(in, rank) and nn.Linear(rank, out)
    initialise their weights, then LoRA's kaiming init redraws A."""
    for key in keys:
        module = next(m.modules[key] for m in members if key in m.modules)
        out_features, in_features = int(module.b.shape[0]), int(module.a.shape[1])
        for shape in ((rank, in_features), (out_features, rank), (rank, in_features)):
            torch.empty(shape).uniform_(generator=generator)


# -- the result --------------------------------------------------------------------------


def _build(merged: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], members, weights, spec: MergeSpec,
           dtype: torch.dtype) -> DerivedAdapter:
    """One flat buffer of `dtype` holding every module's A then B, as load_peft_adapter
    lays an adapter out, and its content hash computed the same way."""
    flat = torch.empty(sum(a.numel() + b.numel() for a, b in merged.values()), dtype=dtype)
    modules: dict[tuple[int, str], LoraModule] = {}
    offset = 0
    for key, (a, b) in merged.items():
        module_a = flat[offset : offset + a.numel()].view(a.shape)  # [r, in]
        offset += a.numel()
        module_b = flat[offset : offset + b.numel()].view(b.shape)  # [out, r]
        offset += b.numel()
        module_a.copy_(a)
        module_b.copy_(b)
        modules[key] = LoraModule(a=module_a, b=module_b)
    if not bool(torch.isfinite(flat).all()):
        raise RequestError("adapters.weight", f"the merged adapter overflows {str(dtype).removeprefix('torch.')}")
    digest = hashlib.blake2b(digest_size=16)
    for (layer, proj), module in modules.items():
        digest.update(f"{layer}.{proj}:{tuple(module.a.shape)}:{tuple(module.b.shape)};".encode())
    digest.update(str(dtype).encode())
    digest.update(flat.view(torch.uint8).numpy().data)
    content_hash = digest.hexdigest()
    return DerivedAdapter(
        path=Path(f"merge:{content_hash}"),
        rank=max(module.rank for module in modules.values()),
        target_modules=tuple(p for p in PROJECTIONS if any(proj == p for _, proj in modules)),
        modules=modules,
        size_bytes=flat.numel() * flat.element_size(),
        content_hash=content_hash,
        spec=spec,
        weights=tuple(weights),
        member_hashes=tuple(m.content_hash for m in members),
    )
