"""Shared by the GPU tests: the device they run on, the skip without CUDA, and the
environment of the child processes they start (see conftest.py beside this file)."""

from __future__ import annotations

import os

import pytest
import torch

#: "cuda" (the default). "cpu" is a dry run of the test code itself on a machine without a
#: GPU (Triton in its interpreter, bitsandbytes' CPU kernels): it checks the tests, and
#: proves nothing about CUDA.
DEVICE_ENV = "LORAQUILT_GPU_TESTS_DEVICE"
DEVICE = os.environ.get(DEVICE_ENV, "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise RuntimeError(f"{DEVICE_ENV}={DEVICE!r}: expected cuda (default) or cpu (dry run)")

#: Set in the child `pytest` that runs a RUN_IN_CHILD module (conftest.py), so it never
#: starts another one.
CHILD_ENV = "LORAQUILT_GPU_TESTS_CHILD"


def _skip_reason() -> str | None:
    if DEVICE == "cpu" or torch.cuda.is_available():
        return None
    why = "torch.cuda.is_available() is False"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    return (f"GPU test: needs CUDA ({why}); run `pytest -m gpu` on a machine with an NVIDIA "
            "GPU and a CUDA build of torch")


SKIP_REASON = _skip_reason()
AVAILABLE = SKIP_REASON is None

#: `pytestmark = GPU` in every module of tests/gpu: the `gpu` marker (deselected by the
#: default addopts, selected by `-m gpu`) and a skip, with a clear reason, without CUDA.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON or "CUDA is available")]


def child_env() -> dict[str, str]:
    """os.environ for a child process that must run compiled Triton kernels on CUDA.

    tests/conftest.py sets TRITON_INTERPRET=1 (with setdefault) for the CPU suite; a child
    `pytest` would get it again unless the variable is present, so it is set to "0" rather
    than removed. In the CPU dry run the child keeps the interpreter (there is no GPU).
    """
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if DEVICE == "cpu" else "0"
    env[CHILD_ENV] = "1"
    return env
