"""Adapters read from disk beside the engine steps (real engine, tiny random model): a
request whose adapter is only on disk waits while the loader thread reads it, and the
running rows keep stepping; requests behind it whose adapters are in memory go first."""

from __future__ import annotations

import shutil
import threading
import time
import weakref

import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.server.adapters.registry import AdapterChanged, UnknownAdapter
from loraquilt.server.engine import Engine
from loraquilt.server.request import Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
LOADER = "loraquilt-adapter-loader"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    base = build_tiny_model(root / "base", "llama", seed=9)
    adapters = make_adapter_zoo(base, root / "adapters", count=3, seed=90)
    return base, adapters


@pytest.fixture(scope="module")
def reference(model_folder) -> dict[str, tuple[int, ...]]:
    """Each adapter's greedy answer, with everything in memory."""
    engine = make_engine(model_folder, max_cpu_adapters=8)
    return {name: engine.generate([Request(prompt="The river", adapter=name, sampling=GREEDY)])[0].token_ids
            for name in ("a0", "a1", "a2")}


def make_engine(model_folder, folders=None, **overrides) -> Engine:
    """a0..a2 registered in order; with the default host tier of 1 only a2 stays in host
    memory, a0 and a1 are on disk."""
    base, adapters = model_folder
    settings = dict(max_batch_size=4, max_active_adapters=2, max_cpu_adapters=1, max_seq_len=64)
    return tiny_engine(base, folders or adapters, **{**settings, **overrides})


class GatedReads:
    """Blocks the registry's reads from disk until the test opens the gate; records the
    thread of each read."""

    def __init__(self, engine: Engine):
        registry = engine.adapters
        self.real, self.threads = registry._read, []
        self.started, self.gate = threading.Event(), threading.Event()
        registry._read = self

    def __call__(self, path):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(timeout=60)
        return self.real(path)


_ENDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {request id: last output}


def step_until(engine: Engine, request_id: str, limit: int = 200):
    """Step until the request ends and return its last output; requests that ended while
    stepping for another one are remembered (reads finish on their own thread, so which
    request ends first can vary)."""
    ended = _ENDED.setdefault(engine, {})
    for _ in range(limit):
        if request_id in ended:
            return ended.pop(request_id)
        for output in engine.step():
            if output.finished or output.error:
                ended[output.request_id] = output
    if request_id in ended:
        return ended.pop(request_id)
    raise AssertionError(f"{request_id} did not finish in {limit} steps")


def test_a_read_from_disk_does_not_stall_the_running_rows(model_folder, reference):
    engine = make_engine(model_folder)
    assert engine.adapters.get("a0").tier == "disk" and engine.adapters.get("a2").tier == "host"
    reads = GatedReads(engine)
    running = Request(prompt="The river", adapter="a2", sampling=SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add_request(running)
    engine.step()
    on_disk = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    behind = Request(prompt="Birds", sampling=GREEDY)  # base model, queued after the on-disk one
    waiting = engine.add_request(on_disk)
    engine.add_request(behind)

    steps = 0
    tokens = 0
    behind_admitted = False
    while steps < 12:  # the read is held back: nothing of a0 may run
        outputs = {o.request_id: o for o in engine.step()}
        steps += 1
        tokens += len(outputs[running.request_id].new_token_ids)
        assert on_disk.request_id not in outputs
        behind_admitted |= behind.request_id in outputs
    assert tokens == steps  # the running decode got a token in every step
    assert behind_admitted  # not blocked behind the request whose adapter is on disk
    assert reads.started.is_set() and list(engine.scheduler.waiting) == [waiting]
    assert waiting.block_table is None and engine.adapters.get("a0").tier == "disk"

    reads.gate.set()
    result = step_until(engine, on_disk.request_id)
    assert result.error is None and result.finished.token_ids == reference["a0"]
    assert reads.threads == [LOADER]  # read once, and never on the stepping thread
    assert step_until(engine, running.request_id).finished.completion_tokens == 30
    assert all(record.pins == 0 and record.holds == 0 for record in engine.adapters.records())


def test_a_step_with_only_reads_pending_waits_for_them_instead_of_spinning(model_folder, reference):
    engine = make_engine(model_folder)
    engine.IDLE_WAIT_SECONDS = 60.0
    reads = GatedReads(engine)
    request = Request(prompt="The river", adapter="a1", sampling=GREEDY)
    engine.add_request(request)
    threading.Timer(0.3, reads.gate.set).start()
    started = time.monotonic()
    assert engine.step() == []  # admits nothing, waits for the read (woken when it lands)
    assert 0.2 <= time.monotonic() - started < 30
    assert engine.adapters.get("a1").tier == "host"
    assert step_until(engine, request.request_id).finished.token_ids == reference["a1"]


def test_deleted_files_fail_only_their_request(model_folder, reference, tmp_path):
    """a0's folder is deleted after registration, and a0 is out of host memory: its
    request fails with AdapterChanged (FAILED_PRECONDITION), as when acquire read inline;
    the running request and a later one on a1 are served."""
    _, adapters = model_folder
    copies = [shutil.copytree(folder, tmp_path / folder.name) for folder in adapters]
    engine = make_engine(model_folder, folders=copies)
    running = Request(prompt="The river", adapter="a2", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.add_request(running)
    engine.step()
    shutil.rmtree(copies[0])
    doomed = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    later = Request(prompt="The river", adapter="a1", sampling=GREEDY)
    engine.add_request(doomed)
    engine.add_request(later)
    failed = step_until(engine, doomed.request_id)
    assert isinstance(failed.error, AdapterChanged)
    assert "deleted or rewritten since it was registered" in str(failed.error) and "'a0'" in str(failed.error)
    assert step_until(engine, later.request_id).finished.token_ids == reference["a1"]
    assert step_until(engine, running.request_id).finished.completion_tokens == 12
    assert engine.adapters.get("a0").tier == "disk" and engine.adapters.get("a0").holds == 0
    assert not engine.has_work()


def test_unregister_while_its_read_is_pending(model_folder):
    engine = make_engine(model_folder)
    reads = GatedReads(engine)
    request = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    engine.add_request(request)
    engine.step()  # queues the read
    assert reads.started.wait(timeout=60)
    record = engine.adapters.get("a0")
    engine.unregister_adapter("a0")
    reads.gate.set()
    failed = step_until(engine, request.request_id)
    assert isinstance(failed.error, UnknownAdapter)  # NOT_FOUND, as for any request queued on it
    assert record.host is None and record.holds == 0 and record.slot is None  # the read was dropped
    assert engine.adapters.host._held == 0 and not engine.has_work()
    assert [r.name for r in engine.adapters.records()] == ["a1", "a2"]


def test_abort_while_waiting_for_a_read_releases_its_hold(model_folder):
    engine = make_engine(model_folder)
    reads = GatedReads(engine)
    request = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    sequence = engine.add_request(request)
    engine.IDLE_WAIT_SECONDS = 0.01
    engine.step()
    assert sequence.adapter_hold is not None and engine.adapters.get("a0").holds == 1
    engine.abort(request.request_id)
    (cancelled,) = [o.finished for o in engine.step() if o.request_id == request.request_id]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
    assert engine.adapters.get("a0").holds == 0 and sequence.adapter_hold is None
    reads.gate.set()
    assert not engine.has_work()


def test_a_mix_of_on_disk_adapters_larger_than_the_host_tier(model_folder, reference):
    """Host tier of 1, a mix of a0 and a1 both on disk: both are held in host memory until
    the request is admitted (otherwise reading a1 would evict a0, forever)."""
    engine = make_engine(model_folder)
    alone = make_engine(model_folder, max_cpu_adapters=8)
    request = Request(prompt="The river", mix=(("a0", 0.5), ("a1", 0.5)), sampling=GREEDY)
    expected = alone.generate([request])[0].token_ids
    result = step_until(engine, engine.add_request(request).request_id)
    assert result.error is None and result.finished.token_ids == expected
    assert sum(record.host is not None for record in engine.adapters.records()) == 1
