"""Faults against a live server: overflowing adapters, deadlines, adapter files that change
after registration, unregister under load, and a flood past the waiting queue. After each,
the server answers exactly as before."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fixtures_models import build_peft_adapter, build_tiny_model, make_adapter_zoo
from fixtures_server import wait_until

from loraquilt.client import LoraQuiltClient
from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.metrics import process_rss_bytes
from loraquilt.server.request import Request, SamplingParams
from loraquilt.server.generation import ServiceConfig

NEW_TOKENS = 8
PROMPTS = ("The river", "Birds fly over the", "Numbers", "A long time ago in a quiet town")


def engine_config(base, **overrides) -> EngineConfig:
    settings = dict(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=4, max_active_adapters=3, max_cpu_adapters=8,
                    max_lora_rank=16, max_seq_len=160, lora_backend="torch", progress=False)
    return EngineConfig(**{**settings, **overrides})


def start(base, adapter_root, **overrides) -> RunningServer:
    return RunningServer(Engine(engine_config(base, **overrides)), ServerConfig(
        port=0, metrics_port=0, grace_seconds=10,
        service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=NEW_TOKENS,
                              max_new_tokens_limit=150)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base = build_tiny_model(root / "base", "llama", seed=11)
    adapter_root = root / "adapters"
    folders = make_adapter_zoo(base, adapter_root, count=3, seed=110)
    # finite weights (they pass validation) whose product overflows float32 activations
    build_peft_adapter(base, adapter_root / "bomb", r=8, lora_alpha=16, scale=1e20, seed=5)
    server = start(base, adapter_root)
    reference = Engine(engine_config(base))
    for index, folder in enumerate(folders):
        server.engine.register_adapter(f"a{index}", folder)
        reference.register_adapter(f"a{index}", folder)
    yield base, adapter_root, folders, server, reference
    server.shutdown(grace=5)


def expected(reference: Engine, prompt: str, adapter=None, mix=(), new_tokens: int = NEW_TOKENS):
    request = Request(prompt=prompt, adapter=adapter, mix=tuple(mix),
                      sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return reference.generate([request])[0].token_ids


def outcome(call):
    try:
        return call()
    except grpc.RpcError as error:
        return error


def gauge(server, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("bad", [
    pytest.param(dict(adapter="bomb"), id="adapter-overflows"),
    pytest.param(dict(mix=[("a0", 0.5), ("bomb", 0.5)]), id="mix-with-it-overflows"),
])
def test_non_finite_logits_fail_only_that_request(world, bad):
    _, _, _, server, reference = world
    client = LoraQuiltClient(server.target, timeout=60)
    client.register_adapter("bomb", "bomb")
    try:
        good = [dict(adapter="a0"), dict(adapter="a1"), dict(), dict(mix=[("a0", 0.5), ("a2", 0.5)])]
        with ThreadPoolExecutor(5) as pool:  # submitted together: they share engine steps
            futures = [pool.submit(outcome, lambda o=o, p=p: client.generate(p, ignore_eos=True, **o))
                       for o, p in zip(good, PROMPTS)]
            failed = pool.submit(outcome, lambda: client.generate("The river", ignore_eos=True, **bad)).result()
            answers = [f.result() for f in futures]
        assert isinstance(failed, grpc.RpcError) and failed.code() == grpc.StatusCode.INTERNAL
        assert "non-finite logits" in failed.details()
        for options, prompt, answer in zip(good, PROMPTS, answers):
            assert not isinstance(answer, grpc.RpcError), answer
            assert tuple(answer.token_ids) == expected(reference, prompt, options.get("adapter"),
                                                       options.get("mix", ()))
        # every KV row, including the failed request's (zeroed on release), serves again exactly
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda p: client.generate(p, adapter="a1", ignore_eos=True), PROMPTS * 2))
        for prompt, answer in zip(PROMPTS * 2, again):
            assert tuple(answer.token_ids) == expected(reference, prompt, "a1")
        assert wait_until(lambda: server.engine.stats().running == 0)
    finally:
        client.unregister_adapter("bomb")
        client.close()


def test_deadline_exceeded_frees_the_sequence_within_steps(world):
    _, _, _, server, reference = world
    with LoraQuiltClient(server.target, timeout=0.05) as hurried:
        error = outcome(lambda: hurried.generate("The river", adapter="a0", max_new_tokens=140, ignore_eos=True))
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.engine.stats().running == 0 and server.engine.stats().waiting == 0)
    assert gauge(server, "loraquilt_running_requests") == 0
    assert gauge(server, "loraquilt_waiting_requests") == 0
    with LoraQuiltClient(server.target, timeout=60) as client:
        canary = client.generate("The river", adapter="a0", ignore_eos=True)
    assert tuple(canary.token_ids) == expected(reference, "The river", "a0")


def test_cancel_mid_stream_frees_the_sequence(world):
    _, _, _, server, _ = world
    with LoraQuiltClient(server.target, timeout=60) as client:
        call = client.generate_stream("Numbers", adapter="a2", max_new_tokens=140, ignore_eos=True)
        next(call)
        call.cancel()
        assert wait_until(lambda: server.engine.stats().running == 0)
        assert gauge(server, "loraquilt_running_requests") == 0
        assert all(r.pins == 0 for r in server.engine.adapters.records())


def test_adapter_files_deleted_or_rewritten_after_registration(world, tmp_path):
    base, adapter_root, folders, _, _ = world
    # one adapter held in host memory: each registration pushes the previous one back to disk
    server = start(base, adapter_root, max_cpu_adapters=1, max_active_adapters=1)
    reference = Engine(engine_config(base))
    reference.register_adapter("r1", folders[1])
    reference.register_adapter("r0", folders[0])
    try:
        for name in ("gone", "changed", "kept"):
            shutil.copytree(folders[0], adapter_root / name)
        with LoraQuiltClient(server.target, timeout=60) as client:
            for name in ("gone", "changed", "kept"):
                client.register_adapter(name, name)
            (adapter_root / "gone" / "adapter_model.safetensors").unlink()
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(folders[1] / file, adapter_root / "changed" / file)
            for name in ("gone", "changed"):
                error = outcome(lambda name=name: client.generate("The river", adapter=name, ignore_eos=True))
                assert isinstance(error, grpc.RpcError), name
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert name in error.details() and "since it was registered" in error.details()
            kept = client.generate("The river", adapter="kept", ignore_eos=True)  # served from host memory
            assert tuple(kept.token_ids) == expected(reference, "The river", "r0")
            # registering again takes the new content
            client.unregister_adapter("changed")
            client.register_adapter("changed", "changed")
            changed = client.generate("The river", adapter="changed", ignore_eos=True)
            assert tuple(changed.token_ids) == expected(reference, "The river", "r1")
            assert server.engine.stats().running == 0
    finally:
        server.shutdown(grace=5)
        for name in ("gone", "changed", "kept"):
            shutil.rmtree(adapter_root / name, ignore_errors=True)


def test_unregister_under_load(world):
    _, adapter_root, folders, server, reference = world
    shutil.copytree(folders[2], adapter_root / "victim", dirs_exist_ok=True)
    with LoraQuiltClient(server.target, timeout=60) as client:
        client.register_adapter("victim", "victim")
        want = expected(reference, "Numbers", "a2", new_tokens=40)
        results: list = []
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(outcome, lambda: client.generate("Numbers", adapter="victim", max_new_tokens=40,
                                                                    ignore_eos=True)) for _ in range(12)]
            assert wait_until(lambda: any(r.name == "victim" and r.pins > 0
                                          for r in server.engine.adapters.records()))
            client.unregister_adapter("victim")
            results = [f.result() for f in futures]
        finished = [r for r in results if not isinstance(r, grpc.RpcError)]
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        assert finished, "requests already running on the adapter finish"
        assert all(tuple(r.token_ids) == want for r in finished)
        assert all(e.code() == grpc.StatusCode.NOT_FOUND and "victim" in e.details() for e in refused)
        assert "victim" not in {a.name for a in client.list_adapters()}
        assert wait_until(lambda: server.engine.stats().running == 0)
        registry = server.engine.adapters
        resident = sum(r.slot is not None for r in registry.records())
        assert registry.slots_in_use() == resident, "no slot is held by an unregistered adapter"
        canary = client.generate("Numbers", adapter="a2", ignore_eos=True)
        assert tuple(canary.token_ids) == expected(reference, "Numbers", "a2")


def test_flood_past_the_queue_is_refused_at_once_and_memory_stays_bounded(world):
    base, adapter_root, _, _, reference = world
    max_waiting, max_batch = 4, 2
    server = start(base, adapter_root, max_batch_size=max_batch, max_waiting=max_waiting)
    peak_waiting = 0
    stop = threading.Event()

    def watch_queue():
        nonlocal peak_waiting
        while not stop.is_set():
            peak_waiting = max(peak_waiting, server.engine.stats().waiting)
            time.sleep(0.001)

    def flood(client, count: int) -> list:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda i: (PROMPTS[i % len(PROMPTS)], outcome(lambda: client.generate(
                PROMPTS[i % len(PROMPTS)], max_new_tokens=30, ignore_eos=True))), range(count)))

    watcher = threading.Thread(target=watch_queue, daemon=True)
    watcher.start()
    try:
        with LoraQuiltClient(server.target, timeout=60) as client:
            flood_size = 10 * (max_waiting + max_batch)
            first = flood(client, flood_size)
            rss_after_first = process_rss_bytes()
            second = flood(client, flood_size)
            rss_after_second = process_rss_bytes()
            canary = client.generate("The river", max_new_tokens=30, ignore_eos=True)
        stop.set()
        watcher.join()
        want = {p: expected(reference, p, new_tokens=30) for p in PROMPTS}
        for results in (first, second):
            refused = [r for _, r in results if isinstance(r, grpc.RpcError)]
            served = [(p, r) for p, r in results if not isinstance(r, grpc.RpcError)]
            assert refused and served
            assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), \
                {e.code() for e in refused}
            assert all(tuple(r.token_ids) == want[p] for p, r in served)
        assert peak_waiting <= max_waiting
        assert rss_after_second - rss_after_first < 64 << 20  # a second flood leaves nothing behind
        assert tuple(canary.token_ids) == want["The river"]
    finally:
        stop.set()
        server.shutdown(grace=5)


def test_a_context_shorter_than_the_default_new_tokens_clamps_the_default(world):
    base, adapter_root, _, _, _ = world
    server = RunningServer(Engine(engine_config(base, max_seq_len=32)), ServerConfig(
        port=0, metrics_port=None, service=ServiceConfig(adapter_root=adapter_root)))  # default 128 new tokens
    try:
        with LoraQuiltClient(server.target, timeout=60) as client:
            answer = client.generate("The river", ignore_eos=True)
        assert answer.prompt_tokens + answer.completion_tokens == 32 and answer.finish_reason == "length"
    finally:
        server.shutdown(grace=5)
