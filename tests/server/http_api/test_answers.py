"""The answers of the OpenAI-compatible API, unary and streamed, through the real
`openai` client (sync and async) and plain HTTP, against the gRPC answers of the same
server."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures_http import BASE_ID, NEW_TOKENS, PROMPTS, http, openai_client


# -- answers -----------------------------------------------------------------------------

@pytest.mark.parametrize("selection", [
    pytest.param(dict(model=BASE_ID), id="base"),
    pytest.param(dict(model="a3"), id="adapter"),
    pytest.param(dict(model=BASE_ID, adapters=[("a1", 0.7), ("a5", 0.3)]), id="mix"),
])
def test_completion_equals_the_grpc_answer(oai, grpc_client, selection):
    mix = selection.get("adapters", [])
    extra = {"ignore_eos": True, **({"adapters": [{"name": n, "weight": w} for n, w in mix]} if mix else {})}
    for prompt in PROMPTS[:3]:
        completion = oai.completions.create(model=selection["model"], prompt=prompt, max_tokens=NEW_TOKENS,
                                            temperature=0, extra_body=extra)
        expected = grpc_client.generate(prompt, adapter="" if selection["model"] == BASE_ID else selection["model"],
                                        mix=mix, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        (choice,) = completion.choices
        assert completion.object == "text_completion" and completion.model == selection["model"]
        assert choice.text == expected.text and choice.finish_reason == "length"
        assert completion.usage.completion_tokens == len(expected.token_ids) == NEW_TOKENS
        assert completion.usage.prompt_tokens == expected.prompt_tokens
        assert completion.usage.total_tokens == expected.prompt_tokens + NEW_TOKENS


def test_chat_equals_the_grpc_chat_answer(oai, grpc_client):
    for model, adapter in ((BASE_ID, ""), ("a2", "a2")):
        chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                           max_completion_tokens=NEW_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        expected = grpc_client.generate(PROMPTS[1], adapter=adapter, chat=True, max_new_tokens=NEW_TOKENS,
                                        ignore_eos=True)
        assert chat.object == "chat.completion"
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == expected.text
        assert chat.usage.prompt_tokens == expected.prompt_tokens
        assert chat.usage.completion_tokens == NEW_TOKENS


def test_chat_takes_system_turns_and_text_parts(oai):
    as_string = oai.chat.completions.create(
        model=BASE_ID, temperature=0, max_tokens=NEW_TOKENS,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    as_parts = oai.chat.completions.create(
        model=BASE_ID, temperature=0, max_tokens=NEW_TOKENS,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    plain = oai.chat.completions.create(model=BASE_ID, temperature=0, max_tokens=NEW_TOKENS,
                                        messages=[{"role": "user", "content": "Hello there"}])
    assert as_string.choices[0].message.content == as_parts.choices[0].message.content
    assert as_string.usage.prompt_tokens == as_parts.usage.prompt_tokens > plain.usage.prompt_tokens


def test_default_max_tokens_follow_openai_for_completions_and_the_server_for_chat(world, oai):
    server = world[2]
    completion = oai.completions.create(model=BASE_ID, prompt="Numbers", temperature=0,
                                        extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16  # OpenAI's completions default
    chat = oai.chat.completions.create(model=BASE_ID, temperature=0, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == NEW_TOKENS  # --default-max-new-tokens
    assert server.generation_layer.config.default_max_new_tokens == NEW_TOKENS


def test_stop_string_ends_with_finish_reason_stop(oai):
    free = oai.completions.create(model=BASE_ID, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    stopped = oai.completions.create(model=BASE_ID, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and text.startswith(stopped.choices[0].text)


def test_seeded_sampling_repeats(oai):
    answers = {oai.completions.create(model="a4", prompt="Seven", max_tokens=NEW_TOKENS, temperature=0.9,
                                      top_p=0.9, seed=1234, extra_body={"top_k": 20}).choices[0].text
               for _ in range(2)}
    assert len(answers) == 1


# -- streaming -----------------------------------------------------------------------------

def test_sixteen_concurrent_streaming_chats_equal_their_unary_answers(oai):
    jobs = [(f"a{index % 8}", PROMPTS[index % len(PROMPTS)]) for index in range(16)]

    def unary(model, prompt):
        return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})

    def streamed(model, prompt):
        stream = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=NEW_TOKENS, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
        return list(stream)

    with ThreadPoolExecutor(16) as pool:
        streams = list(pool.map(lambda job: streamed(*job), jobs))
    for (model, prompt), chunks in zip(jobs, streams):
        answer = unary(model, prompt)
        *content, usage_chunk = chunks
        assert content[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in content) == answer.choices[0].message.content
        assert [c.choices[0].finish_reason for c in content][-1] == "length"
        assert all(c.choices[0].finish_reason is None for c in content[:-1])
        assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == NEW_TOKENS
        assert usage_chunk.usage.prompt_tokens == answer.usage.prompt_tokens
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_stream_ends_with_done(world):
    server = world[2]
    body = {"model": "a0", "prompt": "The river", "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    status, text = http(server, "POST", "/v1/completions", body)
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    _, whole = http(server, "POST", "/v1/completions", {**body, "stream": False})
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]


def test_async_client_completion_and_streaming_chat(world, oai):
    server = world[2]

    async def main():
        async with openai_client(server, asynchronous=True) as client:
            completion, stream = await asyncio.gather(
                client.completions.create(model="a6", prompt="Rain falls on", max_tokens=NEW_TOKENS, temperature=0),
                client.chat.completions.create(model="a7", messages=[{"role": "user", "content": "Seven"}],
                                               max_tokens=NEW_TOKENS, temperature=0, stream=True))
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            return completion.choices[0].text, "".join(pieces)

    text, streamed = asyncio.run(main())
    assert text == oai.completions.create(model="a6", prompt="Rain falls on", max_tokens=NEW_TOKENS,
                                          temperature=0).choices[0].text
    assert streamed == oai.chat.completions.create(model="a7", messages=[{"role": "user", "content": "Seven"}],
                                                   max_tokens=NEW_TOKENS, temperature=0).choices[0].message.content
