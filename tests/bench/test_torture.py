"""`loraquilt torture --quick` at small scale: a real server process, concurrent clients
and adapters cycling under traffic; the run passes, every greedy answer equals its
single-request answer (through preemptions in a small KV pool and prefix cache hits), no
adapter slot leaks and no KV block stays held."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_torture(tmp_path):
    out = tmp_path / "torture.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "torture", "--quick", "--json", str(out),
         "--clients", "8", "--cycles", "40", "--duration", "400", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.exists(), done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert done.returncode == 0 and results["passed"], (results.get("failures"), done.stderr[-3000:])
    assert "[torture" in done.stderr  # progress lines
    for key in ("requests", "ok", "errors_by_status", "mismatches", "latency_ms", "rss_mb", "cycles_done",
                "leaked_slots", "duration_s", "settings", "failures"):
        assert key in results, key
    assert set(results["errors_by_status"]) == {"deliberate", "unexpected"}
    assert set(results["errors_by_status"]["deliberate"]) <= {"NOT_FOUND"}
    assert results["errors_by_status"]["unexpected"] == {}
    assert results["mismatches"] == 0 and results["leaked_slots"] == 0
    assert results["cycles_done"] == 40 and results["cycles"]["used"] > 0
    assert results["ok"] > 0 and results["ok"] <= results["requests"]
    for kind in ("base", "stable", "mix", "cycled"):
        assert results["by_kind"][kind]["ok"] > 0, kind
    assert results["latency_ms"]["p99"] >= results["latency_ms"]["p50"] > 0
    rss = results["rss_mb"]
    assert rss["start"] > 0 and rss["after_warmup"] > 0 and rss["end"] > 0 and rss["growth_pct"] <= 5
    end = results["server_at_end"]
    assert end["running_requests"] == 0 and end["waiting_requests"] == 0
    assert end["preemptions"] > 0 and end["kv_cache_usage_ratio"] == 0  # the small pool preempted, then emptied
    assert 0 < end["prefix_cache_hit_tokens"] <= end["prefix_cache_query_tokens"]
    assert end["registered_adapters"] == sorted(f"stable-{i}" for i in range(4))
    assert end["slots_used"] + end["slots_free"] == results["settings"]["max_active_adapters"]
