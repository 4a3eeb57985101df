"""`loraquilt bench serve --quick`: runs end to end, writes the contracted JSON keys, and
both systems produce the same greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_bench_serve(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[bench" in done.stderr  # progress lines
    results = json.loads(out.read_text())
    scenarios = results["scenarios"]
    for name in ("distinct", "same", "base", "recipe_distinct", "recipe_same"):
        for system in ("loraquilt", "peft"):
            assert scenarios[name][system]["tokens_per_s"] > 0, (name, system)
    assert scenarios["sequential"]["peft"]["tokens_per_s"] > 0
    assert scenarios["many"]["loraquilt"]["tokens_per_s"] > 0
    for system in ("loraquilt", "peft"):
        assert scenarios["hotload"][system]["p50_ms"] > 0
    for label in ("50pct", "80pct"):
        stats = scenarios["latency"]["loraquilt"][label]
        assert {"ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"} <= set(stats)
    assert results["machine"]["memory_bandwidth_gb_s"] > 0 and results["machine"]["fp32_matmul_gflops"] > 0
    for name in ("distinct", "same", "base"):
        assert results["identical_greedy_fraction"][name] == 1.0, name
    assert results["versions"]["torch"] and results["settings"]["batch"] > 0
