"""Helpers for the bad-input catalogue (tests/server/bad_input): the live server's handle
with its canary, the server's limits, and the refusal every case expects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from loraquilt.server.app import RunningServer
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXISTS = grpc.StatusCode.ALREADY_EXISTS
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

MAX_SEQ_LEN = 128
NEW_TOKENS_LIMIT = 64
MAX_LORA_RANK = 16
TIMEOUT = 30
CANARY = dict(prompt="The river", adapter="a0", max_new_tokens=8, ignore_eos=True)  # greedy
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class Live:
    server: RunningServer
    channel: grpc.Channel
    stub: pb_grpc.LoraQuiltStub
    root: Path  # the server's adapter root
    good: Path  # a valid adapter folder under the root (registered as a0), copied to be damaged
    outside: Path  # a valid adapter folder outside the root
    canary: tuple[int, ...] = field(default=())

    def canary_tokens(self) -> tuple[int, ...]:
        return tuple(self.stub.Generate(pb.GenerateRequest(**CANARY), timeout=TIMEOUT).token_ids)

    def assert_still_serving(self) -> None:
        assert self.canary_tokens() == self.canary

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters]


def expect_refusal(call: Callable[[], object], code: grpc.StatusCode, needle: str) -> str:
    """`call` must fail with `code`, its message containing `needle`; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    assert needle in details, f"{needle!r} not in {details!r}"
    return details


BAD_NAMES = {
    "slash": "a0/../a1", "dotdot": "..", "nul": "a0\x00", "10kB": "a" * 10_000,
    "non-ascii": "ad\u00e4pter", "trailing-newline": "a0\n", "leading-dot": ".a0",
    "129-chars": "a" * 129, "space": "a 0",
}
