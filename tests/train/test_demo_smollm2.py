"""One real demo task, briefly, on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest

from loraquilt.server.model.sources import resolve_model
from loraquilt.train.demo.cache import ensure_adapter
from loraquilt.train.demo.tasks import TASKS_BY_NAME

pytestmark = pytest.mark.slow


def test_shout_adapter_beats_the_base_and_equals_peft(tmp_path):
    folder = resolve_model(None).folder
    adapter = ensure_adapter(TASKS_BY_NAME["shout"], model=None, model_folder=folder, root=tmp_path,
                             overrides={"max_steps": 60}, progress=False, log=lambda line: None)
    evaluation = adapter.report["eval"]
    assert evaluation["adapter"] >= 0.6 and evaluation["adapter"] >= 3 * evaluation["base"]
    assert adapter.report["peft_check"]["all_equal"]
    assert adapter.report["training"]["minutes"] <= 10


def test_the_shipped_adapters_are_found_by_their_key_and_retraining_one_reaches_its_metric(tmp_path):
    from loraquilt.train.demo.tasks import DEMO_TASKS

    folder = resolve_model(None).folder
    quiet = dict(model=None, model_folder=folder, progress=False, log=lambda line: None)
    for task in DEMO_TASKS:  # an empty cache: every adapter comes from the package
        adapter = ensure_adapter(task, root=tmp_path / "cache", **quiet)
        assert adapter.shipped and not adapter.trained_now, task.name
    shipped = ensure_adapter(TASKS_BY_NAME["shout"], root=tmp_path / "cache", **quiet)
    retrained = ensure_adapter(TASKS_BY_NAME["shout"], root=tmp_path / "cache", retrain=True, **quiet)
    assert retrained.trained_now and not retrained.shipped
    assert retrained.report["training"]["steps"] == shipped.report["training"]["steps"]
    assert retrained.report["eval"]["adapter"] >= shipped.report["eval"]["adapter"] - 0.1
