"""`loraquilt bench step` on a tiny random model: every scenario timed over decode-only
steps, the torch operators of one decode step counted, ratios against the base model."""

from __future__ import annotations

import json

from fixtures_models import build_tiny_model

from loraquilt.__main__ import main
from loraquilt.bench.step import SCENARIOS, StepBenchConfig, run_step_bench


def test_step_bench_reports_every_scenario(tmp_path):
    model = build_tiny_model(tmp_path / "model", seed=3)
    results = run_step_bench(str(model), "float32", StepBenchConfig(batch=4, new_tokens=5, repeats=1), tmp_path)
    assert set(results["scenarios"]) == set(SCENARIOS)
    for entry in results["scenarios"].values():
        assert entry["steps_timed"] >= 3  # 5 new tokens: the first comes from the prefill step
        assert entry["decode_step_us"] > 0
        assert entry["decode_tokens_per_s"] == 4 / entry["decode_step_us"] * 1e6
        assert 0 < entry["aten_compute_ops"] <= entry["aten_ops"]
    assert set(results["ratios"]) == {"same_vs_base", "distinct_vs_base"}
    assert results["settings"]["nf4_plan"]


def test_step_bench_command_writes_json(tmp_path, capsys):
    model = build_tiny_model(tmp_path / "model", seed=4)
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--model", str(model), "--dtype", "float32", "--batch", "2", "--new-tokens", "3",
                 "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["scenarios"]) == set(SCENARIOS)
    assert "torch ops/step" in capsys.readouterr().out
