"""Bad Generate / GenerateStream requests: every field out of range or malformed, names
that are no adapter names, mixes, stop strings, messages over the gRPC size limit and
bytes that are no GenerateRequest; and the values at the edges that are accepted."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from fixtures_bad_input import (
    BAD_NAMES, INVALID, MAX_SEQ_LEN, NEW_TOKENS_LIMIT, NOT_FOUND, TIMEOUT, TOO_BIG, Live, expect_refusal,
)

from loraquilt.server.app import MAX_MESSAGE_BYTES
from loraquilt.server.request import MAX_MIX, MAX_STOP_CHARS, MAX_STOP_STRINGS
from loraquilt.v1 import loraquilt_pb2 as pb


def mix(*pairs: tuple[str, float]) -> list[pb.AdapterWeight]:
    return [pb.AdapterWeight(name=name, weight=weight) for name, weight in pairs]


def gen(case_id: str, code: grpc.StatusCode, needle: str, **fields):
    fields.setdefault("prompt", "The river")
    return pytest.param(fields, code, needle, id=case_id)


GENERATE_CASES = [
    gen("empty-prompt", INVALID, "prompt: must not be empty", prompt=""),
    gen("prompt-longer-than-the-context", INVALID, f"the context holds {MAX_SEQ_LEN} tokens",
        prompt="The river bends " * 100),
    gen("max-new-tokens-over-the-limit", INVALID, f"max_new_tokens: {NEW_TOKENS_LIMIT + 1} is over",
        max_new_tokens=NEW_TOKENS_LIMIT + 1),
    gen("max-new-tokens-uint32-max", INVALID, "max_new_tokens", max_new_tokens=2**32 - 1),
    gen("temperature-negative", INVALID, "temperature", temperature=-0.5),
    gen("temperature-nan", INVALID, "temperature", temperature=math.nan),
    gen("temperature-inf", INVALID, "temperature", temperature=math.inf),
    gen("temperature-minus-inf", INVALID, "temperature", temperature=-math.inf),
    gen("top-p-negative", INVALID, "top_p", top_p=-0.1),
    gen("top-p-over-one", INVALID, "top_p", top_p=1.5),
    gen("top-p-nan", INVALID, "top_p", top_p=math.nan),
    gen("top-p-inf", INVALID, "top_p", top_p=math.inf),
    gen("unknown-adapter", NOT_FOUND, "'ghost' is not registered", adapter="ghost"),
    gen("adapter-and-adapters-both-set", INVALID, "adapters: set either", adapter="a0",
        adapters=mix(("a1", 1.0))),
    gen("mix-with-an-unknown-name", NOT_FOUND, "'ghost' is not registered",
        adapters=mix(("a0", 0.5), ("ghost", 0.5))),
    gen("mix-with-a-duplicate-name", INVALID, "twice", adapters=mix(("a0", 0.5), ("a0", 0.5))),
    gen("mix-nan-weight", INVALID, "adapters.weight", adapters=mix(("a0", math.nan), ("a1", 1.0))),
    gen("mix-inf-weight", INVALID, "adapters.weight", adapters=mix(("a0", math.inf), ("a1", 1.0))),
    gen("mix-minus-inf-weight", INVALID, "adapters.weight", adapters=mix(("a0", 1.0), ("a1", -math.inf))),
    gen("mix-negative-sum", INVALID, "sum to a positive", adapters=mix(("a0", -1.0), ("a1", 0.5))),
    gen("mix-zero-sum", INVALID, "sum to a positive", adapters=mix(("a0", 0.0))),
    gen("mix-too-many-entries", INVALID, f"at most {MAX_MIX} adapters",
        adapters=mix(*[(f"m{i}", 1.0) for i in range(MAX_MIX + 1)])),
    gen("mix-empty-name", INVALID, "adapters.name", adapters=mix(("", 1.0))),
    gen("mix-name-with-nul", INVALID, "adapters.name", adapters=mix(("a0\x00", 1.0))),
    gen("mix-name-with-slash", INVALID, "adapters.name", adapters=mix(("a0/../a1", 1.0))),
    *[gen(f"adapter-name-{key}", INVALID, "adapter: adapter names", adapter=name)
      for key, name in BAD_NAMES.items()],
    gen("too-many-stop-strings", INVALID, f"at most {MAX_STOP_STRINGS} stop strings",
        stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
    gen("stop-string-too-long", INVALID, f"stop strings must be 1..{MAX_STOP_CHARS}",
        stop=["x" * (MAX_STOP_CHARS + 1)]),
    gen("empty-stop-string", INVALID, "stop strings must be", stop=[""]),
]


def call_generate(live: Live, rpc: str, request: pb.GenerateRequest):
    if rpc == "unary":
        return live.stub.Generate(request, timeout=TIMEOUT)
    return list(live.stub.GenerateStream(request, timeout=TIMEOUT))


@pytest.mark.parametrize("rpc", ["unary", "stream"])
@pytest.mark.parametrize("fields, code, needle", GENERATE_CASES)
def test_generate_refuses(live, rpc, fields, code, needle):
    expect_refusal(lambda: call_generate(live, rpc, pb.GenerateRequest(**fields)), code, needle)
    live.assert_still_serving()


def test_huge_top_k_means_no_top_k(live):
    """top_k is a uint32: anything at or past the vocabulary keeps every token (as 0 does)."""
    def tokens(**fields) -> tuple[int, ...]:
        fields = dict(prompt="The river", adapter="a0", temperature=1.5, seed=2024, max_new_tokens=16,
                      ignore_eos=True) | fields
        request = pb.GenerateRequest(**fields)
        return tuple(live.stub.Generate(request, timeout=TIMEOUT).token_ids)

    vocab = live.server.engine.model.config.vocab_size
    off = tokens(top_k=0)
    assert tokens(top_k=vocab) == off
    assert tokens(top_k=vocab + 1) == off
    assert tokens(top_k=2**32 - 1) == off
    greedy = tokens(top_k=0, temperature=0)
    assert off != greedy  # it did sample
    assert tokens(top_k=1) == greedy  # and top_k is applied when it means something
    live.assert_still_serving()


def test_the_whole_uint64_seed_range_is_accepted(live):
    """seed is a uint64 on the wire, so no seed the proto can carry is out of range."""
    for seed in (0, 2**32, 2**64 - 1):
        request = pb.GenerateRequest(prompt="The river", temperature=1.0, seed=seed, max_new_tokens=8,
                                     ignore_eos=True)
        first, again = (live.stub.Generate(request, timeout=TIMEOUT) for _ in range(2))
        assert first.completion_tokens == 8 and first.token_ids == again.token_ids
    live.assert_still_serving()


@pytest.mark.parametrize("method", ["Generate", "RegisterAdapter"])
def test_message_over_the_grpc_size_limit(live, method):
    """gRPC itself refuses a request over MAX_MESSAGE_BYTES before the service sees it."""
    huge = "x" * (MAX_MESSAGE_BYTES + 1)
    if method == "Generate":
        call = lambda: live.stub.Generate(pb.GenerateRequest(prompt=huge), timeout=TIMEOUT)  # noqa: E731
    else:
        call = lambda: live.stub.RegisterAdapter(  # noqa: E731
            pb.RegisterAdapterRequest(name="huge", path=huge), timeout=TIMEOUT)
    expect_refusal(call, TOO_BIG, f"vs. {MAX_MESSAGE_BYTES}")
    live.assert_still_serving()


def test_prompt_just_under_the_size_limit_is_refused_by_length(live):
    prompt = "The river bends " * ((MAX_MESSAGE_BYTES - 1024) // 16)
    started = time.monotonic()
    expect_refusal(lambda: live.stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=TIMEOUT),
                   INVALID, f"the context holds {MAX_SEQ_LEN} tokens")
    assert time.monotonic() - started < 15
    live.assert_still_serving()


@pytest.mark.parametrize("payload", [
    pytest.param(b"\x0a\x03\xff\xfe\xfd", id="prompt-not-utf8"),
    pytest.param(b"\xff\xff\xff\xff", id="not-protobuf"),
])
def test_bytes_that_are_no_generate_request(live, payload):
    """Undecodable bytes are a client error naming the RPC (the service never sees them)."""
    raw = live.channel.unary_unary("/loraquilt.v1.LoraQuilt/Generate")  # bytes in, bytes out
    expect_refusal(lambda: raw(payload, timeout=TIMEOUT), INVALID, "Generate: the request is not a valid protobuf")
    live.assert_still_serving()
