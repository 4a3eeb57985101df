"""Refusals of the OpenAI-compatible API: each bad request is the matching `openai`
exception with an OpenAI error body naming the field; malformed and oversized bodies,
non-finite logits (500), changed adapter files (409) and a full queue (429)."""

from __future__ import annotations

import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fixtures_http import BASE_ID, engine_config, http, openai_client, start


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
    pytest.param(dict(model=BASE_ID, n=17), openai.BadRequestError, "n", "[1, 16]", id="n"),
    pytest.param(dict(model=BASE_ID, n=3, best_of=2), openai.BadRequestError, "best_of", "[n, 16]", id="best-of"),
    pytest.param(dict(model=BASE_ID, best_of=3, stream=True), openai.BadRequestError, "best_of", "streamed",
                 id="best-of-streamed"),
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
