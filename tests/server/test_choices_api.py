"""Several choices per request (n, best_of) on both transports of a live server, through
gRPC and the real `openai` client (sync, async, streamed): every choice with its index,
each one's own random stream (choice i equals the request alone with seed + i), usage
counting the prompt once, per-choice finish in streams, best_of's ranking and its refusal
to stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fixtures_http import openai_client, streamed_choices
from fixtures_live import BASE_ID, start_live, stop_live

from loraquilt.v1 import loraquilt_pb2 as pb

PROMPT = "The river bends"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("choices"), seed=29)
    yield live
    stop_live(live)


@pytest.fixture(scope="module")
def oai(live):
    with openai_client(live.server) as client:
        yield client


def grpc_request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt": PROMPT, "temperature": 1.2, "seed": 5, "max_new_tokens": 6,
                                 "ignore_eos": True, **fields})


def test_grpc_unary_returns_every_choice_each_equal_to_its_seed_alone(live):
    reply = live.stub.Generate(grpc_request(adapter="a0", n=3), timeout=60)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        alone = live.stub.Generate(grpc_request(adapter="a0", seed=5 + choice.index), timeout=60)
        assert list(choice.token_ids) == list(alone.token_ids) and choice.text == alone.text
        assert choice.completion_tokens == 6 and choice.finish_reason == "length"
    assert list(reply.token_ids) == list(reply.choices[0].token_ids)
    assert reply.prompt_tokens == alone.prompt_tokens and reply.completion_tokens == 18
    assert len({tuple(c.token_ids) for c in reply.choices}) > 1


def test_grpc_stream_names_each_choice_and_ends_each_once(live):
    messages = list(live.stub.GenerateStream(grpc_request(n=3, max_new_tokens=5), timeout=60))
    unary = live.stub.Generate(grpc_request(n=3, max_new_tokens=5), timeout=60)
    for choice in unary.choices:
        mine = [m for m in messages if m.index == choice.index]
        assert [t for m in mine for t in m.token_ids] == list(choice.token_ids)
        assert [m.finish_reason for m in mine if m.finish_reason] == ["length"]
    assert messages[-1].completion_tokens == 15 and messages[-1].prompt_tokens == unary.prompt_tokens


def test_grpc_best_of_ranks_and_refuses_to_stream(live):
    every = live.stub.Generate(grpc_request(n=4, logprobs=0), timeout=60)
    means = [sum(e.logprob for e in c.logprobs) / len(c.logprobs) for c in every.choices]
    best = sorted(range(4), key=lambda i: -means[i])[:2]
    picked = live.stub.Generate(grpc_request(n=2, best_of=4), timeout=60)
    assert [list(c.token_ids) for c in picked.choices] == [list(every.choices[i].token_ids) for i in best]
    assert picked.completion_tokens == 24
    with pytest.raises(grpc.RpcError) as caught:
        list(live.stub.GenerateStream(grpc_request(n=2, best_of=4), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "best_of" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        live.stub.Generate(grpc_request(n=3, best_of=2), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "best_of" in caught.value.details()


def test_completions_n_sync_and_streamed(live, oai):
    options = dict(model="a1", prompt=PROMPT, max_tokens=6, temperature=1.2, seed=9, n=3, logprobs=1,
                   extra_body={"ignore_eos": True})
    answer = oai.completions.create(**options)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    single = oai.completions.create(**{**options, "n": 1, "seed": 10})
    assert answer.choices[1].text == single.choices[0].text
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    assert answer.usage.completion_tokens == 18
    for choice in answer.choices:  # text offsets count within each choice
        assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.text_offset[0] == 0
    streamed = list(oai.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    texts, reasons = streamed_choices(streamed)
    assert texts == {c.index: c.text for c in answer.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert streamed[-1].usage.completion_tokens == 18 and streamed[-1].usage.prompt_tokens == single.usage.prompt_tokens


def test_completions_echo_per_choice_and_best_of(live, oai):
    answer = oai.completions.create(model=BASE_ID, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3, n=2,
                                    echo=True, extra_body={"ignore_eos": True})
    assert all(choice.text.startswith(PROMPT) for choice in answer.choices)
    picked = oai.completions.create(model=BASE_ID, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3, n=1,
                                    best_of=3, extra_body={"ignore_eos": True})
    assert len(picked.choices) == 1 and picked.usage.completion_tokens == 12


def test_chat_n_async_and_streamed(live):
    messages = [{"role": "user", "content": "Say something"}]

    async def asynchronous():
        async with openai_client(live.server, asynchronous=True) as client:
            whole = await client.chat.completions.create(model="a0", messages=messages, max_tokens=5, n=2,
                                                         temperature=1.1, seed=4, logprobs=True, top_logprobs=2,
                                                         extra_body={"ignore_eos": True})
            stream = await client.chat.completions.create(model="a0", messages=messages, max_tokens=5, n=2,
                                                          temperature=1.1, seed=4, stream=True,
                                                          extra_body={"ignore_eos": True})
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = asyncio.run(asynchronous())
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 5 for c in whole.choices)
    texts, roles = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index].append(choice.delta.role)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert all(seen[0] == "assistant" and set(seen[1:]) <= {None} for seen in roles.values())


def test_the_python_client_passes_the_new_fields(live):
    from loraquilt.client.client import LoraQuiltClient

    client = LoraQuiltClient(channel=live.channel, metadata=None)
    reply = client.generate(PROMPT, adapter="a0", n=2, temperature=1.2, seed=5, max_new_tokens=6, ignore_eos=True,
                            logprobs=1)
    unary = live.stub.Generate(grpc_request(adapter="a0", n=2, logprobs=1), timeout=60)
    assert [list(c.token_ids) for c in reply.choices] == [list(c.token_ids) for c in unary.choices]
    assert all(len(c.logprobs) == 6 for c in reply.choices)
    with pytest.raises(ValueError, match="no_such_field"):
        client.generate(PROMPT, no_such_field=1)
