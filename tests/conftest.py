"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton, so the
Triton kernels run (slowly, exactly) on this CPU-only machine."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
