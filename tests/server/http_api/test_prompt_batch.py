"""Completions with several prompts in one request (OpenAI's `prompt: [...]`, what
lm-evaluation-harness sends with a batch size): choice i·n + j is prompt i's j-th and equals
that prompt asked alone, the usage sums the prompts, streams name every choice, echo scores
each prompt, and a refused prompt refuses the request and leaves nothing running."""

from __future__ import annotations

import openai
import pytest
from fixtures_http import BASE_ID, PROMPTS, http, streamed_choices
from fixtures_server import wait_until


def test_choices_follow_the_prompts_and_equal_each_alone(oai):
    prompts = list(PROMPTS[:3])
    options = dict(model="a3", max_tokens=6, temperature=1.1, seed=12, n=2, extra_body={"ignore_eos": True})
    batch = oai.completions.create(prompt=prompts, **options)
    assert [choice.index for choice in batch.choices] == list(range(6))
    alone = [oai.completions.create(prompt=prompt, **options) for prompt in prompts]
    for number, single in enumerate(alone):
        assert [c.text for c in batch.choices[2 * number:2 * number + 2]] == [c.text for c in single.choices]
    assert batch.usage.prompt_tokens == sum(single.usage.prompt_tokens for single in alone)
    assert batch.usage.completion_tokens == 36


def test_text_and_token_prompts_with_echo_score_each_prompt(oai):
    """lm-eval's loglikelihood call with a batch: echo, logprobs 1, max_tokens 0."""
    token_prompt = [4, 9, 33, 12, 7]
    batch = oai.completions.create(model="a1", prompt=[PROMPTS[2], token_prompt], max_tokens=0, echo=True,
                                   logprobs=1)
    first = oai.completions.create(model="a1", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1)
    second = oai.completions.create(model="a1", prompt=token_prompt, max_tokens=0, echo=True, logprobs=1)
    for choice, single in zip(batch.choices, (first, second)):
        assert choice.text == single.choices[0].text
        assert choice.logprobs.token_logprobs == single.choices[0].logprobs.token_logprobs
        assert choice.logprobs.text_offset == single.choices[0].logprobs.text_offset
    assert batch.choices[0].text == PROMPTS[2] and len(batch.choices[1].logprobs.tokens) == len(token_prompt)


def test_a_stream_of_several_prompts_names_every_choice(oai):
    prompts = list(PROMPTS[:3])
    whole = oai.completions.create(model="a2", prompt=prompts, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(model="a2", prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts, reasons = streamed_choices(chunks)
    assert texts == {choice.index: choice.text for choice in whole.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_refused_prompt_refuses_the_request_and_leaves_nothing_running(world, oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="a0", prompt=[PROMPTS[0], "river " * 3000, PROMPTS[1]], max_tokens=4)
    assert caught.value.body["param"] == "prompt" and "tokens" in caught.value.body["message"]
    status, answer = http(world[2], "POST", "/v1/completions",
                          {"model": BASE_ID, "prompt": ["x"] * 129, "max_tokens": 1})
    assert status == 400 and "at most 128 prompts" in answer["error"]["message"]
    assert wait_until(lambda: not world[2].engine.has_work())  # the prompt opened before it was cancelled
    assert oai.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=2).choices[0].finish_reason
