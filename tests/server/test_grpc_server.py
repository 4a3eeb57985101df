"""A real server on 127.0.0.1 (ephemeral ports) against the in-process engine."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo
from fixtures_server import metric_value, scrape
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraquilt.client import LoraQuiltClient
from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.request import Request, SamplingParams
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

METRIC_NAMES = (
    "loraquilt_requests_total", "loraquilt_time_to_first_token_seconds",
    "loraquilt_inter_token_latency_seconds", "loraquilt_request_latency_seconds",
    "loraquilt_queue_time_seconds", "loraquilt_prompt_tokens_total", "loraquilt_generated_tokens_total",
    "loraquilt_running_requests", "loraquilt_waiting_requests", "loraquilt_batch_size",
    "loraquilt_adapters", "loraquilt_adapter_loads_total", "loraquilt_adapter_evictions_total",
    "loraquilt_adapter_load_seconds", "loraquilt_adapter_slots", "loraquilt_memory_bytes",
)
NEW_TOKENS = 10
PROMPTS = ("The river", "Birds fly over the", "A long time ago in a quiet town",
           "Numbers", "The market opens", "Rain falls on")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    base = build_tiny_model(root / "base", "llama", seed=7)
    adapter_root = root / "adapters"
    folders = make_adapter_zoo(base, adapter_root, count=10, seed=70)
    engine_config = EngineConfig(device=EXACT, model=str(base), max_batch_size=16, max_active_adapters=6,
                                 max_lora_rank=16, max_seq_len=128, lora_backend="torch", progress=False)
    server = RunningServer(Engine(engine_config), ServerConfig(
        port=0, metrics_port=0, grace_seconds=10,
        service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=NEW_TOKENS,
                              max_new_tokens_limit=64)))
    reference = Engine(engine_config)  # same weights, in process, one request at a time
    for index, folder in enumerate(folders):
        reference.register_adapter(f"a{index}", folder)
    yield server, reference, folders
    server.shutdown(grace=5)


@pytest.fixture(scope="module")
def client(world):
    server, _, _ = world
    with LoraQuiltClient(server.target, timeout=60) as client:
        yield client


def expected_tokens(reference: Engine, prompt: str, adapter=None, mix=()) -> tuple[int, ...]:
    request = Request(prompt=prompt, adapter=adapter, mix=tuple(mix),
                      sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return reference.generate([request])[0].token_ids


def test_concurrent_mixed_traffic_equals_the_engine_alone(world, client):
    server, reference, _ = world
    for index in range(8):
        info = client.register_adapter(f"a{index}", f"adapter-{index}")
        assert info.name == f"a{index}" and info.tier == "host" and info.rank >= 1
    assert sorted(a.name for a in client.list_adapters()) == [f"a{i}" for i in range(8)]
    before = scrape(server)

    jobs = [(PROMPTS[i % len(PROMPTS)], f"a{i % 8}" if i % 5 else "", ()) for i in range(32)]
    jobs.append(("The river bends", "", (("a1", 0.7), ("a4", 0.3))))

    def call(job):
        prompt, adapter, mix = job
        response = client.generate(prompt, adapter=adapter, mix=list(mix), ignore_eos=True)
        return tuple(response.token_ids), response

    def stream(job):
        prompt, adapter, _ = job
        pieces = list(client.generate_stream(prompt, adapter=adapter, ignore_eos=True))
        return pieces

    with ThreadPoolExecutor(max_workers=40) as pool:
        unary = list(pool.map(call, jobs))
        streams = list(pool.map(stream, [("Where do birds go", "a2", ()), ("Old books", "a6", ())]))

    for (prompt, adapter, mix), (tokens, response) in zip(jobs, unary):
        assert tokens == expected_tokens(reference, prompt, adapter or None, mix), (prompt, adapter, mix)
        assert response.finish_reason == "length" and response.completion_tokens == NEW_TOKENS
    for (prompt, adapter), pieces in zip([("Where do birds go", "a2"), ("Old books", "a6")], streams):
        tokens = tuple(t for piece in pieces for t in piece.token_ids)
        assert tokens == expected_tokens(reference, prompt, adapter)
        assert pieces[-1].finish_reason == "length" and all(not p.finish_reason for p in pieces[:-1])
        assert len(pieces) >= 2
        assert "".join(p.text for p in pieces) == reference.generate([Request(
            prompt=prompt, adapter=adapter,
            sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))])[0].text

    after = scrape(server)
    for name in METRIC_NAMES:
        assert f"\n{name}" in after or after.startswith(name), name
    ok = metric_value(after, "loraquilt_requests_total", 'status="ok"') - metric_value(
        before, "loraquilt_requests_total", 'status="ok"')
    assert ok == len(jobs) + 2
    generated = metric_value(after, "loraquilt_generated_tokens_total") - metric_value(
        before, "loraquilt_generated_tokens_total")
    assert generated == (len(jobs) + 2) * NEW_TOKENS
    assert metric_value(after, "loraquilt_running_requests") == 0
    used_slots = metric_value(after, "loraquilt_adapter_slots", 'state="used"')
    assert used_slots >= 1 and used_slots == metric_value(after, "loraquilt_adapters", 'tier="device"')
    assert used_slots + metric_value(after, "loraquilt_adapter_slots", 'state="free"') == 6
    assert metric_value(after, "loraquilt_memory_bytes", 'kind="kv_cache"') > 0
    assert metric_value(after, "loraquilt_memory_bytes", 'kind="process_rss"') > 0
    assert metric_value(after, "loraquilt_adapter_loads_total") >= 8


def test_register_during_traffic_and_unregister_a_running_adapter(world, client):
    server, reference, folders = world
    client.register_adapter("busy", "adapter-2")
    long_call = client.stub.Generate.future(
        __import__("loraquilt.client", fromlist=["build_request"]).build_request(
            "The river", adapter="busy", max_new_tokens=60, ignore_eos=True), timeout=60)
    results = []
    threads = [threading.Thread(target=lambda p=p: results.append(
        client.generate(p, adapter="a0", ignore_eos=True))) for p in PROMPTS[:4]]
    for thread in threads:
        thread.start()
    client.register_adapter("late", "adapter-9")  # while requests run
    for _ in range(600):  # wait until the long request holds its adapter slot
        if server.engine.adapters.get("busy").pins:
            break
        threading.Event().wait(0.01)
    assert server.engine.adapters.get("busy").pins == 1
    client.unregister_adapter("busy")  # its request is running
    response = long_call.result()
    for thread in threads:
        thread.join()
    assert response.finish_reason == "length" and response.completion_tokens == 60
    engine_alone = reference.generate([Request(prompt="The river", adapter="a2", sampling=SamplingParams(
        max_new_tokens=60, ignore_eos=True))])[0]
    assert tuple(response.token_ids) == engine_alone.token_ids  # still its own weights to the end
    assert all(r.finish_reason == "length" for r in results)
    with pytest.raises(grpc.RpcError) as error:
        client.generate("x", adapter="busy")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    late = client.generate("The river", adapter="late", ignore_eos=True)
    assert tuple(late.token_ids) == expected_tokens(reference, "The river", "a9")
    client.unregister_adapter("late")


@pytest.mark.parametrize("call, code, needle", [
    (lambda c: c.generate("x", adapter="missing"), grpc.StatusCode.NOT_FOUND, "missing"),
    (lambda c: c.generate(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (lambda c: c.generate("x", adapter="a0", mix=[("a1", 1.0)]), grpc.StatusCode.INVALID_ARGUMENT, "adapters"),
    (lambda c: c.generate("x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (lambda c: c.generate("x", max_new_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (lambda c: c.register_adapter("a0", "adapter-0"), grpc.StatusCode.ALREADY_EXISTS, "a0"),
    (lambda c: c.register_adapter("x", "../base"), grpc.StatusCode.PERMISSION_DENIED, "outside"),
    (lambda c: c.register_adapter("x/y", "adapter-0"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    (lambda c: c.register_adapter("x", "no-such-folder"), grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
    (lambda c: c.unregister_adapter("missing"), grpc.StatusCode.NOT_FOUND, "missing"),
])
def test_errors_have_the_right_status_and_the_server_keeps_serving(world, client, call, code, needle):
    server, reference, _ = world
    with pytest.raises(grpc.RpcError) as error:
        call(client)
    assert error.value.code() == code
    assert needle in error.value.details()
    canary = client.generate("The river", adapter="a0", ignore_eos=True)
    assert tuple(canary.token_ids) == expected_tokens(reference, "The river", "a0")


def test_symlink_escaping_the_root_is_refused(world, client, tmp_path):
    server, _, folders = world
    outside = tmp_path / "outside"
    shutil.copytree(folders[0], outside)
    link = server.config.service.adapter_root / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.register_adapter("sneaky", "sneaky")
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        link.unlink()


def test_cancelled_stream_frees_its_sequence(world, client):
    server, _, _ = world
    call = client.generate_stream("The river", adapter="a0", max_new_tokens=64, ignore_eos=True)
    next(call)
    call.cancel()
    for _ in range(200):
        if server.engine.stats().running == 0:
            break
        threading.Event().wait(0.05)
    assert server.engine.stats().running == 0
    assert 'status="cancelled"' in scrape(server)


def test_health_and_reflection(world):
    server, _, _ = world
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="loraquilt.v1.LoraQuilt"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "loraquilt.v1.LoraQuilt" in services and "grpc.health.v1.Health" in services
        descriptor = database.FindFileContainingSymbol("loraquilt.v1.LoraQuilt")
        assert descriptor.package == "loraquilt.v1"
        methods = {m.name for m in descriptor.service[0].method}
        assert {"Generate", "GenerateStream", "RegisterAdapter", "UnregisterAdapter", "ListAdapters"} <= methods


def test_async_client(world):
    import asyncio

    from loraquilt.client import AsyncLoraQuiltClient

    server, reference, _ = world

    async def main():
        async with AsyncLoraQuiltClient(server.target, timeout=60) as client:
            names = [a.name for a in await client.list_adapters()]
            unary = await asyncio.gather(*(client.generate(p, adapter="a3", ignore_eos=True) for p in PROMPTS[:3]))
            pieces = [piece async for piece in client.generate_stream("The river", adapter="a5", ignore_eos=True)]
            return names, unary, pieces

    names, unary, pieces = asyncio.run(main())
    assert "a3" in names
    for prompt, response in zip(PROMPTS[:3], unary):
        assert tuple(response.token_ids) == expected_tokens(reference, prompt, "a3")
    assert tuple(t for p in pieces for t in p.token_ids) == expected_tokens(reference, "The river", "a5")
