"""serve-ray's adapter directory with a state folder: every add/remove recorded, the
registrations taken back by a new directory, changed folders left out (no Ray needed:
the directory is a plain class that Ray Serve runs as a deployment)."""

from __future__ import annotations

import shutil

from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.scaleout.directory import AdapterDirectory
from loraquilt.server.adapters.registry import file_fingerprint


def test_registrations_survive_a_new_directory_and_changed_folders_are_left_out(tmp_path):
    base = build_tiny_model(tmp_path / "base", "llama", seed=23)
    folders = make_adapter_zoo(base, tmp_path / "adapters", count=3, seed=230)
    state = tmp_path / "state"
    first = AdapterDirectory(state_dir=str(state))
    for index, folder in enumerate(folders):
        assert first.add(f"a{index}", str(folder), file_fingerprint(folder), 8, ("q_proj",), 1000 + index) == "ok"
    assert first.remove("a1") and not first.remove("ghost")
    second = AdapterDirectory(state_dir=str(state))
    assert second.restore_report() == {"restored": ["a0", "a2"], "skipped": []}
    entry = second.lookup(["a2"])["a2"]
    assert (entry.path, entry.rank, entry.target_modules, entry.size_bytes) == (str(folders[2]), 8, ("q_proj",), 1002)
    for file in ("adapter_config.json", "adapter_model.safetensors"):  # a0 rewritten while down
        shutil.copy(folders[1] / file, folders[0] / file)
    third = AdapterDirectory(state_dir=str(state))
    assert third.restore_report() == {"restored": ["a2"], "skipped": ["a0"]}
    assert third.add("a0", str(folders[0]), file_fingerprint(folders[0]), 8, ("q_proj",), 5) == "ok"
    assert AdapterDirectory(state_dir=str(state)).restore_report()["restored"] == ["a0", "a2"]
