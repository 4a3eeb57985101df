"""The OpenAI-compatible HTTP API of a real server on 127.0.0.1, driven by the real
`openai` client (sync and async), against the gRPC answers of the same server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fixtures_models import build_peft_adapter, build_tiny_model, make_adapter_zoo
from fixtures_server import metric_value, scrape, wait_until

from loraquilt.client import LoraQuiltClient
from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.frontend import ServerStartError
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig

NEW_TOKENS = 8
PROMPTS = ("The river", "Birds fly over the", "A long time ago in a quiet town", "Numbers",
           "The market opens", "Rain falls on", "Seven", "Under the bridge")
ADMIN_TOKEN = "admin-token-0123456789abcdef"
API_KEY = "api-key-0123456789abcdef"
BASE_ID = "tiny-base"
LONG = 2000  # new tokens of a request that must still run when the test acts on it


def engine_config(base, **overrides) -> EngineConfig:
    settings = dict(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=16, max_active_adapters=8,
                    max_cpu_adapters=16, max_lora_rank=16, max_seq_len=2048, lora_backend="torch", progress=False)
    return EngineConfig(**{**settings, **overrides})


def start(base, adapter_root, *, engine=None, **server) -> RunningServer:
    settings = dict(port=0, metrics_port=0, http_port=0, grace_seconds=10, served_model_name=BASE_ID,
                    service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=NEW_TOKENS,
                                          max_new_tokens_limit=LONG))
    return RunningServer(Engine(engine or engine_config(base)), ServerConfig(**{**settings, **server}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    base = build_tiny_model(root / "base", "llama", seed=21, config_overrides={"max_position_embeddings": 4096})
    adapter_root = root / "adapters"
    make_adapter_zoo(base, adapter_root, count=8, seed=210)
    build_peft_adapter(base, adapter_root / "bomb", r=8, lora_alpha=16, scale=1e20, seed=5)
    server = start(base, adapter_root)
    for index in range(8):
        server.engine.register_adapter(f"a{index}", adapter_root / f"adapter-{index}")
    yield base, adapter_root, server
    server.shutdown(grace=5)


def openai_client(server, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=options.pop("api_key", "unused"),
                         max_retries=0, timeout=60, **options)


@pytest.fixture(scope="module")
def oai(world):
    with openai_client(world[2]) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(world):
    with LoraQuiltClient(world[2].target, timeout=60) as client:
        yield client


def http(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain HTTP call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(server, name: str, labels: str = "") -> float:
    return metric_value(scrape(server), name, labels)


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
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused",
                                      max_retries=0, timeout=60) as client:
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


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exception, param, words", [
    pytest.param(dict(model="nobody"), openai.NotFoundError, "model", "nobody", id="unknown-model"),
    pytest.param(dict(model=BASE_ID, extra_body={"adapters": [{"name": "ghost", "weight": 1}]}),
                 openai.NotFoundError, "model", "ghost", id="unknown-adapter-in-mix"),
    pytest.param(dict(model="a1", extra_body={"adapters": [{"name": "a2", "weight": 1}]}),
                 openai.BadRequestError, "adapters", "base", id="adapter-and-mix"),
    pytest.param(dict(model=BASE_ID, temperature=-1), openai.BadRequestError, "temperature", ">= 0",
                 id="negative-temperature"),
    pytest.param(dict(model=BASE_ID, top_p=1.5), openai.BadRequestError, "top_p", "(0, 1]", id="top-p"),
    pytest.param(dict(model=BASE_ID, max_tokens=0), openai.BadRequestError, "max_tokens", ">= 1", id="zero-tokens"),
    pytest.param(dict(model=BASE_ID, max_tokens=100000), openai.BadRequestError, "max_tokens", "limit",
                 id="over-the-limit"),
    pytest.param(dict(model=BASE_ID, n=2), openai.BadRequestError, "n", "n=1", id="n"),
    pytest.param(dict(model=BASE_ID, extra_body={"top_k": "many"}), openai.BadRequestError, "top_k", "integer",
                 id="top-k-type"),
    pytest.param(dict(model="bad name!"), openai.BadRequestError, "model", "adapter names", id="bad-name"),
    pytest.param(dict(model=BASE_ID, prompt="river " * 3000), openai.BadRequestError, "prompt", "tokens",
                 id="prompt-too-long"),
])
def test_bad_requests_raise_the_matching_client_exception(oai, call, exception, param, words):
    options = {"prompt": "The river", "max_tokens": 4, **call}
    with pytest.raises(exception) as caught:
        oai.completions.create(**options)
    error = caught.value.body
    assert error["param"] == param, error
    assert words in error["message"] and error["type"] and error["code"]


def test_chat_errors_name_the_message_and_its_field(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=BASE_ID, messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "hi"}, {
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "text parts" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages[1].content"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=BASE_ID, messages=[])


def test_malformed_and_oversized_bodies(world):
    server = world[2]
    status, body = http(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = http(server, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400
    for framing in ("length", "chunked"):  # declared too large, or found too large while reading
        sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        head = "Content-Length: 6000000" if framing == "length" else "Transfer-Encoding: chunked"
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"{head}\r\n\r\n".encode())
        try:
            for _ in range(6 if framing == "chunked" else 1):
                piece = b"x" * (1 << 20)
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if framing == "chunked" else piece)
        except OSError:  # the server answered and closed before reading it all
            pass
        reply = b""
        while b"payload_too_large" not in reply:
            piece = sock.recv(65536)
            if not piece:
                break
            reply += piece
        reply = reply.decode(errors="replace")
        sock.close()
        assert reply.startswith("HTTP/1.1 413") and "payload_too_large" in reply, reply[:300]
    status, _ = http(server, "GET", "/v1/nothing")
    assert status == 404
    status, _ = http(server, "GET", "/v1/completions")
    assert status == 405
    assert http(server, "GET", "/health") == (200, "ok")


def test_non_finite_logits_are_a_500_and_the_server_serves_on(world, oai):
    server = world[2]
    server.engine.register_adapter("bomb", world[1] / "bomb")
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            oai.completions.create(model="bomb", prompt="The river", max_tokens=4)
        assert caught.value.status_code == 500 and "non-finite" in caught.value.body["message"]
        status, text = http(server, "POST", "/v1/completions", {"model": "bomb", "prompt": "The river", "stream": True})
        assert status == 200  # the stream had started: the error is an event, then [DONE]
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        assert events[-1] == "[DONE]" and "non-finite" in json.loads(events[-2])["error"]["message"]
    finally:
        server.engine.unregister_adapter("bomb")
    assert oai.completions.create(model="a0", prompt="The river", max_tokens=2).usage.completion_tokens >= 1


def test_changed_adapter_files_are_a_409(world):
    base, adapter_root, _ = world
    server = start(base, adapter_root, engine=engine_config(base, max_cpu_adapters=1, max_active_adapters=1))
    shutil.copytree(adapter_root / "adapter-0", adapter_root / "changing")
    try:
        server.engine.register_adapter("changing", adapter_root / "changing")
        server.engine.register_adapter("other", adapter_root / "adapter-1")  # evicts "changing" from memory
        shutil.copy(adapter_root / "adapter-1" / "adapter_model.safetensors",
                    adapter_root / "changing" / "adapter_model.safetensors")
        with openai_client(server) as client:
            with pytest.raises(openai.ConflictError) as caught:
                client.completions.create(model="changing", prompt="The river", max_tokens=4)
        assert caught.value.status_code == 409 and caught.value.body["code"] == "failed_precondition"
    finally:
        server.shutdown(grace=5)
        shutil.rmtree(adapter_root / "changing")


def test_queue_full_is_a_429(world):
    base, adapter_root, _ = world
    server = start(base, adapter_root, engine=engine_config(base, max_batch_size=1, max_waiting=1))
    try:
        with openai_client(server) as client:
            def one(_):
                try:
                    client.completions.create(model=BASE_ID, prompt="The river", max_tokens=200,
                                              extra_body={"ignore_eos": True})
                    return "ok"
                except openai.RateLimitError as error:
                    assert error.status_code == 429 and error.body["code"] == "resource_exhausted"
                    return "429"
            with ThreadPoolExecutor(6) as pool:
                outcomes = list(pool.map(one, range(6)))
        assert "429" in outcomes and "ok" in outcomes
    finally:
        server.shutdown(grace=5)


# -- models, adapters, credentials -----------------------------------------------------------

def test_models_list_the_base_and_every_adapter(world, oai):
    server = world[2]
    cards = {card.id: card for card in oai.models.list().data}
    assert set(cards) >= {BASE_ID, *(f"a{i}" for i in range(8))}
    base = cards[BASE_ID]
    assert base.object == "model" and base.owned_by == "loraquilt"
    assert base.model_extra["parent"] is None and base.model_extra["max_model_len"] == server.engine.max_seq_len
    assert cards["a3"].model_extra["parent"] == BASE_ID and cards["a3"].model_extra["root"] == "adapter-3"
    assert isinstance(cards["a3"].created, int)


def test_load_and_unload_round_trip(world, oai):
    server = world[2]
    status, text = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "adapter-2"})
    assert status == 200, text
    assert "fresh" in {card.id for card in oai.models.list().data}
    assert oai.completions.create(model="fresh", prompt="The river", max_tokens=4, temperature=0).choices[0].text == \
        oai.completions.create(model="a2", prompt="The river", max_tokens=4, temperature=0).choices[0].text
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "adapter-2"})
    assert status == 400 and "already" in body["error"]["message"]
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "out", "lora_path": "../.."})
    assert status == 403
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "empty", "lora_path": "missing"})
    assert status == 400
    status, _ = http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 200
    assert "fresh" not in {card.id for card in oai.models.list().data}
    status, body = http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 404
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="fresh", prompt="The river", max_tokens=4)


def test_api_key_and_admin_token_are_enforced(world):
    base, adapter_root, _ = world
    server = start(base, adapter_root, admin_token=ADMIN_TOKEN, api_key=API_KEY)
    try:
        with openai_client(server, api_key=API_KEY) as client:
            assert client.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
            assert BASE_ID in {card.id for card in client.models.list().data}
        with openai_client(server, api_key="wrong-key-0123456789") as client:
            with pytest.raises(openai.PermissionDeniedError):
                client.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2)
            with pytest.raises(openai.PermissionDeniedError):
                client.models.list()
        status, body = http(server, "POST", "/v1/chat/completions", {"model": BASE_ID, "messages": []})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        with openai_client(server, default_headers={"Authorization": "Basic abc"}) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}])
        load = {"lora_name": "x", "lora_path": "adapter-1"}
        assert http(server, "POST", "/v1/load_lora_adapter", load,
                    {"Authorization": f"Bearer {API_KEY}"})[0] == 403
        assert http(server, "POST", "/v1/load_lora_adapter", load)[0] == 401
        assert http(server, "POST", "/v1/load_lora_adapter", load, {"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 200
        assert http(server, "GET", "/health")[0] == 200  # open: probes carry no key
        with LoraQuiltClient(server.target, timeout=30, api_key=API_KEY, admin_token=ADMIN_TOKEN) as good:
            assert good.generate("Hi", max_new_tokens=2).completion_tokens >= 1
            assert [a.name for a in good.list_adapters()] == ["x"]
            good.unregister_adapter("x")
        import grpc

        with LoraQuiltClient(server.target, timeout=30, retries=1) as keyless:
            with pytest.raises(grpc.RpcError) as caught:
                keyless.generate("Hi", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                list(keyless.generate_stream("Hi", max_new_tokens=2))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                keyless.list_adapters()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.shutdown(grace=5)


# -- disconnects, draining, metrics -----------------------------------------------------------

def _raw_post(server, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_client_that_disconnects_frees_its_sequence(world, stream):
    server = world[2]
    cancelled = metric(server, "loraquilt_requests_total", 'status="cancelled"')
    generated = metric(server, "loraquilt_generated_tokens_total")
    sock = _raw_post(server, {"model": "a1", "prompt": "The river", "max_tokens": LONG, "ignore_eos": True,
                              "stream": stream})
    assert wait_until(lambda: metric(server, "loraquilt_generated_tokens_total") > generated + 2, seconds=20)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    assert wait_until(lambda: metric(server, "loraquilt_running_requests") == 0, seconds=20)
    assert wait_until(lambda: metric(server, "loraquilt_requests_total", 'status="cancelled"') == cancelled + 1,
                      seconds=20)
    assert metric(server, "loraquilt_generated_tokens_total") < generated + LONG


def test_http_generations_are_counted_with_grpc_ones(world, oai):
    server = world[2]
    ok = metric(server, "loraquilt_requests_total", 'status="ok"')
    routed = metric(server, "loraquilt_http_requests_total", 'code="200",route="/v1/completions"')
    not_found = metric(server, "loraquilt_requests_total", 'status="not_found"')
    oai.completions.create(model="a0", prompt="Numbers", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="ghost", prompt="Numbers", max_tokens=2)
    assert metric(server, "loraquilt_requests_total", 'status="ok"') == ok + 1
    assert metric(server, "loraquilt_requests_total", 'status="not_found"') == not_found + 1
    assert metric(server, "loraquilt_http_requests_total", 'code="200",route="/v1/completions"') == routed + 1
    assert metric(server, "loraquilt_http_requests_total", 'code="404",route="/v1/completions"') >= 1


def test_shutdown_drains_http_like_grpc(world):
    base, adapter_root, _ = world
    server = start(base, adapter_root)
    outcome = {}

    def long_request():
        with openai_client(server) as client:
            outcome["answer"] = client.completions.create(model=BASE_ID, prompt="The river", max_tokens=LONG,
                                                          extra_body={"ignore_eos": True})

    worker = threading.Thread(target=long_request)
    worker.start()
    assert wait_until(lambda: metric(server, "loraquilt_running_requests") == 1, seconds=20)
    stopper = threading.Thread(target=server.shutdown, kwargs={"grace": 60})
    stopper.start()
    assert wait_until(lambda: http(server, "GET", "/health")[0] == 503, seconds=20)
    with openai_client(server) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 503 and "shutting down" in caught.value.body["message"]
    worker.join(60)
    stopper.join(60)
    assert outcome["answer"].usage.completion_tokens == LONG


def test_an_http_port_in_use_is_a_clear_error_and_leaves_nothing_running(world):
    base, adapter_root, _ = world
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port} for the HTTP API"):
            start(base, adapter_root, http_port=port)
