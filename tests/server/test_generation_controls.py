"""Generation controls on both transports of a live server: log probabilities (unary,
streamed, async, chat and completions, through the real `openai` client and gRPC),
logit_bias, min_tokens, stop_token_ids, penalties and min_p, and the prefix-cache hits in
usage; per row, in a batch mixing adapters and controls."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from fixtures_http import openai_client
from fixtures_live import BASE_ID, start_live, stop_live

from loraquilt.v1 import loraquilt_pb2 as pb

PROMPT = "The river bends"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("controls"), seed=13)
    yield live
    stop_live(live)


@pytest.fixture(scope="module")
def oai(live):
    with openai_client(live.server) as client:
        yield client


def grpc_generate(live, **fields) -> pb.GenerateResponse:
    fields.setdefault("prompt", PROMPT)
    return live.stub.Generate(pb.GenerateRequest(**fields), timeout=60)


# -- log probabilities --------------------------------------------------------------------------

def test_grpc_logprobs_per_token_with_top_alternatives(live):
    reply = grpc_generate(live, adapter="a0", max_new_tokens=6, ignore_eos=True, logprobs=3)
    assert len(reply.logprobs) == len(reply.token_ids) == 6
    for token, entry in zip(reply.token_ids, reply.logprobs):
        assert entry.token_id == token and entry.logprob <= 0 and len(entry.top) == 3
        assert entry.top[0].token_id == token  # greedy: the chosen token is the most likely
        assert entry.top[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
    streamed = list(live.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, adapter="a0", max_new_tokens=6,
                                                                ignore_eos=True, logprobs=3), timeout=60))
    entries = [entry for piece in streamed for entry in piece.logprobs]
    assert [(e.token_id, round(e.logprob, 5)) for e in entries] == \
        [(e.token_id, round(e.logprob, 5)) for e in reply.logprobs]
    assert not grpc_generate(live, max_new_tokens=3).logprobs  # none unless asked


def test_completions_logprobs_shape_and_stream(live, oai):
    answer = oai.completions.create(model="a0", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))
    reply = grpc_generate(live, adapter="a0", max_new_tokens=5, ignore_eos=True, logprobs=2)
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in reply.logprobs], abs=1e-5)
    streamed = oai.completions.create(model="a0", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                      stream=True, extra_body={"ignore_eos": True})
    values = [v for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for v in chunk.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(logprobs.token_logprobs, abs=1e-6)


def test_chat_logprobs_sync_stream_and_async(live, oai):
    messages = [{"role": "user", "content": "Say something"}]
    chat = oai.chat.completions.create(model="a1", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(bytes(entry.bytes).decode("utf-8", "replace") == entry.token for entry in content)
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    streamed = oai.chat.completions.create(model="a1", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3, stream=True,
                                           extra_body={"ignore_eos": True})
    values = [e.logprob for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    assert values == pytest.approx([e.logprob for e in content], abs=1e-6)

    async def asynchronous():
        async with openai_client(live.server, asynchronous=True) as client:
            return await client.chat.completions.create(model="a1", messages=messages, max_tokens=5, temperature=0,
                                                        logprobs=True, top_logprobs=1,
                                                        extra_body={"ignore_eos": True})

    answer = asyncio.run(asynchronous())
    assert [e.logprob for e in answer.choices[0].logprobs.content] == pytest.approx([e.logprob for e in content],
                                                                                   abs=1e-6)
    plain = oai.chat.completions.create(model="a1", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": "2"}, "logprobs"), ({"logprobs": True}, "logprobs"),
])
def test_bad_completion_logprobs_are_a_400(live, body, param):
    status, answer = live.http("POST", "/v1/completions", {"model": BASE_ID, "prompt": "a", **body})
    assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True, "top_logprobs": 21}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
])
def test_bad_chat_logprobs_are_a_400(live, body, param):
    status, answer = live.http("POST", "/v1/chat/completions",
                               {"model": BASE_ID, "messages": [{"role": "user", "content": "a"}], **body})
    assert status == 400 and answer["error"]["param"] == param, answer


# -- logits processing ---------------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens(live, oai):
    plain = grpc_generate(live, max_new_tokens=4, ignore_eos=True)
    forced = plain.token_ids[0] + 1
    biased = grpc_generate(live, max_new_tokens=4, ignore_eos=True, logit_bias={forced: 100.0})
    assert list(biased.token_ids) == [forced] * 4
    banned = grpc_generate(live, max_new_tokens=4, ignore_eos=True, logit_bias={plain.token_ids[0]: -100.0})
    assert plain.token_ids[0] not in banned.token_ids
    answer = oai.completions.create(model=BASE_ID, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert answer.choices[0].text == live.server.engine.tokenizer.decode([forced] * 4)


def test_min_tokens_masks_the_end_and_stop_token_ids_end_it(live):
    plain = grpc_generate(live, max_new_tokens=6, ignore_eos=True)
    stop = plain.token_ids[2]
    stopped = grpc_generate(live, max_new_tokens=6, stop_token_ids=[stop])
    first = list(plain.token_ids).index(stop)
    assert stopped.finish_reason == "stop" and list(stopped.token_ids) == list(plain.token_ids[: first + 1])
    held = grpc_generate(live, max_new_tokens=6, stop_token_ids=[stop], min_tokens=6)
    assert held.finish_reason == "length" and stop not in held.token_ids[:6]


def test_penalties_and_min_p_change_answers_and_are_checked(live, oai):
    forced = grpc_generate(live, max_new_tokens=1).token_ids[0] + 7
    bias = next(b for b in (3.0, 5.0, 8.0, 12.0, 20.0)  # the least bias that makes it repeat throughout
                if list(grpc_generate(live, max_new_tokens=12, ignore_eos=True,
                                      logit_bias={forced: b}).token_ids).count(forced) == 12)
    for penalty in (dict(frequency_penalty=2.0), dict(repetition_penalty=100.0)):
        # the bias keeps pulling; each penalty pushes back once the token was generated
        penalised = grpc_generate(live, max_new_tokens=12, ignore_eos=True, logit_bias={forced: bias}, **penalty)
        assert list(penalised.token_ids).count(forced) < 12, penalty
    seeded = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=5)
    assert grpc_generate(live, min_p=1.0, **seeded).token_ids == grpc_generate(live, max_new_tokens=8,
                                                                               ignore_eos=True).token_ids
    for field, value in (("presence_penalty", 3.0), ("min_p", 2.0), ("repetition_penalty", -1.0)):
        with pytest.raises(grpc.RpcError) as caught:
            grpc_generate(live, **{field: value})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model=BASE_ID, prompt="a", extra_body={field: value})
        assert caught.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=BASE_ID, prompt="a", logit_bias={"999999": 1})
    assert caught.value.body["param"] == "logit_bias"


def test_rows_with_different_controls_in_one_batch_equal_their_answers_alone(live):
    cases = [dict(adapter="a0", logprobs=2), dict(adapter="a1", repetition_penalty=1.5),
             dict(logit_bias={5: 3.0}, min_tokens=4), dict(adapters=[pb.AdapterWeight(name="a0", weight=0.6),
                                                                     pb.AdapterWeight(name="a1", weight=0.4)],
                                                           presence_penalty=1.0, logprobs=1),
             dict(), dict(adapter="a0", frequency_penalty=1.5)]
    alone = [grpc_generate(live, max_new_tokens=8, ignore_eos=True, **case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: grpc_generate(live, max_new_tokens=8, ignore_eos=True, **case), cases))
    for one, many in zip(alone, together):
        assert list(one.token_ids) == list(many.token_ids)
        assert [round(e.logprob, 4) for e in one.logprobs] == [round(e.logprob, 4) for e in many.logprobs]


def test_usage_reports_prefix_cache_hits(live, oai):
    prompt = "A long shared beginning of a prompt that fills more than one block of the cache " * 2
    first = oai.completions.create(model=BASE_ID, prompt=prompt, max_tokens=2)
    second = oai.completions.create(model=BASE_ID, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % live.server.engine.cache.block_size == 0
    assert grpc_generate(live, prompt=prompt, max_new_tokens=2).cached_tokens == cached
    assert not math.isnan(cached)
