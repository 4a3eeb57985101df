"""Prompt log probabilities on both transports of a live server: gRPC's prompt_logprobs
(unary, and the first streamed reply), completions' `echo` with `logprobs` in OpenAI's
legacy shape (sync, async and streamed through the real `openai` client; max_tokens 0
scores the prompt only; prompts as text or token ids; the loglikelihood call
lm-evaluation-harness makes), vLLM's `prompt_logprobs` extra on completions and chat, and
bad values refused naming the field."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fixtures_http import openai_client
from fixtures_live import BASE_ID, start_live, stop_live

from loraquilt.server.request import Request
from loraquilt.v1 import loraquilt_pb2 as pb

PROMPT = "The river bends where the old mill stands"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("prompt_logprobs"), seed=17)
    yield live
    stop_live(live)


@pytest.fixture(scope="module")
def oai(live):
    with openai_client(live.server) as opened:
        yield opened


@pytest.fixture(scope="module")
def prompt_ids(live) -> list[int]:
    return live.server.engine.encode(Request(prompt=PROMPT))


@pytest.fixture(scope="module")
def scored(live) -> pb.GenerateResponse:
    """The gRPC answer every HTTP shape is compared with: adapter a0, 2 alternatives."""
    return live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter="a0", max_new_tokens=3, ignore_eos=True,
                                                 prompt_logprobs=2, logprobs=1), timeout=60)


def test_grpc_prompt_logprobs_unary_and_first_streamed_reply(live, scored, prompt_ids):
    assert [entry.token_id for entry in scored.prompt_logprobs] == prompt_ids[1:]
    for entry in scored.prompt_logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 2 and entry.text
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.top[0].logprob >= entry.logprob - 1e-6
    assert len(scored.logprobs) == len(scored.token_ids) == 3
    stream = list(live.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, adapter="a0", max_new_tokens=3,
                                                              ignore_eos=True, prompt_logprobs=2), timeout=60))
    assert len(stream[0].prompt_logprobs) == len(prompt_ids) - 1 and not any(r.prompt_logprobs for r in stream[1:])
    assert [(e.token_id, round(e.logprob, 5)) for e in stream[0].prompt_logprobs] == \
        [(e.token_id, round(e.logprob, 5)) for e in scored.prompt_logprobs]
    assert [t for r in stream for t in r.token_ids] == list(scored.token_ids)
    plain = live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=2), timeout=60)
    assert not plain.prompt_logprobs  # none unless asked


def test_grpc_bad_prompt_logprobs_is_invalid_argument(live):
    with pytest.raises(grpc.RpcError) as caught:
        live.stub.Generate(pb.GenerateRequest(prompt=PROMPT, prompt_logprobs=21), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in caught.value.details()


def check_echo_logprobs(logprobs, prompt_ids: list[int], scored: pb.GenerateResponse, generated: int) -> None:
    """OpenAI's legacy shape: every prompt token (the first with nulls), then the generated ones."""
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(prompt_ids) + generated
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [e.logprob for e in scored.prompt_logprobs]
    assert logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(expected, abs=1e-5)
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == pytest.approx(value) and len(top) <= 2  # the token and its best alternative
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_echo_with_max_tokens_zero_returns_the_prompt_scored(oai, scored, prompt_ids):
    answer = oai.completions.create(model="a0", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    choice = answer.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens == len(prompt_ids)
    check_echo_logprobs(choice.logprobs, prompt_ids, scored, 0)
    assert "".join(choice.logprobs.tokens) == PROMPT


def test_echo_with_a_completion_sync_async_and_streamed(live, oai, scored, prompt_ids):
    options = dict(model="a0", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0,
                   extra_body={"ignore_eos": True})
    answer = oai.completions.create(**options)
    choice = answer.choices[0]
    completion = live.server.engine.tokenizer.decode(list(scored.token_ids))
    assert choice.text == PROMPT + completion
    check_echo_logprobs(choice.logprobs, prompt_ids, scored, 3)
    assert choice.logprobs.token_logprobs[-3:] == pytest.approx([e.logprob for e in scored.logprobs], abs=1e-5)

    async def asynchronous():
        async with openai_client(live.server, asynchronous=True) as opened:
            return await opened.completions.create(**options)

    assert asyncio.run(asynchronous()).choices[0].logprobs.token_logprobs == \
        pytest.approx(choice.logprobs.token_logprobs, abs=1e-6)
    chunks = list(oai.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-6)
    assert [o for lp in streamed for o in lp.text_offset] == choice.logprobs.text_offset
    only_prompt = list(oai.completions.create(model="a0", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in only_prompt if c.choices) == PROMPT
    assert [c.choices[0].finish_reason for c in only_prompt if c.choices][-1] == "length"


def test_echo_of_token_ids_and_echo_without_logprobs(oai, scored, prompt_ids):
    for prompt in (prompt_ids, [prompt_ids]):
        answer = oai.completions.create(model="a0", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        check_echo_logprobs(answer.choices[0].logprobs, prompt_ids, scored, 0)
        assert answer.choices[0].text == "".join(answer.choices[0].logprobs.tokens)
    plain = oai.completions.create(model="a0", prompt=PROMPT, echo=True, max_tokens=2, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].text.startswith(PROMPT)
    assert len(plain.choices[0].text) > len(PROMPT)


def test_the_loglikelihood_call_of_lm_evaluation_harness(oai, scored, prompt_ids):
    """echo, logprobs 1, max_tokens 1, token ids: the continuation's summed log probability
    and whether it is the greedy one (lm-eval's local-completions parse_logprobs)."""
    context = 4
    body = oai.completions.create(model="a0", prompt=[prompt_ids], echo=True, logprobs=1, max_tokens=1,
                                  temperature=0, seed=1234).choices[0].logprobs
    values, tops = body.token_logprobs[context:-1], body.top_logprobs[context:-1]
    expected = [e.logprob for e in scored.prompt_logprobs][context - 1:]
    assert sum(values) == pytest.approx(sum(expected), abs=1e-4)
    greedy = all(value == max(top.values()) for value, top in zip(values, tops))
    assert greedy == all(e.top[0].token_id == e.token_id for e in scored.prompt_logprobs[context - 1:])


def test_vllm_prompt_logprobs_on_completions_and_chat(live, oai, scored, prompt_ids):
    answer = oai.completions.create(model="a0", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2})
    listed = answer.choices[0].model_extra["prompt_logprobs"]
    assert answer.choices[0].text and answer.choices[0].logprobs is None  # no echo: the completion alone
    assert listed[0] is None and len(listed) == len(prompt_ids)
    for token, entry, expected in zip(prompt_ids[1:], listed[1:], scored.prompt_logprobs):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(expected.logprob, abs=1e-5) and mine["rank"] >= 1
        assert mine["decoded_token"] == expected.text
        alternatives = sorted((v for k, v in entry.items()), key=lambda v: v["rank"])[:2]
        assert [v["rank"] for v in alternatives] == [1, 2] or mine["rank"] == 1
        assert alternatives[0]["logprob"] == pytest.approx(expected.top[0].logprob, abs=1e-5)
        assert (mine["rank"] == 1) == (expected.top[0].token_id == token)
    messages = [{"role": "user", "content": "Say something"}]
    chat = oai.chat.completions.create(model="a1", messages=messages, max_tokens=0, extra_body={"prompt_logprobs": 0})
    chat_listed = chat.choices[0].model_extra["prompt_logprobs"]
    chat_ids = live.server.engine.encode(Request(messages=tuple(messages)))
    assert chat_listed[0] is None and all(len(entry) == 1 for entry in chat_listed[1:])
    assert [int(next(iter(entry))) for entry in chat_listed[1:]] == chat_ids[1:]
    assert chat.choices[0].message.content == "" and chat.usage.completion_tokens == 0
    streamed = list(oai.chat.completions.create(model="a1", messages=messages, max_tokens=2, stream=True,
                                                extra_body={"prompt_logprobs": 0}))
    carrying = [c for c in streamed if c.choices and c.choices[0].model_extra.get("prompt_logprobs")]
    assert len(carrying) == 1 and carrying[0].choices[0].model_extra["prompt_logprobs"] == chat_listed
    plain = oai.completions.create(model="a0", prompt=PROMPT, max_tokens=1)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})


@pytest.mark.parametrize("body, param", [
    ({"echo": "yes"}, "echo"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"prompt_logprobs": "2"}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"), ({"echo": True, "max_tokens": -1}, "max_tokens"),
    ({"echo": True, "logprobs": 21}, "logprobs"), ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [1, True]}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
])
def test_bad_echo_and_prompt_logprobs_values_are_a_400(live, body, param):
    status, answer = live.http("POST", "/v1/completions", {"model": BASE_ID, "prompt": "a", **body})
    assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("body, param", [
    ({"echo": True}, "echo"), ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_chat_prompt_logprobs_values_are_a_400(live, body, param):
    status, answer = live.http("POST", "/v1/chat/completions",
                               {"model": BASE_ID, "messages": [{"role": "user", "content": "a"}], **body})
    assert status == 400 and answer["error"]["param"] == param, answer
