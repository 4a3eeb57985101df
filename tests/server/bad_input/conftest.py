"""One server for the whole catalogue: a tiny random Llama with two adapters (a0, a1)
registered, its adapter root, and a copy of a good adapter outside that root."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from fixtures_bad_input import CANARY, MAX_LORA_RANK, MAX_SEQ_LEN, NEW_TOKENS_LIMIT, Live
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens


@pytest.fixture(scope="package")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    base = build_tiny_model(tmp / "base", "llama", seed=7)
    root = tmp / "adapters"
    good, other = make_adapter_zoo(base, root, count=2, seed=70)
    outside = shutil.copytree(good, tmp / "outside" / "adapter")
    engine_config = EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=4,
                                 max_lora_rank=MAX_LORA_RANK, max_seq_len=MAX_SEQ_LEN,
                                 lora_backend="torch", progress=False)
    server = RunningServer(Engine(engine_config), ServerConfig(
        port=0, metrics_port=None, grace_seconds=5, preload=(("a0", str(good)), ("a1", str(other))),
        service=ServiceConfig(adapter_root=root, default_max_new_tokens=8,
                              max_new_tokens_limit=NEW_TOKENS_LIMIT)))
    channel = grpc.insecure_channel(server.target)
    live = Live(server, channel, pb_grpc.LoraQuiltStub(channel), root, good, Path(outside))
    live.canary = live.canary_tokens()
    assert len(live.canary) == CANARY["max_new_tokens"]
    yield live
    channel.close()
    server.shutdown(grace=5)
