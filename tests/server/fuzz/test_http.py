"""Fuzzing the HTTP API: random JSON bodies for every route (wrong types, unknown keys,
deep nesting, huge numbers), and random methods, paths, content types, headers and
bodies that are not JSON."""

from __future__ import annotations

import json

import pytest
from fixtures_fuzz import (
    DROP, FREE_NAMES, GOOD_PATHS, HUGE_NUMBERS, JSON_SCALARS, JSON_TEXT, JSON_VALUES, NAMES, PATHS, PROFILES,
    PROTECTED, assert_http_answer, fuzz, perturbed,
)
from fixtures_live import BASE_ID, CLIENT_HTTP, NEW_TOKENS_LIMIT
from hypothesis import strategies as st


# -- HTTP: JSON bodies per route ------------------------------------------------------------------

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
    "n": st.integers(1, 3), "ignore_eos": st.booleans(),
}
HOSTILE_SAMPLING = {
    "model": st.one_of(st.sampled_from(["nope", "", "a0 ", DROP]), JSON_VALUES),
    "max_tokens": st.one_of(st.integers(-5, 2**40), JSON_VALUES),
    "max_completion_tokens": st.one_of(st.integers(-1, NEW_TOKENS_LIMIT + 2), JSON_VALUES),
    "temperature": st.one_of(HUGE_NUMBERS, JSON_VALUES), "top_p": st.one_of(HUGE_NUMBERS, JSON_VALUES),
    "top_k": st.one_of(st.integers(-2**40, 2**40), HUGE_NUMBERS, JSON_VALUES),
    "seed": st.one_of(HUGE_NUMBERS, JSON_VALUES), "stop": st.one_of(JSON_TEXT, st.lists(JSON_TEXT), JSON_VALUES), "stream": JSON_VALUES, "stream_options": JSON_VALUES,
    "n": JSON_VALUES, "ignore_eos": JSON_VALUES, "logprobs": JSON_VALUES, "echo": JSON_VALUES,
    "best_of": st.one_of(st.integers(-2, 20), JSON_VALUES), "unknown_key": JSON_VALUES,
    "merge": st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
        "method": st.one_of(st.sampled_from(["ties", "svd", "dare_linear", "linear"]), JSON_TEXT),
        "density": st.one_of(st.floats(-1, 2), HUGE_NUMBERS, JSON_VALUES), "seed": st.one_of(HUGE_NUMBERS, JSON_VALUES),
        "rank": st.one_of(st.integers(-1, 64), JSON_VALUES), "other": JSON_VALUES})),
    "adapters": st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a0", "a1", "zz"]),
                                                          "weight": st.one_of(HUGE_NUMBERS, JSON_SCALARS)}),
                                    min_size=1, max_size=3), JSON_VALUES),
}
COMPLETION_BODIES = perturbed({**VALID_SAMPLING, "prompt": st.one_of(st.text(min_size=1, max_size=40), st.lists(
                                  st.text(min_size=1, max_size=20), min_size=1, max_size=3))},
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
            assert all(choice["finish_reason"] in ("length", "stop") for choice in answer["choices"])
            sampled = max(body.get("n") or 1, body.get("best_of") or 1)  # per prompt; a best_of's ranked-out too
            prompt = body.get("prompt")
            several = isinstance(prompt, list) and all(isinstance(one, (str, list)) for one in prompt)
            prompts = len(prompt) if several else 1
            assert [choice["index"] for choice in answer["choices"]] == list(range(len(answer["choices"])))
            assert answer["usage"]["completion_tokens"] <= NEW_TOKENS_LIMIT * sampled * prompts
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
