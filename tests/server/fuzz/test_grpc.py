"""Fuzzing the gRPC service: every field of Generate / GenerateStream and of the admin
RPCs (protobuf-valid values: huge and negative numbers, NaN and infinities, empty / huge /
unicode / control strings, traversal and symlink paths, mixes with duplicates), and raw
random bytes per RPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from fixtures_fuzz import (
    FLOATS32, FREE_NAMES, GOOD_PATHS, NAMES, PATHS, PROFILES, PROTECTED, TEXTS, UTF8_TEXT, assert_client_error,
    fuzz, perturbed,
)
from fixtures_live import NEW_TOKENS_LIMIT, RPC_REQUESTS
from hypothesis import strategies as st

from loraquilt.v1 import loraquilt_pb2 as pb

FINISH_REASONS = {"length", "stop", "eos", "cancelled"}
VALID_MIX = st.lists(st.builds(pb.AdapterWeight, name=st.sampled_from(["a0", "a1"]), weight=st.floats(0.125, 2.0,
                                                                                                     width=32)),
                     min_size=1, max_size=2, unique_by=lambda entry: entry.name)
GENERATE = perturbed(
    valid={"prompt": st.text(UTF8_TEXT, min_size=1, max_size=30), "max_new_tokens": st.integers(0, NEW_TOKENS_LIMIT),
           "temperature": st.sampled_from([0.0, 0.7, 1.0]), "top_p": st.sampled_from([0.0, 0.9, 1.0]),
           "top_k": st.sampled_from([0, 1, 40]), "stop": st.lists(st.text(UTF8_TEXT, min_size=1, max_size=3),
                                                                  max_size=2),
           "chat": st.booleans(), "ignore_eos": st.booleans(),
           "adapter": st.sampled_from(["", "a0", "a1"]), "seed": st.integers(0, 2**64 - 1),
           "n": st.integers(0, 3), "logprobs": st.integers(0, 3)},
    hostile={"prompt": TEXTS, "max_new_tokens": st.integers(0, 2**32 - 1), "temperature": FLOATS32,
             "top_p": FLOATS32, "top_k": st.integers(0, 2**32 - 1), "stop": st.lists(TEXTS, max_size=20),
             "adapter": NAMES, "adapters": st.one_of(VALID_MIX, st.lists(st.builds(
                 pb.AdapterWeight, name=NAMES, weight=FLOATS32), max_size=10)),
             "n": st.integers(0, 2**32 - 1), "best_of": st.integers(0, 2**32 - 1),
             "logprobs": st.integers(0, 2**32 - 1), "choice": st.lists(TEXTS, max_size=4),
             "merge": st.builds(pb.Merge, method=st.one_of(st.sampled_from(["ties", "svd", "dare_ties", "cat"]), TEXTS),
                                density=FLOATS32, seed=st.integers(0, 2**64 - 1), rank=st.integers(0, 2**32 - 1))},
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
                tokens = [t for choice in (final.choices or [final]) for t in choice.token_ids]
        except grpc.RpcError as error:
            return assert_client_error(error.code(), error.details(), fields)
        assert final.finish_reason in FINISH_REASONS
        sampled = max(request.n, request.best_of, 1)  # best_of: its ranked-out choices' tokens are counted too
        if request.best_of <= request.n:
            assert len(tokens) == final.completion_tokens
        assert len(tokens) <= final.completion_tokens <= NEW_TOKENS_LIMIT * sampled
        assert final.prompt_tokens > 0
        return "ok"

    outcomes = fuzz(st.tuples(GENERATE, st.booleans()), check, profile, live)
    assert outcomes["ok"] and outcomes["INVALID_ARGUMENT"], outcomes  # both sides of the validation reached


# -- gRPC: the admin RPCs ----------------------------------------------------------------------------

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
