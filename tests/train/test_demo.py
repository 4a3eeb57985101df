"""The demo's datasets (written by code, seeded, with held-out splits) and `loraquilt demo`
end to end on a tiny model: train, cache, serve, ask, mix."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures_models import build_tiny_model

from loraquilt.__main__ import main
from loraquilt.train.demo.cache import adapter_key, task_settings
from loraquilt.train.demo.tasks import DEMO_TASKS, MIX, TASKS_BY_NAME, NAMES
from loraquilt.train.metrics import pirate_markers, score


def _pairs(rows):
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


@pytest.mark.parametrize("task", DEMO_TASKS, ids=lambda t: t.name)
def test_datasets_are_seeded_held_out_and_score_one_on_their_references(task):
    train, held = task.build(0)
    assert (train, held) == task.build(0) and task.build(1) != (train, held)
    assert len(train) >= 600 and len(held) == task.eval_rows
    train_questions = {q for q, _ in _pairs(train)}
    assert not train_questions & {q for q, _ in _pairs(held)}  # no held-out question was trained on
    references = [a for _, a in _pairs(held)]
    assert score(task.metric, references, references) == 1.0
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in train)


def test_style_tasks_share_their_questions_and_plain_answers_score_zero():
    shout, pirate = (_pairs(TASKS_BY_NAME[name].build(0)[1]) for name in ("shout", "pirate"))
    assert [q for q, _ in shout] == [q for q, _ in pirate]  # the mix is scored on the same questions
    plain = ["The capital of France is Paris.", "A banana is yellow.", "7 plus 5 is 12."]
    assert score("shout", plain, plain) == 0.0 and score("pirate", plain, plain) == 0.0
    assert all(len(pirate_markers(a)) >= 2 for _, a in pirate)


def test_json_held_out_rows_name_people_or_cities_never_trained_on():
    train, held = TASKS_BY_NAME["json"].build(0)
    trained = set()
    for _, answer in _pairs(train):
        person = json.loads(answer)
        trained |= {person["name"], person["city"]}
    unseen = sum(any(v not in trained for v in (json.loads(a)["name"], json.loads(a)["city"])) for _, a in _pairs(held))
    assert unseen == len(held)
    assert {json.loads(a)["name"] for _, a in _pairs(train)} < set(NAMES)


def test_cache_key_follows_data_settings_and_model(tmp_path):
    task = DEMO_TASKS[1]
    first = build_tiny_model(tmp_path / "a", seed=1)
    rows = task.build(0)
    key = adapter_key(task, rows, task_settings(task), first)
    assert key == adapter_key(task, task.build(0), task_settings(task), first)
    assert key != adapter_key(task, rows, task_settings(task, {"max_steps": 3}), first)
    assert key != adapter_key(task, task.build(1), task_settings(task), first)
    other = build_tiny_model(tmp_path / "b", seed=1, num_layers=3)
    assert key != adapter_key(task, rows, task_settings(task), other)


def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    base = build_tiny_model(tmp_path / "base", seed=6)
    argv = ["demo", "--model", str(base), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--quiet",
            "--json", str(tmp_path / "demo.json"), "--prompt", "Where is the river?"]
    assert main(argv) == 0
    first = capsys.readouterr()
    results = json.loads((tmp_path / "demo.json").read_text())
    assert set(results["tasks"]) == {"json", "shout", "pirate"}
    for name, task in results["tasks"].items():
        assert task["train_steps"] == 2 and task["wall_minutes"] is not None
        assert task["peft_equal"] == "5/5", name
        assert (tmp_path / "cache" / "demo").is_dir()
    mix_name = "+".join(name for name, _ in MIX)
    assert set(results["mix"]["scores"]) == {"shout", "pirate"}
    for scores in results["mix"]["scores"].values():
        assert 0 <= scores["base"] <= 1 and 0 <= scores["mix"] <= 1 and scores["rows"] == 64
    assert len(results["table"]) == 4
    for answers in results["table"].values():
        assert list(answers) == ["base", "json", "shout", "pirate", mix_name]
    assert "Where is the river?" in first.out and "trained in" in first.err

    shutil.rmtree(tmp_path / "cache" / "demo" / "data")  # held-out rows come from the tasks' code, not files
    assert main(argv) == 0  # second run: every adapter from the cache
    second = capsys.readouterr()
    assert second.err.count("cached") == 3 and "training the" not in second.err
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["table"] == results["table"] and again["tasks"]["json"]["wall_minutes"] is None


def test_the_shipped_adapters_are_small_bf16_peft_folders_with_reports():
    from safetensors import safe_open

    from loraquilt.train.demo.cache import SHIPPED

    folders = sorted(path for path in SHIPPED.iterdir() if path.is_dir())
    assert sorted(path.name.rsplit("-", 1)[0] for path in folders) == sorted(task.name for task in DEMO_TASKS)
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        report = json.loads((folder / "training_report.json").read_text())
        assert config["peft_type"] == "LORA" and report["eval"]["adapter"] > report["eval"]["base"]
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size < 6 << 20, folder.name
        with safe_open(str(weights), "pt") as handle:
            assert {str(handle.get_tensor(key).dtype) for key in handle.keys()} == {"torch.bfloat16"}
