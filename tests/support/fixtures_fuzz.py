"""The fuzzing harness of tests/server/fuzz: profiles, the runner that checks the
invariants around every target (canaries, registry, files opened), the documented answers,
and the strategies the targets share.

Profiles: the default suite runs `ci` (fixed, derandomized examples), `-m slow` runs `slow`
with more examples per target."""

from __future__ import annotations

import os
import sys
from collections import Counter
from itertools import count
from pathlib import Path

import grpc
import pytest
from fixtures_live import BASE_ID, CLIENT_CODES, CLIENT_HTTP, NON_FINITE
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from loraquilt.server.adapters.peft_folder import CONFIG_FILE

EXAMPLES = {"ci": 100, "slow": 1000}
PROFILES = [pytest.param("ci", id="ci"), pytest.param("slow", id="slow", marks=pytest.mark.slow)]
CANARY_EVERY = 10  # examples between canary checks (and once after the last)
PROTECTED = {"a0", "a1"}  # the canary's adapter and its neighbour: never unregistered by the fuzz


class OpenWatch:
    """Records every file opened (Python's `open` audit event) under a folder while armed."""

    def __init__(self, folder: Path):
        self.folder = str(folder.resolve())
        self.opened: list[str] = []
        self.armed = False
        sys.addaudithook(self._hook)  # audit hooks cannot be removed: disarmed at the fixture's teardown

    def _hook(self, event: str, args) -> None:
        if self.armed and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, Path)):
            path = os.path.realpath(args[0]) if isinstance(args[0], str) else str(Path(args[0]).resolve())
            if path.startswith(self.folder):
                self.opened.append(path)


def fuzz(strategy, check, profile: str, live) -> Counter:
    """Run `check` on `profile`'s examples of `strategy`; the canaries every CANARY_EVERY
    examples and after the last; no file outside the adapter root opened meanwhile.
    `check` returns the outcome of an example ("ok", a status, "skipped"); returns their
    tally (printed with -s)."""
    examples = count(1)
    outcomes: Counter = Counter()

    @settings(max_examples=EXAMPLES[profile], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @given(strategy)
    def run(value):
        outcomes[check(value) or "skipped"] += 1
        if next(examples) % CANARY_EVERY == 0:
            live.assert_canaries()

    live.watch.armed = True
    try:
        run()
    finally:
        live.watch.armed = False
    print(f"{profile}: {next(examples) - 1} examples, outcomes {dict(outcomes.most_common())}")
    live.assert_canaries()
    assert live.adapter_names() == live.expected
    assert not live.watch.opened, f"opened outside the adapter root: {live.watch.opened[:5]}"
    for record in live.server.admin.records():
        assert record.path.resolve().is_relative_to(live.root.resolve()), record
    return outcomes


def assert_client_error(code: grpc.StatusCode, details: str, what, method: str = "") -> str:
    """The outcome's name, once it is a documented client error."""
    if code == grpc.StatusCode.INTERNAL and NON_FINITE in details:
        return "internal-non-finite"  # the documented answer to weights that overflow the logits
    assert code in CLIENT_CODES, f"{code} {details!r} for {what!r}"
    if not (method == "/grpc.health.v1.Health/Check" and code == grpc.StatusCode.NOT_FOUND):
        # (the health protocol answers a service it does not know without a message)
        assert details, f"{code} without a message for {what!r}"
    return code.name


# -- strategies ------------------------------------------------------------------------------------

UTF8_TEXT = st.characters(exclude_categories=("Cs",))  # protobuf strings are UTF-8: no surrogates
FLOATS32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-30, 3.4e38, -1.0]))
TEXTS = st.one_of(
    st.text(UTF8_TEXT, max_size=40),
    st.sampled_from(["", "The river", "\x00", "\u202e\u200b", "🙂" * 30, "\n" * 20, "<|im_start|>", "a" * 5000]),
)
NAMES = st.one_of(
    st.sampled_from(["a0", "a1", "f0", "f1", "f2", BASE_ID, "", ".", "..", "a0/..", "A" * 128, "A" * 129, "a0\n"]),
    st.text(UTF8_TEXT, max_size=20),
)
PATHS = st.one_of(
    st.sampled_from(["adapter-0", "adapter-1", "./adapter-1/", "adapter-0/../adapter-1", "../outside/adapter",
                     "adapter-0/../../outside/adapter", "link-out", "link-out/", "config-link", "mixed-links",
                     "/", "/etc", "/proc/self/cwd", "~", "", ".", "..", "nonexistent", "adapter-0/" + CONFIG_FILE,
                     "a" * 2000, "adapter-0\x00", "%2e%2e/outside"]),
    st.text(UTF8_TEXT, max_size=30),
)


DROP = object()  # a hostile "value" that leaves the key out


def perturbed(valid: dict, hostile: dict, max_changes: int = 2):
    """A valid request (`valid`: key -> strategy of good values, an absent key left out)
    with up to `max_changes` of its keys given hostile values: most examples pass the
    first check they meet and reach the deeper ones (the engine, the registry), instead of
    almost every example stopping at its first bad field."""
    def with_changes(pair):
        base, keys = pair
        return st.fixed_dictionaries({key: hostile[key] for key in keys}).map(
            lambda changes: {key: value for key, value in {**base, **changes}.items() if value is not DROP})

    valid_dicts = st.fixed_dictionaries({key: value for key, value in valid.items()})
    changed_keys = st.lists(st.sampled_from(sorted(hostile)), max_size=max_changes, unique=True)
    return st.tuples(valid_dicts, changed_keys).flatmap(with_changes)


# names free to register, and paths of good adapters under the root
FREE_NAMES = st.sampled_from(["f0", "f1", "f2", "f3"])
GOOD_PATHS = st.sampled_from(["adapter-0", "adapter-1", "./adapter-1/", "adapter-0/../adapter-1"])


# JSON text may carry lone surrogates ("\ud800" escapes); hypothesis leaves them out unless asked
JSON_TEXT = st.text(st.characters(categories=("Cs", "Lu", "Ll", "Lo", "Nd", "Po", "Zs", "Cc", "So")), max_size=20)
HUGE_NUMBERS = st.sampled_from([10**309, -(10**309), 10**400, 2**64, 2**63, -(2**63) - 1, 1e308, -1e308, 5e-324])
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), HUGE_NUMBERS,
    st.floats(allow_nan=False, allow_infinity=False), JSON_TEXT,
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3)), max_leaves=8)


def assert_http_answer(status: int, body, what) -> str:
    """The outcome's name ("ok", "400", ...), once it is a success or a documented client error."""
    if status == 500 and isinstance(body, dict) and NON_FINITE in str(body.get("error", {}).get("message")):
        return "500-non-finite"
    assert status == 200 or status in CLIENT_HTTP, f"{status} {str(body)[:300]!r} for {str(what)[:300]!r}"
    if status >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
        assert body["error"].get("message") and "param" in body["error"], body
    return "ok" if status == 200 else str(status)
