"""`loraquilt serve --state-dir`: registrations survive SIGKILL and restarts; bad state
files stop the start with a clear error; changed folders are skipped and counted."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo
from fixtures_server import free_port, metric_value, scrape

from loraquilt.client import LoraQuiltClient
from loraquilt.server.adapters.state_file import STATE_FILE, RegistrationState, StateFileError

PROMPT = "The river"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    base = build_tiny_model(root / "base", "llama", seed=13)
    make_adapter_zoo(base, root / "adapters", count=6, seed=130)
    return base, root / "adapters"


class Served:
    def __init__(self, base, adapter_root, state_dir):
        self.port, self.metrics_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraquilt", "serve", "--model", str(base), "--adapter-root", str(adapter_root),
             "--state-dir", str(state_dir), "--port", str(self.port), "--metrics-port", str(self.metrics_port),
             "--http-port", "-1", "--dtype", "float32", "--lora-backend", "torch", "--max-seq-len", "128"],
            stderr=subprocess.PIPE, text=True)
        self.log = []
        deadline = time.monotonic() + 120
        for line in self.process.stderr:
            self.log.append(line)
            if "loraquilt serving" in line:
                break
            assert time.monotonic() < deadline, "".join(self.log)
        assert self.process.poll() is None, "".join(self.log)
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        self.client = LoraQuiltClient(f"127.0.0.1:{self.port}", timeout=60, retries=1)

    def names(self) -> set[str]:
        return {adapter.name for adapter in self.client.list_adapters()}

    def tokens(self, adapter: str) -> tuple[int, ...]:
        return tuple(self.client.generate(PROMPT, adapter=adapter, max_new_tokens=6, ignore_eos=True).token_ids)

    def metric(self, name: str) -> float:
        return metric_value(scrape(self), name)

    def kill(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait(30)


def test_registrations_survive_sigkill_between_calls(setup, tmp_path):
    base, adapter_root = setup
    server = Served(base, adapter_root, tmp_path / "state")
    for index in range(4):
        server.client.register_adapter(f"a{index}", f"adapter-{index}")
    server.client.unregister_adapter("a1")
    before = {name: server.tokens(name) for name in ("a0", "a2", "a3")}
    server.kill()
    again = Served(base, adapter_root, tmp_path / "state")
    try:
        assert again.names() == {"a0", "a2", "a3"}
        assert {name: again.tokens(name) for name in before} == before
        assert again.metric("loraquilt_adapter_restore_failures_total") == 0
        again.client.register_adapter("a5", "adapter-5")  # registering goes on recording
    finally:
        again.kill()
    third = Served(base, adapter_root, tmp_path / "state")
    try:
        assert third.names() == {"a0", "a2", "a3", "a5"}
    finally:
        third.kill()


def test_sigkill_during_calls_leaves_the_state_before_or_after_the_last_one(setup, tmp_path):
    base, adapter_root = setup
    rng = random.Random(7)
    state_dir = tmp_path / "state"
    expected: set[str] = set()
    for round_index in range(3):
        server = Served(base, adapter_root, state_dir)
        assert server.names() == expected, round_index
        in_flight = {}

        def churn():
            while True:
                name = f"c{rng.randrange(4)}"
                change = ("unregister", name) if name in expected else ("register", name)
                in_flight["change"] = change
                try:
                    if change[0] == "register":
                        server.client.register_adapter(name, f"adapter-{name[1]}")
                        expected.add(name)
                    else:
                        server.client.unregister_adapter(name)
                        expected.discard(name)
                except grpc.RpcError:
                    return  # the server is gone
                in_flight.pop("change")

        worker = threading.Thread(target=churn)
        worker.start()
        time.sleep(rng.uniform(0.3, 1.2))
        server.process.kill()
        server.process.wait(30)
        worker.join(30)
        recorded = {entry.name for entry in RegistrationState(state_dir).load()}  # parses: never torn
        if "change" in in_flight:  # killed during a call: either side of it
            kind, name = in_flight["change"]
            after = expected | {name} if kind == "register" else expected - {name}
            assert recorded in (expected, after)
            expected = recorded
        else:
            assert recorded == expected
        server.client.close()
    final = Served(base, adapter_root, state_dir)
    try:
        assert final.names() == expected
    finally:
        final.kill()


@pytest.mark.parametrize("content, words", [
    pytest.param("{not json", "cannot be read as JSON", id="corrupt"),
    pytest.param('{"version": 1, "adapters": [{"name": "a0", "pa', "cannot be read as JSON", id="truncated"),
    pytest.param('{"version": 99, "adapters": []}', "version 99", id="unknown-version"),
    pytest.param('{"version": 1, "adapters": [{"name": 3}]}', "malformed", id="malformed"),
    pytest.param('[1, 2]', "not a loraquilt state file", id="not-a-state-file"),
])
def test_a_bad_state_file_stops_the_start_and_is_left_alone(setup, tmp_path, content, words):
    base, adapter_root = setup
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text(content)
    with pytest.raises(StateFileError, match=words):
        RegistrationState(state).load()
    done = subprocess.run([sys.executable, "-m", "loraquilt", "serve", "--model", str(base), "--adapter-root",
                           str(adapter_root), "--state-dir", str(state), "--port", str(free_port()),
                           "--metrics-port", "-1", "--http-port", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and words in done.stderr and str(state / STATE_FILE) in done.stderr
    assert (state / STATE_FILE).read_text() == content  # never overwritten


def test_a_folder_changed_while_down_is_skipped_and_counted(setup, tmp_path):
    base, adapter_root = setup
    local_root = tmp_path / "adapters"
    shutil.copytree(adapter_root, local_root)
    server = Served(base, local_root, tmp_path / "state")
    for index in range(3):
        server.client.register_adapter(f"a{index}", f"adapter-{index}")
    kept = server.tokens("a2")
    server.kill()
    for file in ("adapter_config.json", "adapter_model.safetensors"):  # rewritten while down
        shutil.copy(local_root / "adapter-4" / file, local_root / "adapter-1" / file)
    shutil.rmtree(local_root / "adapter-0")  # and gone
    again = Served(base, local_root, tmp_path / "state")
    try:
        assert again.names() == {"a2"}
        assert again.tokens("a2") == kept
        assert again.metric("loraquilt_adapter_restore_failures_total") == 2
        log = "".join(again.log)
        assert "'a0'" in log and "'a1'" in log and "not restored" in log
        again.client.register_adapter("a1", "adapter-1")  # registering again takes the new files
        assert "a1" in again.names()
        recorded = json.loads((tmp_path / "state" / STATE_FILE).read_text())
        assert sorted(entry["name"] for entry in recorded["adapters"]) == ["a1", "a2"]
    finally:
        again.kill()
