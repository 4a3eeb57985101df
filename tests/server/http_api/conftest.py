"""One server for the whole folder (a tiny random Llama, 8 adapters registered as a0..a7,
and a "bomb" adapter whose weights overflow the logits, left unregistered), with an
`openai` client and a gRPC client on it. Tests that need other settings start their own
server with fixtures_http.start."""

from __future__ import annotations

import pytest
from fixtures_http import openai_client, start
from fixtures_models import build_peft_adapter, build_tiny_model, make_adapter_zoo

from loraquilt.client import LoraQuiltClient


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def oai(world):
    with openai_client(world[2]) as client:
        yield client


@pytest.fixture(scope="package")
def grpc_client(world):
    with LoraQuiltClient(world[2].target, timeout=60) as client:
        yield client
