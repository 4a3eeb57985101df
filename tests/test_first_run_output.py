"""What a user sees on a start: progress and facts, no library log line they cannot act on."""

from __future__ import annotations

import subprocess
import sys

from fixtures_models import build_tiny_model


def test_info_prints_no_library_warnings(tmp_path):
    base = build_tiny_model(tmp_path / "base", "llama", seed=3)
    done = subprocess.run([sys.executable, "-m", "loraquilt", "info", "--model", str(base)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bytes/param" in done.stdout
    for needle in ("kernels-community", "Warning", "warn("):
        assert needle not in done.stderr, done.stderr[-2000:]
