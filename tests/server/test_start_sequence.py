"""A server part that cannot start (a port in use, TLS files that do not load, a state file
it cannot use, a preload it cannot register) is one ServerStartError line, and every part
started before it is stopped: its ports can be bound again and no engine loop thread is
left running."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.auth import TLSFiles
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.frontend import ServerStartError
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("start")
    base = build_tiny_model(tmp / "base", "llama", seed=5)
    root = tmp / "adapters"
    make_adapter_zoo(base, root, count=1, seed=50)
    engine = Engine(EngineConfig(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=4,
                                 max_active_adapters=2, max_seq_len=64, progress=False))
    return base, root, engine


def busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def loop_threads() -> int:
    return sum(thread.name == "loraquilt-engine" and thread.is_alive() for thread in threading.enumerate())


def refused(engine, **settings) -> str:
    before = loop_threads()
    config = ServerConfig(**{"port": 0, "metrics_port": None, "http_port": None, "grace_seconds": 1, **settings})
    with pytest.raises(ServerStartError) as caught:
        RunningServer(engine, config)
    message = str(caught.value)
    assert "\n" not in message
    assert loop_threads() == before  # the engine loop it started is stopped again
    return message


def test_metrics_port_in_use_stops_grpc_and_http(world):
    _, root, engine = world
    grpc_port, http_port = free_port(), free_port()
    with busy_port() as holder:
        port = holder.getsockname()[1]
        message = refused(engine, port=grpc_port, http_port=http_port, metrics_port=port,
                          service=ServiceConfig(adapter_root=root))
    assert message.startswith("metrics: ") and f"127.0.0.1:{port}" in message
    assert bindable(grpc_port) and bindable(http_port)


def test_http_port_in_use_stops_grpc(world):
    _, _, engine = world
    grpc_port = free_port()
    with busy_port() as holder:
        message = refused(engine, port=grpc_port, http_port=holder.getsockname()[1])
    assert message.startswith("HTTP API: ") and "cannot listen" in message
    assert bindable(grpc_port)


def test_grpc_port_in_use(world):
    _, _, engine = world
    with busy_port() as holder:
        message = refused(engine, port=holder.getsockname()[1])
    assert message.startswith("gRPC: cannot listen on 127.0.0.1:")


def test_tls_files_that_do_not_load(world, tmp_path):
    _, _, engine = world
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    grpc_port = free_port()
    message = refused(engine, port=grpc_port, tls=TLSFiles(tmp_path / "cert.pem", tmp_path / "key.pem"))
    assert message.startswith("gRPC: ") and "PEM" in message
    assert bindable(grpc_port)
    missing = refused(engine, tls=TLSFiles(tmp_path / "nope.pem", tmp_path / "key.pem"))
    assert "cannot read TLS files" in missing


def test_a_state_file_it_cannot_use(world, tmp_path):
    _, root, engine = world
    (tmp_path / "adapters.json").write_text("{not json")
    message = refused(engine, state_dir=tmp_path, service=ServiceConfig(adapter_root=root))
    assert message.startswith("state dir: ") and "adapters.json" in message


def test_a_preload_it_cannot_register_stops_everything(world, tmp_path):
    _, root, engine = world
    grpc_port = free_port()
    message = refused(engine, port=grpc_port, preload=(("broken", str(tmp_path / "missing")),),
                      service=ServiceConfig(adapter_root=root))
    assert message.startswith("--preload broken=") and "does not exist" in message
    assert bindable(grpc_port)
    assert [record.name for record in engine.adapters.records()] == []


def test_serve_prints_one_line_and_exits_nonzero(world):
    base, _, _ = world
    with busy_port() as holder:
        done = subprocess.run(
            [sys.executable, "-m", "loraquilt", "serve", "--model", str(base), "--port", "0", "--http-port", "-1",
             "--metrics-port", str(holder.getsockname()[1]), "--dtype", "float32"],
            capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loraquilt serve: metrics: cannot listen on"), done.stderr[-2000:]
