"""`loraquilt serve-ray` on a local Ray cluster: 2 replicas of a tiny model behind Ray
Serve's gRPC proxy on loopback, against a single engine in this process."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from loraquilt.bench.scaleout import routing_counts  # noqa: E402
from loraquilt.client import LoraQuiltClient, build_request  # noqa: E402
from loraquilt.client.retry import RetryPolicy  # noqa: E402
from loraquilt.scaleout.app import free_port, metrics_urls, start_scaleout  # noqa: E402
from loraquilt.scaleout.config import ReplicaConfig, ScaleoutConfig  # noqa: E402
from loraquilt.server.engine import Engine, EngineConfig  # noqa: E402
from loraquilt.server.request import Request, SamplingParams  # noqa: E402
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc  # noqa: E402
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
LONG = 100  # new tokens of the requests that must still run when a replica is killed
ADAPTERS = 10
PROMPTS = ("The river", "Birds fly over the", "A long time ago in a quiet town", "Numbers", "Rain falls on")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    base = build_tiny_model(root / "base", "llama", seed=7)
    adapter_root = root / "adapters"
    folders = make_adapter_zoo(base, adapter_root, count=ADAPTERS, seed=70)
    reference = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=16, max_active_adapters=ADAPTERS,
                                    max_seq_len=128, lora_backend="torch", progress=False))
    for index, folder in enumerate(folders):
        reference.register_adapter(f"a{index}", folder)
    running = start_scaleout(ScaleoutConfig(replicas=2, port=free_port(), http_port=free_port(),
                                            ray_metrics_port=free_port(), replica=ReplicaConfig(
        model=str(base), adapter_root=adapter_root, max_adapters_per_replica=ADAPTERS, max_batch_size=16,
        resolve_adapters=True,
        max_seq_len=128, max_active_adapters=8, lora_backend="torch", dtype="float32", threads=1,
        default_max_new_tokens=NEW_TOKENS)))
    client = LoraQuiltClient(running.target, timeout=120)
    for index in range(ADAPTERS):
        assert client.register_adapter(f"a{index}", f"adapter-{index}").tier == "disk"
    yield running, reference, client
    client.close()
    running.shutdown()


_reference_lock = threading.Lock()  # the reference engine serves one caller at a time


def expected(reference: Engine, prompt: str, adapter: str = "", mix=(), new_tokens: int = NEW_TOKENS
             ) -> tuple[int, ...]:
    request = Request(prompt=prompt, adapter=adapter or None, mix=tuple(mix),
                      sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    with _reference_lock:
        return reference.generate([request])[0].token_ids


def test_mixed_traffic_through_the_ingress_equals_the_single_engine(cluster):
    running, reference, client = cluster
    jobs = [(PROMPTS[i % len(PROMPTS)], f"a{i % ADAPTERS}" if i % 4 else "", ()) for i in range(36)]
    jobs += [("The river bends", "", (("a1", 0.7), ("a4", 0.3))), ("Old books", "", (("a4", 0.5), ("a1", 0.5)))]

    def call(job):
        prompt, adapter, mix = job
        return tuple(client.generate(prompt, adapter=adapter, mix=list(mix), ignore_eos=True).token_ids)

    def stream(job):
        prompt, adapter, _ = job
        return list(client.generate_stream(prompt, adapter=adapter, ignore_eos=True))

    with ThreadPoolExecutor(max_workers=24) as pool:
        unary = list(pool.map(call, jobs))
        streams = list(pool.map(stream, [("Where do birds go", "a2", ()), ("Old books", "a6", ())]))
    for (prompt, adapter, mix), tokens in zip(jobs, unary):
        assert tokens == expected(reference, prompt, adapter, mix), (prompt, adapter, mix)
    for (prompt, adapter), pieces in zip([("Where do birds go", "a2"), ("Old books", "a6")], streams):
        assert tuple(t for piece in pieces for t in piece.token_ids) == expected(reference, prompt, adapter)
        assert pieces[-1].finish_reason == "length" and len(pieces) >= 2

    # a caller that sends no routing metadata is served the same, only without affinity
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.LoraQuiltStub(channel)
        request = build_request("The river", adapter="a3", ignore_eos=True)
        assert tuple(stub.Generate(request, timeout=120).token_ids) == expected(reference, "The river", "a3")


def test_the_openai_api_through_the_http_proxy(cluster):
    import openai

    running, _, client = cluster
    with openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="unused", max_retries=0, timeout=120) as oai:
        cards = {card.id: card for card in oai.models.list().data}
        assert {f"a{i}" for i in range(ADAPTERS)} <= set(cards)
        assert cards["a3"].model_extra["root"] == "adapter-3" and cards["a3"].model_extra["max_model_len"] == 128
        for index in range(ADAPTERS):  # one call per adapter, each answered as over gRPC
            prompt = PROMPTS[index % len(PROMPTS)]
            completion = oai.completions.create(model=f"a{index}", prompt=prompt, max_tokens=NEW_TOKENS,
                                                temperature=0, extra_body={"ignore_eos": True})
            expected = client.generate(prompt, adapter=f"a{index}", max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert completion.choices[0].text == expected.text
            assert completion.usage.completion_tokens == NEW_TOKENS
        base_id = next(card.id for card in cards.values() if card.model_extra["parent"] is None)
        mix = [("a1", 0.7), ("a4", 0.3)]
        chunks = list(oai.chat.completions.create(
            model=base_id, messages=[{"role": "user", "content": "The river"}], max_tokens=NEW_TOKENS,
            temperature=0, stream=True, extra_body={"ignore_eos": True,
                                                    "adapters": [{"name": n, "weight": w} for n, w in mix]}))
        expected = client.generate("The river", mix=mix, chat=True, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="ghost", prompt="x", max_tokens=2)
        # --resolve-adapters: a folder name under the adapter root is registered on first use
        resolved = oai.completions.create(model="adapter-9", prompt="The river", max_tokens=NEW_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert resolved.choices[0].text == client.generate("The river", adapter="a9", max_new_tokens=NEW_TOKENS,
                                                           ignore_eos=True).text
        assert "adapter-9" in {adapter.name for adapter in client.list_adapters()}
        client.unregister_adapter("adapter-9")
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model="a1", prompt="x", max_tokens=2, temperature=-1)
        assert caught.value.body["param"] == "temperature"


def test_requests_go_to_replicas_that_hold_their_adapter(cluster):
    running, reference, client = cluster
    adapters = [f"a{i}" for i in range(6)]

    def rounds(count: int) -> None:
        def one(adapter: str) -> None:
            for _ in range(count):
                response = client.generate("The market opens", adapter=adapter, ignore_eos=True)
                assert tuple(response.token_ids) == expected(reference, "The market opens", adapter)

        with ThreadPoolExecutor(max_workers=len(adapters)) as pool:
            list(pool.map(one, adapters))

    rounds(1)  # warm: each key resident somewhere
    time.sleep(2.0)  # replicas push their resident keys to Ray Serve's router
    before = routing_counts(running)
    rounds(5)
    after = routing_counts(running)
    hits = sum(after[r]["hit"] - before.get(r, {}).get("hit", 0) for r in after)
    misses = sum(after[r]["miss"] - before.get(r, {}).get("miss", 0) for r in after)
    assert hits + misses == 5 * len(adapters)
    assert hits / (hits + misses) >= 0.9, (hits, misses, after)
    assert len(after) == 2 and all(values["hit"] + values["miss"] > 0 for values in after.values())


def test_registration_is_validated_once_and_unregister_reaches_every_replica(cluster):
    running, reference, client = cluster
    with pytest.raises(grpc.RpcError) as refused:
        client.register_adapter("a1", "adapter-1")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as refused:
        client.register_adapter("escape", "../base")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("The river", adapter="nobody")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("The river", adapter="a1", temperature=-1.0)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in refused.value.details()

    # resident on some replica first, then gone for every replica
    for _ in range(4):
        assert tuple(client.generate("Rain falls on", adapter="a7", ignore_eos=True).token_ids) == \
            expected(reference, "Rain falls on", "a7")
    client.unregister_adapter("a7")
    for _ in range(6):
        with pytest.raises(grpc.RpcError) as refused:
            client.generate("Rain falls on", adapter="a7")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "a7" not in {info.name for info in client.list_adapters()}
    # under the name again, now with another adapter's files: every replica serves the new ones
    client.register_adapter("a7", "adapter-8")
    for _ in range(6):
        assert tuple(client.generate("Rain falls on", adapter="a7", ignore_eos=True).token_ids) == \
            expected(reference, "Rain falls on", "a8")
    client.unregister_adapter("a7")
    client.register_adapter("a7", "adapter-7")


def test_each_replica_and_ray_serve_expose_metrics(cluster):
    running, _, client = cluster
    client.generate("The river", adapter="a0")
    *replica_urls, ray_url = metrics_urls(running)
    assert len(replica_urls) == 2
    for url in replica_urls:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for name in ("loraquilt_requests_total", "loraquilt_routing_total", "loraquilt_routing_key_loads_total",
                     "loraquilt_adapter_slots", "loraquilt_memory_bytes"):
            assert name in text, (url, name)
    deadline = time.monotonic() + 60  # Ray exports its metrics every few seconds
    while True:
        text = urllib.request.urlopen(ray_url, timeout=10).read().decode()
        if "ray_serve_num_multiplexed_models" in text and "ray_serve_deployment_request_counter" in text:
            break
        assert time.monotonic() < deadline, [line for line in text.splitlines() if "ray_serve" in line][:20]
        time.sleep(2.0)


def test_killing_a_replica_loses_no_accepted_request(cluster):
    running, reference, _ = cluster
    retried: list[grpc.StatusCode] = []
    client = LoraQuiltClient(running.target, timeout=120)
    client.retry = RetryPolicy(attempts=5, on_retry=lambda error, _: retried.append(error.code()))
    jobs = [(PROMPTS[i % len(PROMPTS)], f"a{i % ADAPTERS}") for i in range(64)]
    victim = next(iter(running.replica_reports().values()))
    killed = threading.Event()

    def call(job):
        prompt, adapter = job
        if job is jobs[16] and not killed.is_set():  # traffic is flowing: kill one replica mid-way
            killed.set()
            ray.kill(ray.get_actor(victim["actor"], namespace=victim["namespace"]), no_restart=False)
        return tuple(client.generate(prompt, adapter=adapter, ignore_eos=True).token_ids)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, jobs))
    client.close()
    assert killed.is_set()
    for (prompt, adapter), tokens in zip(jobs, answers):
        assert tokens == expected(reference, prompt, adapter), (prompt, adapter)
    # the requests running on the killed replica came back UNAVAILABLE, and only those were retried
    assert retried and set(retried) == {grpc.StatusCode.UNAVAILABLE}, retried
    # Ray Serve brings the replica count back
    deadline = time.monotonic() + 120
    while len(running.replica_reports()) < 2 or victim["replica"] in running.replica_reports():
        assert time.monotonic() < deadline, running.replica_reports()
        time.sleep(1.0)
