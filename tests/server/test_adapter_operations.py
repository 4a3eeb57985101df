"""Operating a server: adapters resolved on first use (--resolve-adapters), per-adapter
metrics with bounded labels, and the gateway-style `loraquilt_lora_requests_info` gauge,
on a real server on 127.0.0.1."""

from __future__ import annotations

import os
from contextlib import contextmanager
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo
from fixtures_server import metric_value as metric
from fixtures_server import scrape

from loraquilt.client import LoraQuiltClient
from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.server.request import Request, SamplingParams

NEW_TOKENS = 6


def engine_config(base, **overrides) -> EngineConfig:
    settings = dict(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=32, max_active_adapters=8,
                    max_cpu_adapters=400, max_lora_rank=16, max_seq_len=1024, lora_backend="torch", progress=False)
    return EngineConfig(**{**settings, **overrides})


@contextmanager
def serving(base, adapter_root, **server):
    """A real server on 127.0.0.1 (free ports) for the `with` block."""
    settings = dict(port=0, metrics_port=0, http_port=0, grace_seconds=10,
                    service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=NEW_TOKENS,
                                          max_new_tokens_limit=900))
    running = RunningServer(Engine(engine_config(base)), ServerConfig(**{**settings, **server}))
    try:
        yield running
    finally:
        running.shutdown(grace=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("operations")
    base = build_tiny_model(root / "base", "llama", seed=17, config_overrides={"max_position_embeddings": 2048})
    adapter_root = root / "adapters"
    folders = make_adapter_zoo(base, adapter_root, count=6, seed=170)
    reference = Engine(engine_config(base))
    for folder in folders:
        reference.register_adapter(folder.name, folder)
    return base, adapter_root, reference


def expected(reference: Engine, prompt: str, adapter: str) -> tuple[int, ...]:
    request = Request(prompt=prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                              ignore_eos=True))
    return reference.generate([request])[0].token_ids


# -- resolved on first use ---------------------------------------------------------------

def test_first_use_registers_the_folder_once_for_concurrent_callers(world, tmp_path):
    base, adapter_root, reference = world
    with serving(base, adapter_root, resolve_adapters=True) as server:
        with LoraQuiltClient(server.target, timeout=60) as client:
            answer = client.generate("The river", adapter="adapter-2", max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert tuple(answer.token_ids) == expected(reference, "The river", "adapter-2")
            loads = metric(scrape(server), "loraquilt_adapter_loads_total")
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: tuple(client.generate(
                    "Birds fly", adapter="adapter-4", max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids),
                    range(16)))
            assert set(answers) == {expected(reference, "Birds fly", "adapter-4")}
            assert metric(scrape(server), "loraquilt_adapter_loads_total") == loads + 1
            assert {a.name for a in client.list_adapters()} == {"adapter-2", "adapter-4"}
            with pytest.raises(grpc.RpcError) as caught:
                client.generate("x", adapter="no-such-folder", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused",
                           max_retries=0) as oai:  # the HTTP API resolves too
            completion = oai.completions.create(model="adapter-5", prompt="The river", max_tokens=NEW_TOKENS,
                                                temperature=0, extra_body={"ignore_eos": True})
            with LoraQuiltClient(server.target, timeout=60) as client:
                assert completion.choices[0].text == client.generate(
                    "The river", adapter="adapter-5", max_new_tokens=NEW_TOKENS, ignore_eos=True).text


def test_first_use_refuses_names_that_lead_outside_the_root(world, tmp_path):
    base, adapter_root, _ = world
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "adapter-1", outside)  # a real adapter, but outside the root
    (adapter_root / "escape").unlink(missing_ok=True)
    os.symlink(outside, adapter_root / "escape")
    with serving(base, adapter_root, resolve_adapters=True) as server:
        with LoraQuiltClient(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate("x", adapter="escape", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            for bad in ("..", "a/b"):
                with pytest.raises(grpc.RpcError) as caught:
                    client.generate("x", adapter=bad, max_new_tokens=2)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert client.list_adapters() == []
    (adapter_root / "escape").unlink()


def test_without_the_flag_unregistered_names_stay_unknown(world):
    base, adapter_root, _ = world
    with serving(base, adapter_root) as server:
        with LoraQuiltClient(server.target, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate("x", adapter="adapter-2", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# -- per-adapter metrics ---------------------------------------------------------------------

def test_per_adapter_series_count_exactly(world):
    base, adapter_root, _ = world
    with serving(base, adapter_root) as server:
        for name in ("a0", "a1"):
            server.engine.register_adapter(name, adapter_root / f"adapter-{name[1]}")
        with LoraQuiltClient(server.target, timeout=60) as client:
            jobs = [dict(adapter="a0")] * 3 + [dict(mix=[("a0", 0.5), ("a1", 0.5)])] * 2 + [dict()] * 2
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda job: client.generate("The river", max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                                          **job), jobs))
            with pytest.raises(grpc.RpcError):
                client.generate("The river", adapter="ghost", max_new_tokens=2)
        text = scrape(server)
        assert metric(text, "loraquilt_adapter_requests_total", 'adapter="a0",status="ok"') == 5
        assert metric(text, "loraquilt_adapter_requests_total", 'adapter="a1",status="ok"') == 2
        assert metric(text, "loraquilt_adapter_generated_tokens_total", 'adapter="a0"') == 5 * NEW_TOKENS
        assert metric(text, "loraquilt_adapter_generated_tokens_total", 'adapter="a1"') == 2 * NEW_TOKENS
        # an unknown name is counted, but takes no label of its own
        assert metric(text, "loraquilt_adapter_requests_total", 'adapter="_other",status="not_found"') == 1
        assert 'adapter="ghost"' not in text


def test_the_label_bound_holds_with_300_adapters(world, tmp_path):
    base, adapter_root, _ = world
    many_root = tmp_path / "many"
    for index in range(300):  # hard links: 300 adapters to the server, 6 weight files on disk
        folder = many_root / f"m{index}"
        folder.mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(adapter_root / f"adapter-{index % 6}" / file, folder / file)
    with serving(base, many_root, metrics_adapter_labels=100, resolve_adapters=True) as server:
        with LoraQuiltClient(server.target, timeout=120) as client:
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(lambda i: client.generate("Numbers", adapter=f"m{i}", max_new_tokens=2,
                                                        ignore_eos=True), range(300)))
        text = scrape(server)
        labels = set(re.findall(r'loraquilt_adapter_requests_total\{adapter="([^"]+)"', text))
        assert len(labels) == 101 and "_other" in labels
        assert metric(text, "loraquilt_adapter_requests_total", 'adapter="_other",status="ok"') == 200
        assert sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("loraquilt_adapter_generated_tokens_total{")) == 600


def test_lora_requests_info_names_the_running_adapters(world):
    base, adapter_root, _ = world
    with serving(base, adapter_root) as server:
        server.engine.register_adapter("a3", adapter_root / "adapter-3")
        with LoraQuiltClient(server.target, timeout=60) as client:
            worker = threading.Thread(target=lambda: client.generate("The river", adapter="a3", max_new_tokens=900,
                                                                     ignore_eos=True))
            worker.start()
            deadline = time.monotonic() + 30
            pattern = re.compile(r'loraquilt_lora_requests_info\{max_lora="8",running_lora_adapters="a3",'
                                 r'waiting_lora_adapters=""\} (\S+)')
            while not (found := pattern.search(scrape(server))):
                assert time.monotonic() < deadline, scrape(server)
                time.sleep(0.02)
            assert abs(float(found.group(1)) - time.time()) < 60
            worker.join(60)
        assert 'running_lora_adapters=""' in scrape(server)
