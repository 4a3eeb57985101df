"""Admin token, TLS and adapter-count limits on a live server (127.0.0.1, real TLS)."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.__main__ import main
from loraquilt.client import LoraQuiltClient
from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.auth import AuthConfigError, BearerCheck, TLSFiles, read_token_file
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

TOKEN = "s3cret-admin-token-0123456789"


def self_signed(folder):
    """A certificate for 127.0.0.1 / localhost, made by the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    root = tmp_path_factory.mktemp("security")
    base = build_tiny_model(root / "base", "llama", seed=3)
    adapter_root = root / "adapters"
    folders = make_adapter_zoo(base, adapter_root, count=4, seed=30)
    cert, key = self_signed(root)
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=2, max_adapters=3,
                                 max_seq_len=64, lora_backend="torch", progress=False))
    server = RunningServer(engine, ServerConfig(
        port=0, metrics_port=None, http_port=0, admin_token=TOKEN, tls=TLSFiles(cert, key),
        service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=4)))
    yield server, cert, [f.name for f in folders]
    server.shutdown(grace=5)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_admin_calls_need_the_token(world):
    server, cert, folders = world
    with LoraQuiltClient(server.target, tls=cert, timeout=30) as anonymous:
        assert code_of(lambda: anonymous.register_adapter("x", folders[0])) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: anonymous.unregister_adapter("x")) == grpc.StatusCode.UNAUTHENTICATED
        assert len(anonymous.generate("Hello", ignore_eos=True).token_ids) == 4  # generation stays open
        assert anonymous.list_adapters() == []
    with LoraQuiltClient(server.target, tls=cert, timeout=30, admin_token=TOKEN + "x") as wrong:
        assert code_of(lambda: wrong.register_adapter("x", folders[0])) == grpc.StatusCode.PERMISSION_DENIED
    for header in ("Basic " + TOKEN, TOKEN, "Bearer ", "bearer"):
        with LoraQuiltClient(server.target, tls=cert, timeout=30,
                             metadata=[("authorization", header)]) as malformed:
            error_code = code_of(lambda c=malformed: c.register_adapter("x", folders[0]))
            assert error_code == grpc.StatusCode.UNAUTHENTICATED, header
    with LoraQuiltClient(server.target, tls=cert, timeout=30, admin_token=TOKEN) as admin:
        info = admin.register_adapter("x", folders[0])
        assert info.name == "x"
        assert len(admin.generate("Hello", adapter="x", ignore_eos=True).token_ids) == 4
        admin.unregister_adapter("x")
        assert admin.list_adapters() == []


def test_the_http_api_is_served_over_https_with_the_same_certificate(world):
    import json
    import ssl
    import urllib.request

    server, cert, _ = world
    context = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{server.http_port}"
    with urllib.request.urlopen(f"{base}/health", context=context, timeout=30) as response:
        assert response.status == 200
    models = json.loads(urllib.request.urlopen(f"{base}/v1/models", context=context, timeout=30).read())
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(
        {"model": models["data"][0]["id"], "prompt": "Hello", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 2
    with pytest.raises(Exception):  # plain HTTP to the TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10).read()


def test_plaintext_client_cannot_talk_to_a_tls_server(world):
    server, _, _ = world
    with LoraQuiltClient(server.target, timeout=5) as plaintext:
        assert code_of(lambda: plaintext.generate("Hello")) == grpc.StatusCode.UNAVAILABLE


def test_adapter_count_limit(world):
    server, cert, folders = world
    with LoraQuiltClient(server.target, tls=cert, timeout=30, admin_token=TOKEN) as admin:
        for index in range(3):
            admin.register_adapter(f"n{index}", folders[index])
        with pytest.raises(grpc.RpcError) as error:
            admin.register_adapter("n3", folders[3])
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-adapters" in error.value.details()
        admin.unregister_adapter("n0")
        admin.register_adapter("n3", folders[3])
        assert sorted(a.name for a in admin.list_adapters()) == ["n1", "n2", "n3"]
        for name in ("n1", "n2", "n3"):
            admin.unregister_adapter(name)


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer " + TOKEN), ("authorization", "Bearer " + TOKEN)), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer " + TOKEN[:-1]),), grpc.StatusCode.PERMISSION_DENIED),
    ((("authorization", "Bearer " + TOKEN + TOKEN),), grpc.StatusCode.PERMISSION_DENIED),
    ((("authorization", "BEARER " + TOKEN),), None),
    ((("x-other", "1"), ("authorization", "Bearer " + TOKEN)), None),
])
def test_admin_check_decisions(metadata, code):
    refusal = BearerCheck.for_token(TOKEN).refusal(metadata)
    assert (refusal[0] if refusal else None) == code


def test_token_file_rules(tmp_path):
    good = tmp_path / "token"
    good.write_text(f"  {TOKEN}\n")
    good.chmod(0o600)
    assert read_token_file(good) == TOKEN
    for bad in ("short", "two words here but long enough", ""):
        path = tmp_path / "bad"
        path.write_text(bad)
        with pytest.raises(AuthConfigError):
            read_token_file(path)
    with pytest.raises(AuthConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "cert.pem"], "go together"),
    (["--admin-token-file", "missing-token"], "cannot read admin token file"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.pem"], "cannot read TLS files"),
])
def test_serve_refuses_bad_security_options_before_loading_the_model(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", str(tmp_path / "no-model"), *argv])
    assert message in str(stop.value)
