"""Property-based fuzzing of both transports and of adapter folders, against one real
server (fixtures_live: a tiny random Llama on 127.0.0.1, gRPC + HTTP, an admin token).

Targets: every field of Generate / GenerateStream and of the admin RPCs (protobuf-valid
values: huge and negative numbers, NaN and infinities, empty / huge / unicode / control
strings, traversal and symlink paths, mixes with duplicates); raw random bytes per RPC;
random JSON bodies for every HTTP route (wrong types, unknown keys, deep nesting, huge
numbers); random methods, paths, content types, headers and non-JSON bodies; random
adapter folders (a good PEFT folder with its config mutated or its safetensors truncated,
corrupted or mislabelled).

Properties, for every example: the answer is a success of the right shape or a
documented client error (gRPC: fixtures_live.CLIENT_CODES; HTTP: 4xx with an OpenAI error
body; INTERNAL / 500 only for the documented non-finite-logits answer); the server stays
up and its greedy canaries (base and an adapter, both transports) are identical before,
during and after; the registry holds exactly the adapters legitimately registered; no
file outside the adapter root is opened.

Profiles: the default suite runs `ci` (fixed, derandomized examples; about a minute), `-m
slow` runs `slow` with 300 examples per target.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections import Counter
from itertools import count
from pathlib import Path

import grpc
import pytest
from fixtures_live import (
    BASE_ID, CLIENT_CODES, CLIENT_HTTP, NEW_TOKENS_LIMIT, NON_FINITE, RPC_REQUESTS, SERVICE, start_live, stop_live,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from loraquilt.v1 import loraquilt_pb2 as pb

EXAMPLES = {"ci": 100, "slow": 1000}
PROFILES = [pytest.param("ci", id="ci"), pytest.param("slow", id="slow", marks=pytest.mark.slow)]
CANARY_EVERY = 10  # examples between canary checks (and once after the last)
FINISH_REASONS = {"length", "stop", "eos", "cancelled"}
PROTECTED = {"a0", "a1"}  # the canary's adapter and its neighbour: never unregistered by the fuzz
_folders = count()


# -- the server and the invariants -------------------------------------------------------------

class OpenWatch:
    """Records every file opened (Python's `open` audit event) under a folder while armed."""

    def __init__(self, folder: Path):
        self.folder = str(folder.resolve())
        self.opened: list[str] = []
        self.armed = False
        sys.addaudithook(self._hook)  # audit hooks cannot be removed: disarmed after the module

    def _hook(self, event: str, args) -> None:
        if self.armed and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, Path)):
            path = os.path.realpath(args[0]) if isinstance(args[0], str) else str(Path(args[0]).resolve())
            if path.startswith(self.folder):
                self.opened.append(path)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("fuzz"), seed=11)
    os.symlink(live.outside, live.root / "link-out")  # a link inside the root to a folder outside it
    os.symlink(live.outside / CONFIG_FILE, live.root / "config-link")
    mixed = live.root / "mixed-links"  # a folder inside whose config links outside
    mixed.mkdir()
    os.symlink(live.outside / CONFIG_FILE, mixed / CONFIG_FILE)
    shutil.copy(live.good / WEIGHTS_FILE, mixed / WEIGHTS_FILE)
    live.watch = OpenWatch(live.outside.parent)
    live.expected = live.adapter_names()
    yield live
    live.watch.armed = False
    stop_live(live)


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


VALID_MIX = st.lists(st.builds(pb.AdapterWeight, name=st.sampled_from(["a0", "a1"]), weight=st.floats(0.125, 2.0,
                                                                                                     width=32)),
                     min_size=1, max_size=2, unique_by=lambda entry: entry.name)
GENERATE = perturbed(
    valid={"prompt": st.text(UTF8_TEXT, min_size=1, max_size=30), "max_new_tokens": st.integers(0, NEW_TOKENS_LIMIT),
           "temperature": st.sampled_from([0.0, 0.7, 1.0]), "top_p": st.sampled_from([0.0, 0.9, 1.0]),
           "top_k": st.sampled_from([0, 1, 40]), "stop": st.lists(st.text(UTF8_TEXT, min_size=1, max_size=3),
                                                                  max_size=2),
           "chat": st.booleans(), "ignore_eos": st.booleans(),
           "adapter": st.sampled_from(["", "a0", "a1"]), "seed": st.integers(0, 2**64 - 1)},
    hostile={"prompt": TEXTS, "max_new_tokens": st.integers(0, 2**32 - 1), "temperature": FLOATS32,
             "top_p": FLOATS32, "top_k": st.integers(0, 2**32 - 1), "stop": st.lists(TEXTS, max_size=20),
             "adapter": NAMES, "adapters": st.one_of(VALID_MIX, st.lists(st.builds(
                 pb.AdapterWeight, name=NAMES, weight=FLOATS32), max_size=10))},
)


# -- gRPC: fields of Generate / GenerateStream -------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_generate_fields(live, profile):
    def check(case):
        fields, streamed = case
        request = pb.GenerateRequest(**fields)
        try:
            if streamed:
                pieces = list(live.stub.GenerateStream(request, timeout=60))
                assert pieces, fields
                final = pieces[-1]
                tokens = [t for piece in pieces for t in piece.token_ids]
            else:
                final = live.stub.Generate(request, timeout=60)
                tokens = list(final.token_ids)
        except grpc.RpcError as error:
            return assert_client_error(error.code(), error.details(), fields)
        assert final.finish_reason in FINISH_REASONS
        assert len(tokens) == final.completion_tokens <= NEW_TOKENS_LIMIT
        assert final.prompt_tokens > 0
        return "ok"

    outcomes = fuzz(st.tuples(GENERATE, st.booleans()), check, profile, live)
    assert outcomes["ok"] and outcomes["INVALID_ARGUMENT"], outcomes  # both sides of the validation reached


# -- gRPC: the admin RPCs ----------------------------------------------------------------------------

FREE_NAMES = st.sampled_from(["f0", "f1", "f2", "f3"])
GOOD_PATHS = st.sampled_from(["adapter-0", "adapter-1", "./adapter-1/", "adapter-0/../adapter-1"])
ADMIN_CALLS = st.one_of(
    st.tuples(st.just("register"), FREE_NAMES, GOOD_PATHS),
    st.tuples(st.just("register"), st.one_of(FREE_NAMES, NAMES), PATHS),
    st.tuples(st.just("unregister"), st.one_of(FREE_NAMES, NAMES), st.just("")),
)


def _registered_path(live, name: str) -> Path:
    return next(record.path for record in live.server.admin.records() if record.name == name)


@pytest.mark.parametrize("profile", PROFILES)
def test_admin_fields(live, profile):
    def check(call):
        kind, name, path = call
        if kind == "unregister" and name in PROTECTED:
            return
        try:
            if kind == "register":
                info = live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=path), timeout=60,
                                                 metadata=live.admin)
                assert info.name == name and info.rank >= 1
                assert _registered_path(live, name).is_relative_to(live.root.resolve()), path
                live.expected.add(name)
            else:
                live.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=60, metadata=live.admin)
                live.expected.discard(name)
        except grpc.RpcError as error:
            outcome = assert_client_error(error.code(), error.details(), call)
        else:
            outcome = "ok"
        assert live.adapter_names() == live.expected
        return outcome

    outcomes = fuzz(ADMIN_CALLS, check, profile, live)
    assert outcomes["ok"] and outcomes["PERMISSION_DENIED"], outcomes


# -- gRPC: raw bytes per RPC -------------------------------------------------------------------------

RAW_METHODS = sorted(method for method in RPC_REQUESTS if not method.endswith("/Watch"))  # Watch streams forever
RAW_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda fields, tail: fields + tail,  # a valid prefix, then damage
              st.sampled_from([b"\n\x03abc", b"\x12\x09adapter-0", b"\x20\x02", b"\x2d\x00\x00\xc0\x7f"]),
              st.binary(max_size=8)),
)


def _registry_change(method: str, payload: bytes):
    """(name, +1 register / -1 unregister) a successful call with these bytes made."""
    message_type = RPC_REQUESTS[method]
    if method.endswith(("/RegisterAdapter", "/UnregisterAdapter")):
        message = message_type.FromString(payload)
        return message.name, 1 if method.endswith("/RegisterAdapter") else -1
    return None


@pytest.mark.parametrize("profile", PROFILES)
def test_raw_bytes_per_rpc(live, profile):
    def check(case):
        method, payload = case
        if method.endswith("/UnregisterAdapter"):
            try:
                if pb.UnregisterAdapterRequest.FromString(payload).name in PROTECTED:
                    return
            except Exception:
                pass
        code, details = live.raw_call(method, payload)
        if code != grpc.StatusCode.OK:
            return assert_client_error(code, details, case, method)
        change = _registry_change(method, payload)
        if change is not None:
            name, sign = change
            (live.expected.add if sign > 0 else live.expected.discard)(name)
        return "ok"

    outcomes = fuzz(st.tuples(st.sampled_from(RAW_METHODS), RAW_BYTES), check, profile, live)
    assert outcomes["ok"] and outcomes["INVALID_ARGUMENT"], outcomes


# -- HTTP: JSON bodies per route ------------------------------------------------------------------

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
VALID_MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
    "content": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=20)}), min_size=1, max_size=2)),
}), min_size=1, max_size=3)
HOSTILE_MESSAGES = st.one_of(JSON_VALUES, st.just(DROP), st.lists(st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["user", "tool", "function"]), JSON_VALUES),
    "content": st.one_of(JSON_TEXT, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.one_of(JSON_TEXT, JSON_VALUES)})),
        JSON_VALUES),
}), min_size=1, max_size=4))
VALID_SAMPLING = {
    "model": st.sampled_from([BASE_ID, "a0", "a1"]), "max_tokens": st.integers(1, NEW_TOKENS_LIMIT),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.sampled_from([-1, 0, 1, 40]),
    "seed": st.integers(-(2**63), 2**64 - 1), "stop": st.one_of(st.text(min_size=1, max_size=3),
                                                                st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1), "ignore_eos": st.booleans(),
}
HOSTILE_SAMPLING = {
    "model": st.one_of(st.sampled_from(["nope", "", "a0 ", DROP]), JSON_VALUES),
    "max_tokens": st.one_of(st.integers(-5, 2**40), JSON_VALUES),
    "max_completion_tokens": st.one_of(st.integers(-1, NEW_TOKENS_LIMIT + 2), JSON_VALUES),
    "temperature": st.one_of(HUGE_NUMBERS, JSON_VALUES), "top_p": st.one_of(HUGE_NUMBERS, JSON_VALUES),
    "top_k": st.one_of(st.integers(-2**40, 2**40), HUGE_NUMBERS, JSON_VALUES),
    "seed": st.one_of(HUGE_NUMBERS, JSON_VALUES), "stop": st.one_of(JSON_TEXT, st.lists(JSON_TEXT), JSON_VALUES), "stream": JSON_VALUES, "stream_options": JSON_VALUES,
    "n": JSON_VALUES, "ignore_eos": JSON_VALUES, "logprobs": JSON_VALUES, "echo": JSON_VALUES,
    "best_of": JSON_VALUES, "unknown_key": JSON_VALUES,
    "adapters": st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a0", "a1", "zz"]),
                                                          "weight": st.one_of(HUGE_NUMBERS, JSON_SCALARS)}),
                                    min_size=1, max_size=3), JSON_VALUES),
}
COMPLETION_BODIES = perturbed({**VALID_SAMPLING, "prompt": st.text(min_size=1, max_size=40)},
                              {**HOSTILE_SAMPLING, "prompt": st.one_of(st.just(DROP), JSON_TEXT, JSON_VALUES)})
CHAT_BODIES = perturbed({**VALID_SAMPLING, "messages": VALID_MESSAGES},
                        {**HOSTILE_SAMPLING, "messages": HOSTILE_MESSAGES})
ADMIN_BODIES = perturbed(
    {"lora_name": FREE_NAMES, "lora_path": GOOD_PATHS},
    {"lora_name": st.one_of(st.sampled_from(["a1", BASE_ID, DROP]), NAMES, JSON_VALUES),
     "lora_path": st.one_of(PATHS, JSON_TEXT, JSON_VALUES, st.just(DROP)), "extra": JSON_VALUES})
HTTP_BODIES = st.one_of(
    st.tuples(st.just("/v1/completions"), COMPLETION_BODIES),
    st.tuples(st.just("/v1/chat/completions"), CHAT_BODIES),
    st.tuples(st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]), ADMIN_BODIES),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"]), JSON_VALUES),
)


def assert_http_answer(status: int, body, what) -> str:
    """The outcome's name ("ok", "400", ...), once it is a success or a documented client error."""
    if status == 500 and isinstance(body, dict) and NON_FINITE in str(body.get("error", {}).get("message")):
        return "500-non-finite"
    assert status == 200 or status in CLIENT_HTTP, f"{status} {str(body)[:300]!r} for {str(what)[:300]!r}"
    if status >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
        assert body["error"].get("message") and "param" in body["error"], body
    return "ok" if status == 200 else str(status)


@pytest.mark.parametrize("profile", PROFILES)
def test_http_json_bodies(live, profile):
    def check(case):
        route, body = case
        if route == "/v1/unload_lora_adapter" and isinstance(body, dict) and str(body.get("lora_name")) in PROTECTED:
            return
        raw = json.dumps(body).encode("utf-8", "surrogatepass")  # lone surrogates travel as \ud800 escapes
        status, answer = live.http("POST", route, raw=raw)
        outcome = assert_http_answer(status, answer, case)
        if status != 200:
            return outcome
        if route == "/v1/load_lora_adapter":
            live.expected.add(body["lora_name"])
        elif route == "/v1/unload_lora_adapter":
            live.expected.discard(body["lora_name"])
        elif isinstance(answer, dict):
            choice = answer["choices"][0]
            assert choice["finish_reason"] in ("length", "stop")
            assert answer["usage"]["completion_tokens"] <= NEW_TOKENS_LIMIT
        else:  # a stream: events ending with [DONE]
            assert answer.rstrip().endswith("data: [DONE]"), answer[-200:]
        return f"ok {route}"

    outcomes = fuzz(HTTP_BODIES, check, profile, live)
    assert outcomes["ok /v1/completions"] and outcomes["ok /v1/chat/completions"] and outcomes["400"], outcomes


# -- HTTP: methods, paths, content types, headers, bodies that are not JSON -----------------------

HTTP_REQUESTS = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    st.one_of(st.sampled_from(["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                               "/v1/unload_lora_adapter", "/health", "/", "/v1", "/v1/models/a0", "/metrics",
                               "/v1/completions/../models", "/%ff", "/v1//completions"]),
              st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#?%"),
                      max_size=20).map(lambda p: "/" + p)),
    st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"null", b"[]", b'{"model": 1}', b"\xff\xfe",
                                                        b'{"a": "\\ud800"}', b"1" * 5000, b"[" * 5000])),
    st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x", "", "application/x-www-form-urlencoded"]),
    st.sampled_from([{}, {"X-Huge": "a" * 20_000}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"},
                     {"Accept": "text/event-stream"}, {"Content-Encoding": "gzip"}]),
)


@pytest.mark.parametrize("profile", PROFILES)
def test_http_requests(live, profile):
    def check(case):
        method, path, raw, content_type, headers = case
        if path == "/v1/unload_lora_adapter":
            return  # the JSON-body target covers unload; a random body could name a protected adapter
        try:
            status, answer = live.http(method, path, raw=raw, headers={"Content-Type": content_type, **headers})
        except ConnectionError:  # the server may close a connection whose headers are too large
            assert headers.get("X-Huge"), case
            return "closed"
        if status == 200 and path == "/v1/load_lora_adapter":
            live.expected = live.adapter_names()
        assert status == 200 or status in CLIENT_HTTP, (status, str(answer)[:300], case)
        if status >= 400 and method != "HEAD":  # (a HEAD answer has no body)
            assert isinstance(answer, dict) and answer["error"]["message"], (status, answer, case)
        return str(status)

    outcomes = fuzz(HTTP_REQUESTS, check, profile, live)
    assert outcomes["404"] and outcomes["405"] and outcomes["400"], outcomes


# -- adapter folders ---------------------------------------------------------------------------------

CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
               "use_dora", "bias", "modules_to_save", "fan_in_fan_out", "layers_to_transform", "task_type",
               "unknown_field"]
CONFIG_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), JSON_VALUES),
    st.tuples(st.just("drop"), st.sampled_from(CONFIG_KEYS), st.none()),
    st.tuples(st.just("replace"), st.just(""), st.one_of(JSON_VALUES, st.just("[" * 100_000))),
    st.tuples(st.just("bytes"), st.just(""), st.binary(max_size=80)),
)
WEIGHT_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("header"), st.sampled_from(["dtype", "shape", "offsets", "key", "length"]),
              st.one_of(JSON_VALUES, st.sampled_from(["I64", "BOOL", "F8_E4M3", "C64", "BF16", [8, 10**12], [-1, 64]]))),
    st.tuples(st.just("bytes"), st.just(0.0), st.binary(max_size=80)),
    st.tuples(st.just("directory"), st.just(0.0), st.none()),
)


def mutate_config(config: dict, mutation) -> bytes:
    kind, key, value = mutation
    if kind == "set":
        config[key] = value
    elif kind == "drop":
        config.pop(key, None)
    elif kind == "replace":
        return value.encode() if isinstance(value, str) and value.startswith("[") else \
            json.dumps(value).encode("utf-8", "surrogatepass")
    else:
        return value
    return json.dumps(config).encode("utf-8", "surrogatepass")


def mutate_weights(data: bytes, mutation, target: Path) -> None:
    kind, where, value = mutation
    if kind == "directory":
        target.mkdir()
        return
    if kind == "truncate":
        data = data[: int(len(data) * where)]
    elif kind == "flip":
        position = min(len(data) - 1, int(len(data) * where))
        data = data[:position] + bytes([data[position] ^ value]) + data[position + 1:]
    elif kind == "bytes":
        data = value
    else:  # rewrite one field of the JSON header (its length kept consistent unless that is the field)
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        name = next(key for key in header if key != "__metadata__")
        if where == "dtype":
            header[name]["dtype"] = value
        elif where == "shape":
            header[name]["shape"] = value
        elif where == "offsets":
            header[name]["data_offsets"] = value
        elif where == "key":
            header[str(value)[:40] or "x"] = header.pop(name)
        encoded = json.dumps(header).encode("utf-8", "surrogatepass")
        prefix = struct.pack("<Q", len(encoded) if where != "length" else (hash(str(value)) % 2**64))
        data = prefix + encoded + data[8 + length:]
    target.write_bytes(data)


@pytest.mark.parametrize("profile", PROFILES)
def test_adapter_folders(live, profile):
    good_config = json.loads((live.good / CONFIG_FILE).read_text())
    good_weights = (live.good / WEIGHTS_FILE).read_bytes()

    def check(case):
        config_mutation, weight_mutation, over_http = case
        folder = live.root / f"fuzzed-{next(_folders)}"
        folder.mkdir()
        config = mutate_config(dict(good_config), config_mutation) if config_mutation else \
            json.dumps(good_config).encode()
        (folder / CONFIG_FILE).write_bytes(config)
        if weight_mutation:
            mutate_weights(good_weights, weight_mutation, folder / WEIGHTS_FILE)
        else:
            (folder / WEIGHTS_FILE).write_bytes(good_weights)
        name = "fz"
        if over_http:
            status, answer = live.http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder.name})
            outcome = assert_http_answer(status, answer, case)
            registered = status == 200
        else:
            try:
                live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=folder.name), timeout=60,
                                          metadata=live.admin)
                registered, outcome = True, "ok"
            except grpc.RpcError as error:
                outcome = assert_client_error(error.code(), error.details(), case)
                registered = False
        if registered:  # whatever was accepted serves (or is refused per request), then goes
            try:
                live.stub.Generate(pb.GenerateRequest(prompt="The river", adapter=name, max_new_tokens=2), timeout=60)
            except grpc.RpcError as error:
                assert_client_error(error.code(), error.details(), case)
            live.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=60, metadata=live.admin)
        assert name not in live.adapter_names()
        shutil.rmtree(folder, ignore_errors=True)
        return "ok" if outcome == "ok" else "refused"

    cases = st.tuples(st.one_of(st.none(), CONFIG_MUTATIONS), st.one_of(st.none(), WEIGHT_MUTATIONS), st.booleans())
    outcomes = fuzz(cases, check, profile, live)
    assert outcomes["ok"] and outcomes["refused"], outcomes

