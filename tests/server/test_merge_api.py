"""Merge methods on both transports of a live server: gRPC `merge` and the HTTP extra
`merge` (through the real `openai` client) give the same tokens, a non-linear merge
differs from the exact sum, its derived adapter is listed while resident (ListAdapters,
/v1/models) and counted in loraquilt_derived_adapters_total; bad merges are client errors
naming the field."""

from __future__ import annotations

import grpc
import openai
import pytest
from fixtures_http import openai_client
from fixtures_live import BASE_ID, start_live, stop_live
from fixtures_server import metric_value
from prometheus_client import generate_latest

from loraquilt.v1 import loraquilt_pb2 as pb

PROMPT = "The river bends"
MIX = [pb.AdapterWeight(name="a0", weight=0.7), pb.AdapterWeight(name="a1", weight=0.5)]
HTTP_MIX = [{"name": "a0", "weight": 0.7}, {"name": "a1", "weight": 0.5}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("merge_api"), seed=31)
    yield live
    stop_live(live)


@pytest.fixture(scope="module")
def oai(live):
    with openai_client(live.server) as client:
        yield client


def grpc_generate(live, merge: pb.Merge | None = None) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt=PROMPT, adapters=MIX, max_new_tokens=8, ignore_eos=True, logprobs=0)
    if merge is not None:
        request.merge.CopyFrom(merge)
    return live.stub.Generate(request, timeout=60)


def grpc_tokens(live, merge: pb.Merge | None = None) -> list[int]:
    return list(grpc_generate(live, merge).token_ids)


def test_a_ties_merge_on_both_transports(live, oai):
    ties = grpc_tokens(live, pb.Merge(method="ties", density=0.5))
    first_logprob = lambda merge: grpc_generate(live, merge).logprobs[0].logprob  # noqa: E731
    exact = first_logprob(None)
    assert abs(first_logprob(pb.Merge(method="ties", density=0.5)) - exact) > 1e-4  # another adapter
    assert first_logprob(pb.Merge(method="linear")) == exact
    answer = oai.completions.create(model=BASE_ID, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"adapters": HTTP_MIX, "ignore_eos": True,
                                                "merge": {"method": "ties", "density": 0.5}})
    reply = live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapters=MIX, max_new_tokens=8, ignore_eos=True,
                                                  logprobs=0, merge=pb.Merge(method="ties", density=0.5)), timeout=60)
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx([e.logprob for e in reply.logprobs], abs=1e-5)
    assert list(reply.token_ids) == ties


def test_the_derived_adapter_is_listed_and_counted(live, oai):
    grpc_tokens(live, pb.Merge(method="dare_ties", density=0.6, seed=4, rank=4))
    listed = {info.name: info for info in live.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    derived = [info for name, info in listed.items() if name.startswith("~merge-")]
    assert derived and all(info.tier in ("host", "device") for info in derived)
    assert any(info.rank == 4 for info in derived) and {"a0", "a1"} <= set(listed)
    assert {info.kind for info in derived} <= {"merge:dare_ties", "merge:ties"} and listed["a0"].kind == "lora"
    models = {card.id for card in oai.models.list().data}
    assert {info.name for info in derived} <= models
    text = generate_latest(live.server.metrics.registry).decode()
    assert metric_value(text, "loraquilt_derived_adapters_total") >= 1


@pytest.mark.parametrize("merge, param, words", [
    ({"method": "mean"}, "merge.method", "one of"),
    ({"method": "ties"}, "merge.density", "needs a density"),
    ({"method": "svd", "density": 0.5}, "merge.density", "takes no density"),
    ({"method": "dare_linear", "density": 0.5, "seed": -1}, "merge.seed", "[0, 2^64)"),
    ({"method": "ties", "density": 0.5, "weights": 2}, "merge", "unknown fields"),
    ("ties", "merge", "must be an object"),
])
def test_bad_merges_are_400_naming_the_field(live, oai, merge, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=BASE_ID, prompt=PROMPT, max_tokens=4,
                               extra_body={"adapters": HTTP_MIX, "merge": merge})
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error


def test_bad_merges_on_grpc(live):
    for merge, words in [(pb.Merge(method="ties"), "merge.density"), (pb.Merge(method="svd", rank=999), "rank")]:
        with pytest.raises(grpc.RpcError) as caught:
            grpc_tokens(live, merge)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # a merge needs a mix
        live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter="a0", merge=pb.Merge(method="svd")), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs a mix" in caught.value.details()
    live.assert_canaries()
