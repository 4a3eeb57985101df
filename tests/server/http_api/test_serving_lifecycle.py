"""A server's life around HTTP requests: a client that disconnects frees its sequence,
HTTP generations count in the same metrics as gRPC ones, shutdown drains HTTP like gRPC,
and an HTTP port in use stops the start with a clear error."""

from __future__ import annotations

import json
import socket
import threading

import openai
import pytest
from fixtures_http import BASE_ID, LONG, http, metric, openai_client, start
from fixtures_server import wait_until

from loraquilt.server.frontend import ServerStartError


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
