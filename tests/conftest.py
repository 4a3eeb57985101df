"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton, so the
Triton kernels run (slowly, exactly) on this CPU-only machine."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared builders (tiny models, tokenizer, PEFT adapters) live in tests/support.
sys.path.insert(0, str(Path(__file__).parent / "support"))
