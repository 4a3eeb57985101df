"""The moving parts of `loraquilt torture`: what each request asks for and the answer it
must get, the clients that send them, the live window of cycled adapters, and the tally
of every outcome.

Greedy answers depend on the weights behind a name, not on the name, so references are
keyed by weights: "base", "stable-3", "mix-1", "pool-7"; the cycled adapter
`cycle-000123` carries the weights of pool folder 123 % pool size.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from loraquilt.bench.server_side import percentile
from loraquilt.client import LoraQuiltClient

# request kinds and how often clients pick each
KIND_WEIGHTS = {"base": 0.10, "stable": 0.32, "mix": 0.16, "cycled": 0.40, "unknown": 0.02}
# share of streamed requests; a cycled adapter can be unregistered at its first token (not
# its last), so streaming them keeps the cycle rate up while the request runs on, pinned
STREAMED_SHARE = {"cycled": 0.8}
UNKNOWN_ADAPTER = "never-registered"  # deliberately bad requests name this
MIX_WEIGHTS = ((0.5, 0.5), (0.75, 0.25), (0.3, 0.7))
EXAMPLES_KEPT = 10

References = dict[tuple[str, int], tuple[int, ...]]  # (weights key, prompt index) -> greedy token ids


@dataclass(frozen=True)
class Target:
    """What one request asks for: the base model, one adapter, or a weighted mix."""

    kind: str  # a KIND_WEIGHTS key
    weights: str  # reference key; "" for deliberately bad requests
    adapter: str = ""
    mix: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TrafficPlan:
    prompts: tuple[str, ...]
    prompt_choices: dict[str, tuple[int, ...]]  # weights key -> prompt indices sent with it
    stable: tuple[Target, ...]
    mixes: tuple[Target, ...]
    pool_size: int  # weight folders behind the cycled adapters
    max_new_tokens: int

    def reference_jobs(self) -> list[tuple[str, int]]:
        return [(key, index) for key, indices in self.prompt_choices.items() for index in indices]


def build_plan(prompts: list[str], stable_adapters: int, pool_size: int, prompts_per_target: int,
               max_new_tokens: int, seed: int) -> TrafficPlan:
    rng = random.Random(seed)
    stable = tuple(Target("stable", f"stable-{i}", adapter=f"stable-{i}") for i in range(stable_adapters))
    mixes = tuple(
        Target("mix", f"mix-{j}", mix=((f"stable-{2 * j}", MIX_WEIGHTS[j % 3][0]),
                                       (f"stable-{2 * j + 1}", MIX_WEIGHTS[j % 3][1])))
        for j in range(stable_adapters // 2))
    per_target = min(prompts_per_target, len(prompts))
    choices = {key: tuple(rng.sample(range(len(prompts)), per_target))
               for key in ["base", *(t.weights for t in stable + mixes)]}
    # a cycled adapter lives for a few requests: one prompt per pool folder keeps the references cheap
    choices.update({f"pool-{k}": (rng.randrange(len(prompts)),) for k in range(pool_size)})
    return TrafficPlan(tuple(prompts), choices, stable, mixes, pool_size, max_new_tokens)


def send(client: LoraQuiltClient, target: Target, prompt: str, max_new_tokens: int, stream: bool,
         on_first_token: Callable[[], None] = lambda: None) -> tuple[tuple[int, ...], str]:
    """One greedy request (EOS ignored); (token ids, finish reason). Raises grpc.RpcError."""
    options = dict(adapter=target.adapter, mix=list(target.mix), max_new_tokens=max_new_tokens,
                   ignore_eos=True)
    if not stream:
        response = client.generate(prompt, **options)
        return tuple(response.token_ids), response.finish_reason
    token_ids: list[int] = []
    finish = ""
    for piece in client.generate_stream(prompt, **options):
        if piece.token_ids and not token_ids:
            on_first_token()
        token_ids.extend(piece.token_ids)
        finish = piece.finish_reason or finish
    return tuple(token_ids), finish


class Tally:
    """Every traffic outcome, counted under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()  # by kind
        self.ok: Counter[str] = Counter()  # by kind
        self.streamed = 0
        self.deliberate: Counter[str] = Counter()  # by status
        self.deliberate_causes: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()  # by status ("OK" = a bad request was answered)
        self.unexpected_examples: list[dict] = []
        self.mismatches = 0
        self.mismatch_examples: list[dict] = []
        self.latencies_s: list[float] = []  # answered requests

    def on_sent(self, kind: str, stream: bool) -> None:
        with self._lock:
            self.sent[kind] += 1
            self.streamed += stream

    def on_answer(self, kind: str, seconds: float, mismatch: dict | None) -> None:
        with self._lock:
            self.ok[kind] += 1
            self.latencies_s.append(seconds)
            if mismatch is not None:
                self.mismatches += 1
                if len(self.mismatch_examples) < EXAMPLES_KEPT:
                    self.mismatch_examples.append(mismatch)

    def on_deliberate(self, status: str, cause: str) -> None:
        with self._lock:
            self.deliberate[status] += 1
            self.deliberate_causes[cause] += 1

    def on_unexpected(self, status: str, where: str, detail: str) -> None:
        with self._lock:
            self.unexpected[status] += 1
            if len(self.unexpected_examples) < EXAMPLES_KEPT:
                self.unexpected_examples.append({"status": status, "where": where, "detail": detail[:300]})

    def line(self) -> str:
        with self._lock:
            return (f"{sum(self.sent.values())} requests (ok {sum(self.ok.values())}, deliberate "
                    f"{sum(self.deliberate.values())}, unexpected {sum(self.unexpected.values())}, "
                    f"mismatches {self.mismatches})")

    def summary(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.sent.values()),
                "ok": sum(self.ok.values()),
                "streamed": self.streamed,
                "by_kind": {kind: {"sent": self.sent[kind], "ok": self.ok[kind]} for kind in KIND_WEIGHTS},
                "errors_by_status": {"deliberate": dict(self.deliberate), "unexpected": dict(self.unexpected)},
                "deliberate_by_cause": dict(self.deliberate_causes),
                "unexpected_examples": list(self.unexpected_examples),
                "mismatches": self.mismatches,
                "mismatch_examples": list(self.mismatch_examples),
                "latency_ms": {"p50": percentile(self.latencies_s, 50) * 1e3,
                               "p99": percentile(self.latencies_s, 99) * 1e3},
            }


@dataclass
class _Cycled:
    name: str
    weights: str
    registered_at: float
    sends: int = 0
    used: bool = False  # a request on it produced a token
    retiring: bool = False  # unregister sent (or about to be)


@dataclass
class CycleCounts:
    registered: int = 0
    done: int = 0  # registered, then unregistered
    used: int = 0  # of those done, traffic got at least one token from it
    unused: int = 0  # of those done, retired after the patience ran out without a token


class CycledAdapters:
    """`cycles` distinct adapter names, `window` registered at a time: each new one gets
    traffic first (clients pick the least-sent live name); the oldest is unregistered
    once a request on it produced a token, while other requests on it may still be
    queued (NOT_FOUND, deliberate) or running (they must finish on its weights)."""

    def __init__(self, admin: LoraQuiltClient, folders: list[str], window: int, patience_s: float,
                 tally: Tally):
        self.admin, self.folders, self.window = admin, folders, window
        self.patience_s, self.tally = patience_s, tally
        self.counts = CycleCounts()
        self._live: deque[_Cycled] = deque()
        self._all: dict[str, _Cycled] = {}
        self._changed = threading.Condition()

    def pick(self, rng: random.Random) -> tuple[str, str] | None:
        """(name, weights key) of a live cycled adapter, the least-sent first; None if none."""
        with self._changed:
            candidates = [c for c in self._live if not c.retiring]
            if not candidates:
                return None
            fewest = min(c.sends for c in candidates)
            chosen = rng.choice([c for c in candidates if c.sends == fewest])
            chosen.sends += 1
            return chosen.name, chosen.weights

    def mark_used(self, name: str) -> None:
        with self._changed:
            self._all[name].used = True
            self._changed.notify_all()

    def is_retiring(self, name: str) -> bool:
        with self._changed:
            return self._all[name].retiring

    def run(self, cycles: int, stop: threading.Event) -> None:
        """The cycler thread: register and unregister `cycles` names, then retire the rest."""
        try:
            for index in range(cycles):
                while len(self._live) >= self.window and not stop.is_set():
                    self._retire_oldest(stop)
                if stop.is_set():
                    break
                self._register(index)
            while self._live and not stop.is_set():
                self._retire_oldest(stop)
        finally:
            while self._live:  # stopped early: unregister what is left without waiting
                self._retire_oldest(stop)

    def _register(self, index: int) -> None:
        name, folder = f"cycle-{index:06d}", self.folders[index % len(self.folders)]
        try:
            self.admin.register_adapter(name, folder)
        except grpc.RpcError as error:
            self.tally.on_unexpected(error.code().name, f"RegisterAdapter {name}", error.details() or "")
            return
        entry = _Cycled(name, f"pool-{index % len(self.folders)}", time.monotonic())
        with self._changed:
            self._all[name] = entry
            self._live.append(entry)
            self.counts.registered += 1

    def _retire_oldest(self, stop: threading.Event) -> None:
        oldest = self._live[0]
        deadline = oldest.registered_at + self.patience_s
        with self._changed:
            while not oldest.used and not stop.is_set() and time.monotonic() < deadline:
                self._changed.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            oldest.retiring = True
            self._live.popleft()
        try:
            self.admin.unregister_adapter(oldest.name)
        except grpc.RpcError as error:
            self.tally.on_unexpected(error.code().name, f"UnregisterAdapter {oldest.name}", error.details() or "")
            return
        with self._changed:
            self.counts.done += 1
            if oldest.used:
                self.counts.used += 1
            else:
                self.counts.unused += 1


@dataclass
class TrafficClients:
    """`count` client threads sending a random mix of requests until `stop` is set."""

    client: LoraQuiltClient
    plan: TrafficPlan
    references: References
    cycled: CycledAdapters
    tally: Tally
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self, count: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(index,), name=f"torture-client-{index}", daemon=True)
                   for index in range(count)]
        for thread in threads:
            thread.start()
        return threads

    def _choose(self, rng: random.Random) -> Target:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        if kind == "cycled":
            picked = self.cycled.pick(rng)
            if picked is not None:
                return Target("cycled", picked[1], adapter=picked[0])
            kind = "stable"
        if kind == "mix" and self.plan.mixes:
            return rng.choice(self.plan.mixes)
        if kind in ("stable", "mix") and self.plan.stable:
            return rng.choice(self.plan.stable)
        if kind == "unknown":
            return Target("unknown", "", adapter=UNKNOWN_ADAPTER)
        return Target("base", "base")

    def _loop(self, index: int) -> None:
        rng = random.Random(self.seed * 7919 + index)
        while not self.stop.is_set():
            target = self._choose(rng)
            choices = self.plan.prompt_choices.get(target.weights) or range(len(self.plan.prompts))
            prompt_index = rng.choice(choices)
            stream = rng.random() < STREAMED_SHARE.get(target.kind, 0.5)
            self.tally.on_sent(target.kind, stream)
            mark = (lambda: self.cycled.mark_used(target.adapter)) if target.kind == "cycled" else (lambda: None)
            started = time.perf_counter()
            try:
                token_ids, finish = send(self.client, target, self.plan.prompts[prompt_index],
                                         self.plan.max_new_tokens, stream, mark)
            except grpc.RpcError as error:
                self._on_error(target, error)
                continue
            seconds = time.perf_counter() - started
            if target.kind == "unknown":
                self.tally.on_unexpected("OK", f"request for unregistered {UNKNOWN_ADAPTER!r}", "it was answered")
                continue
            mark()
            expected = self.references[(target.weights, prompt_index)]
            mismatch = None
            if token_ids != expected or finish != "length":
                mismatch = {"weights": target.weights, "adapter": target.adapter, "mix": target.mix,
                            "prompt": prompt_index, "stream": stream, "finish_reason": finish,
                            "got": list(token_ids), "expected": list(expected)}
            self.tally.on_answer(target.kind, seconds, mismatch)

    def _on_error(self, target: Target, error: grpc.RpcError) -> None:
        status = error.code().name
        if status == "NOT_FOUND" and target.kind == "unknown":
            self.tally.on_deliberate(status, "unknown_adapter")
        elif status == "NOT_FOUND" and target.kind == "cycled" and self.cycled.is_retiring(target.adapter):
            self.tally.on_deliberate(status, "cycled_adapter_unregistered")
        else:
            where = f"{target.kind} request ({target.adapter or target.mix or 'base'})"
            self.tally.on_unexpected(status, where, error.details() or "")
