"""`loraquilt serve` as a real process: CLI client commands, and graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraquilt.client import LoraQuiltClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loraquilt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraquilt", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.fixture()
def served(tmp_path):
    base = build_tiny_model(tmp_path / "base", "llama", seed=11, config_overrides={"max_position_embeddings": 4096})
    make_adapter_zoo(base, tmp_path / "adapters", count=2, seed=110)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "loraquilt", "serve", "--model", str(base), "--port", str(port),
         "--metrics-port", "-1", "--http-port", "0", "--adapter-root", str(tmp_path / "adapters"),
         "--preload", f"first={tmp_path / 'adapters' / 'adapter-0'}", "--max-seq-len", "2048",
         "--grace-seconds", "600", "--lora-backend", "torch"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if "loraquilt serving" in line:
            break
        assert time.monotonic() < deadline and process.poll() is None, "server did not start"
    yield process, f"127.0.0.1:{port}"
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_cli_client_commands(served):
    _, target = served
    listed = loraquilt("adapters", "list", "--json", "--target", target)
    assert listed.returncode == 0, listed.stderr
    assert [a["name"] for a in json.loads(listed.stdout)] == ["first"]
    registered = loraquilt("adapters", "register", "second", "adapter-1", "--target", target)
    assert registered.returncode == 0 and "registered second" in registered.stdout
    with LoraQuiltClient(target, timeout=60) as client:
        expected = client.generate("The river", adapter="second", max_new_tokens=8, ignore_eos=True).text
    generated = loraquilt("generate", "The river", "--adapter", "second", "--max-new-tokens", "8",
                          "--ignore-eos", "--target", target)
    assert generated.returncode == 0 and generated.stdout == expected + "\n"
    streamed = loraquilt("generate", "The river", "--adapter", "second", "--max-new-tokens", "8",
                         "--ignore-eos", "--stream", "--target", target)
    assert streamed.returncode == 0 and streamed.stdout == expected + "\n"
    missing = loraquilt("generate", "x", "--adapter", "nope", "--target", target)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert loraquilt("adapters", "unregister", "second", "--target", target).returncode == 0


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(served):
    process, target = served
    with LoraQuiltClient(target, timeout=120) as client:
        stream = client.generate_stream("The river", adapter="first", max_new_tokens=1500, ignore_eos=True)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(client.channel)
        deadline = time.monotonic() + 60  # the handler runs between engine steps
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "SIGTERM did not start the shutdown"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate("A new request", max_new_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        pieces = [first, *stream]
    assert pieces[-1].finish_reason == "length"
    assert sum(len(p.token_ids) for p in pieces) == 1500
    assert process.wait(timeout=120) == 0
