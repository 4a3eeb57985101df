"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton, so the
Triton kernels run (slowly, exactly) on this CPU-only machine.

The GPU suite (`pytest -m gpu`, tests/gpu) needs compiled kernels instead: its
tests/gpu/conftest.py runs the modules that use Triton in a child pytest with
TRITON_INTERPRET=0 (or, started with TRITON_INTERPRET=0, in this process)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# Servers started by tests compute in float32 (the exact path) unless a test asks otherwise:
# their answers are compared token for token.
os.environ.setdefault("LORAQUILT_DTYPE", "float32")

# Shared builders (tiny models, tokenizer, PEFT adapters) live in tests/support.
sys.path.insert(0, str(Path(__file__).parent / "support"))
