"""Which adapters a scaled-out replica's engine holds (scaleout/resident.py) and the
registration directory (scaleout/directory.py), on a tiny engine without Ray."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.scaleout.directory import AdapterDirectory, Registration
from loraquilt.scaleout.resident import ResidentAdapters, ResidentKey
from loraquilt.server.adapters.registry import AdapterChanged, file_fingerprint
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.request import Request, SamplingParams
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    base = build_tiny_model(root / "base", "llama", seed=3)
    folders = make_adapter_zoo(base, root / "adapters", count=4, seed=30)
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=4, max_seq_len=64,
                                 lora_backend="torch", progress=False))
    return engine, folders


def registration(name: str, folder, generation: int = 1) -> Registration:
    return Registration(name=name, path=str(folder), generation=generation, fingerprint=file_fingerprint(folder),
                        rank=8, target_modules=("q_proj",), size_bytes=1)


def engine_names(engine: Engine) -> set[str]:
    return {record.name for record in engine.adapters.records()}


def tokens(engine: Engine, adapter: str) -> tuple[int, ...]:
    request = Request(prompt="The river", adapter=adapter, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
    return engine.generate([request])[0].token_ids


def test_an_adapter_stays_registered_while_anything_holds_it(world):
    engine, folders = world
    adapters = ResidentAdapters(engine)

    async def run():
        regs = {"x": registration("x", folders[0])}
        assert await adapters.acquire(regs) == 1  # read from disk once
        assert await adapters.acquire(regs) == 0  # the second hold reads nothing
        assert adapters.held() == {"x": 2} and "x" in engine_names(engine)
        adapters.release(["x"])
        assert "x" in engine_names(engine)
        adapters.release(["x"])
        assert "x" not in engine_names(engine) and adapters.held() == {} and adapters.registered() == {}

    asyncio.run(run())


def test_a_name_registered_again_is_read_again_from_its_new_files(world):
    engine, folders = world
    adapters = ResidentAdapters(engine)

    async def run():
        await adapters.acquire({"y": registration("y", folders[1], generation=1)})
        assert engine.adapters.get("y").path == folders[1]
        adapters.release(["y"])
        await adapters.acquire({"y": registration("y", folders[1], generation=1)})
        # the directory now says generation 2 with other files: the engine swaps them in
        assert await adapters.acquire({"y": registration("y", folders[2], generation=2)}) == 1
        assert adapters.registered() == {"y": 2} and adapters.held() == {"y": 2}
        assert engine.adapters.get("y").path == folders[2]
        assert len(tokens(engine, "y")) == 6  # and it serves
        adapters.release(["y", "y"])
        assert "y" not in engine_names(engine)

    asyncio.run(run())


def test_files_changed_since_registration_are_refused_and_nothing_is_held(world, tmp_path):
    engine, folders = world
    folder = tmp_path / "copy"
    shutil.copytree(folders[0], folder)
    stale = registration("z", folder)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # rewritten after registration (a new file, even with the same bytes)
    adapters = ResidentAdapters(engine)
    with pytest.raises(AdapterChanged):
        asyncio.run(adapters.acquire({"z": stale}))
    assert adapters.held() == {} and "z" not in engine_names(engine)


def test_concurrent_first_uses_register_once(world):
    engine, folders = world
    adapters = ResidentAdapters(engine)

    async def run():
        regs = {"w": registration("w", folders[0]), "v": registration("v", folders[1])}
        reads = await asyncio.gather(*(adapters.acquire(regs) for _ in range(5)))
        assert sum(reads) == 2 and adapters.held() == {"w": 5, "v": 5}
        for _ in range(5):
            adapters.release(list(regs))
        assert not {"w", "v"} & engine_names(engine)

    asyncio.run(run())


def test_a_resident_key_releases_its_adapters_once(world):
    engine, folders = world
    adapters = ResidentAdapters(engine)
    asyncio.run(adapters.acquire({"k": registration("k", folders[0])}))
    asyncio.run(adapters.acquire({"k": registration("k", folders[0])}))  # a request's hold
    key = ResidentKey(adapters, "k", ("k",))
    key.__del__()  # Ray Serve's multiplexer evicts it...
    key.__del__()  # ...and the garbage collector may call it again
    assert adapters.held() == {"k": 1} and "k" in engine_names(engine)
    adapters.release(["k"])
    assert "k" not in engine_names(engine)


def test_directory_registrations_generations_and_limits():
    directory = AdapterDirectory(max_adapters=2)
    assert directory.add("a", "/r/a", None, 8, ("q_proj",), 10) == "ok"
    assert directory.add("a", "/r/b", None, 8, ("q_proj",), 10) == "exists"
    assert directory.add("b", "/r/b", None, 4, ("v_proj",), 5) == "ok"
    assert directory.add("c", "/r/c", None, 4, ("v_proj",), 5) == "full"
    first = directory.lookup(["a", "zz"])
    assert first["zz"] is None and first["a"].path == "/r/a"
    assert directory.remove("a") and not directory.remove("a")
    assert directory.add("a", "/r/a2", None, 8, ("q_proj",), 10) == "ok"
    again = directory.lookup(["a"])["a"]
    assert again.generation > first["a"].generation and again.path == "/r/a2"
    assert [entry.name for entry in directory.entries()] == ["a", "b"]
    directory.report("r1", {"metrics": "http://x/metrics"})
    assert directory.replicas() == {"r1": {"metrics": "http://x/metrics"}}
