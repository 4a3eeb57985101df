"""The Dockerfile's cpu target, built and run with podman (slow).

The build needs no image registry: deploy/docker/build_local.py makes a Debian base with
mmdebstrap (cached under the user cache dir and in podman's store), then builds the cpu
target on it with pip configured as on this machine. The container then serves the project's
own client over gRPC, the OpenAI-compatible HTTP API and /metrics on loopback ports, takes
a PEFT adapter from its /adapters mount, and on SIGTERM finishes the request in flight
and exits 0. Skipped where podman or mmdebstrap is missing or podman cannot start a
container, or not run as root."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from loraquilt.client import LoraQuiltClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PODMAN = os.environ.get("LORAQUILT_TEST_PODMAN", "podman")
TAG = "localhost/loraquilt-test:cpu"
SHIPPED = REPO / "train" / "demo" / "shipped"


def _build_local():
    spec = importlib.util.spec_from_file_location("build_local", REPO / "deploy" / "docker" / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image():
    """(tag, podman run options for this host). The base's absence of tools is a skip; a
    failing build is a failure."""
    if shutil.which(PODMAN) is None:
        pytest.skip("needs podman (Debian: apt-get install podman mmdebstrap; runc too on hosts "
                    "with hybrid cgroups)")
    if os.geteuid() != 0:
        pytest.skip("needs root: the image is built with rootful podman")
    build_local = _build_local()
    try:
        base = build_local.base_image(PODMAN)
        options = build_local.run_options(PODMAN, base)
    except build_local.BuildError as error:
        pytest.skip(str(error))
    started = time.monotonic()
    build_local.build(TAG, PODMAN)
    print(f"image built in {time.monotonic() - started:.0f}s")
    return TAG, options


def _port(name: str, container_port: int) -> int:
    out = subprocess.run([PODMAN, "port", name, f"{container_port}/tcp"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[0].rpartition(":")[2])


def _logs(name: str) -> str:
    result = subprocess.run([PODMAN, "logs", name], capture_output=True, text=True)
    return (result.stdout + result.stderr)[-4000:]


def _running(name: str) -> bool:
    out = subprocess.run([PODMAN, "inspect", "--format", "{{.State.Running}}", name],
                         capture_output=True, text=True).stdout
    return out.strip() == "true"


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def server(image, tmp_path_factory):
    """A running container: its name and the host's loopback ports for gRPC, HTTP, metrics."""
    tag, options = image
    adapters = tmp_path_factory.mktemp("adapters")
    (shout,) = SHIPPED.glob("shout-*")
    shutil.copytree(shout, adapters / "shout", ignore=shutil.ignore_patterns("training_report.json"))
    name = f"loraquilt-test-{os.getpid()}"
    subprocess.run([PODMAN, "run", "--detach", "--name", name, *options,
                    "--publish", "127.0.0.1::50051", "--publish", "127.0.0.1::8000",
                    "--publish", "127.0.0.1::9464", "--volume", f"{adapters}:/adapters:ro",
                    tag], check=True, capture_output=True)
    try:
        ports = {"grpc": _port(name, 50051), "http": _port(name, 8000), "metrics": _port(name, 9464)}
        deadline = time.monotonic() + 180
        while True:
            assert _running(name), "the container stopped:\n" + _logs(name)
            try:
                if _get(f"http://127.0.0.1:{ports['http']}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not serving after 180 s:\n" + _logs(name)
            time.sleep(0.5)
        yield name, ports
    finally:
        subprocess.run([PODMAN, "rm", "--force", "--time", "0", name], capture_output=True)


def test_generate_over_grpc_with_the_project_client(server):
    _, ports = server
    with LoraQuiltClient(f"127.0.0.1:{ports['grpc']}", timeout=120, retries=1) as client:
        reply = client.generate("What is the capital of France?", chat=True, max_new_tokens=12)
        assert "Paris" in reply.text
        assert reply.completion_tokens > 0 and reply.finish_reason in ("length", "eos", "stop")
        info = client.register_adapter("shout", "shout")  # from the /adapters mount
        assert info.name == "shout" and info.rank == 8
        shouted = client.generate("What is the capital of France?", chat=True, max_new_tokens=12,
                                  adapter="shout")
        assert shouted.text and shouted.text != reply.text
        assert [adapter.name for adapter in client.list_adapters()] == ["shout"]


def test_completions_over_http(server):
    _, ports = server
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports['http']}/v1/completions", method="POST",
        headers={"content-type": "application/json"},
        data=json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is",
                         "max_tokens": 6, "temperature": 0}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        body = json.loads(response.read())
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["completion_tokens"] == 6


def test_metrics_scrape(server):
    _, ports = server
    with LoraQuiltClient(f"127.0.0.1:{ports['grpc']}", timeout=120, retries=1) as client:
        client.generate("Hello", max_new_tokens=3, ignore_eos=True)
    status, text = _get(f"http://127.0.0.1:{ports['metrics']}/metrics")
    assert status == 200
    assert "# TYPE loraquilt_requests_total counter" in text
    ok = re.search(r'^loraquilt_requests_total\{status="ok"\} (\S+)$', text, flags=re.M)
    assert ok and float(ok.group(1)) >= 1
    generated = re.search(r"^loraquilt_generated_tokens_total (\S+)$", text, flags=re.M)
    assert generated and float(generated.group(1)) >= 3


def test_sigterm_drains_then_exits_zero(server):
    name, ports = server
    client = LoraQuiltClient(f"127.0.0.1:{ports['grpc']}", timeout=120, retries=1)
    try:
        stream = client.generate_stream("Count to one thousand:", max_new_tokens=256, ignore_eos=True)
        next(stream)  # in flight
        subprocess.run([PODMAN, "kill", "--signal", "TERM", name], check=True, capture_output=True)
        draining = time.monotonic() + 10
        while "finishing in-flight" not in _logs(name):
            assert time.monotonic() < draining, _logs(name)
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate("Hello", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = list(stream)
    finally:
        client.close()
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 256
    exit_code = subprocess.run([PODMAN, "wait", name], capture_output=True, text=True, timeout=60).stdout
    assert exit_code.strip() == "0", _logs(name)
    assert "loraquilt stopped" in _logs(name)
