"""The GPU suite: `pytest -m gpu` (skipped without CUDA; the default run deselects it).

Why some modules run in a child process
---------------------------------------
tests/conftest.py sets TRITON_INTERPRET=1 (unless already set) so that the CPU suite can
run the Triton kernels in Triton's interpreter. Triton reads that variable when a
`@triton.jit` function is defined, i.e. when `loraquilt.kernels.lora.triton_sgmv` is first
imported, so inside that pytest process the SGMV kernels would run in the interpreter even
on a GPU, and the compiled `tl.dot` path (tensor cores, bf16/fp16) would go untested.

A module that needs compiled Triton says `RUN_IN_CHILD = True`. When this process
interprets Triton (the usual case: the root conftest set it), the module's selected tests
are not run here: the first of them runs them all, once, in a child
`python -m pytest -m gpu <node ids>` with TRITON_INTERPRET=0 (see `_gpu.child_env`), and
each test then reports here the outcome it had in the child (a failure shows the child's
traceback). The child writes one line per test report as it goes, so a child killed at
`CHILD_TIMEOUT_S` still reports the tests it finished. Started with TRITON_INTERPRET=0
already (`TRITON_INTERPRET=0 pytest -m gpu`), pytest runs those modules in its own process
instead. Without CUDA nothing is started: the tests are skipped.

Dry run without a GPU: LORAQUILT_GPU_TESTS_DEVICE=cpu runs the same test code on the CPU
(the child keeps the interpreter; slow). It checks the tests themselves, not CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _gpu import AVAILABLE, CHILD_ENV, child_env

# tests/kernels/cases.py (adapter buffers, popularity patterns, tolerances) is shared with
# the CPU kernel tests; tests/gpu is collected before tests/kernels, so put it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

CHILD_TIMEOUT_S = 570  # one module in the child; every test must stay under 10 minutes
RESULTS_ENV = "LORAQUILT_GPU_TESTS_RESULTS"  # the child appends its test reports here (JSON lines)

# module path (as in node ids) -> ({node id: (outcome, message)}, child output tail)
_child_runs: dict[str, tuple[dict[str, tuple[str, str]], str]] = {}


def _triton_interprets() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def _runs_in_child(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return (
        bool(getattr(module, "RUN_IN_CHILD", False))
        and AVAILABLE
        and os.environ.get(CHILD_ENV) != "1"
        and _triton_interprets()
    )


def _module_path(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


# -- in the child ------------------------------------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Child side: append every phase that decides a test's outcome to the results file."""
    path = os.environ.get(RESULTS_ENV) if os.environ.get(CHILD_ENV) == "1" else None
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    else:
        message = str(report.longrepr or "")
    if report.outcome == "failed" and report.when != "call":
        message = f"error in {report.when}:\n{message}"
    with open(path, "a", encoding="utf-8") as results:
        results.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome,
                                  "message": message}) + "\n")


# -- in the parent -----------------------------------------------------------------------


def _read_results(path: Path) -> dict[str, tuple[str, str]]:
    """{node id: (passed | failed | skipped, message)}; a failure in any phase wins."""
    results: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return results
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        previous = results.get(record["nodeid"])
        if previous is None or previous[0] != "failed":
            results[record["nodeid"]] = (record["outcome"], record["message"])
    return results


def _run_module_in_child(item: pytest.Item) -> tuple[dict[str, tuple[str, str]], str]:
    path = _module_path(item)
    if path in _child_runs:
        return _child_runs[path]
    selected = [i.nodeid for i in item.session.items if _module_path(i) == path and _runs_in_child(i)]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *selected]
    with tempfile.TemporaryDirectory(prefix="loraquilt-gpu-child-") as tmp:
        results_file = Path(tmp) / "results.jsonl"
        env = {**child_env(), RESULTS_ENV: str(results_file)}
        described = f"child `{' '.join(command[:8])} {path}::...` ({len(selected)} tests)"
        try:
            done = subprocess.run(command, cwd=item.config.rootpath, env=env,
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            output = f"{described} exited with {done.returncode}\n{done.stdout}\n{done.stderr}"
        except subprocess.TimeoutExpired as expired:
            def text(value) -> str:
                return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
            output = (f"{described} ran past {CHILD_TIMEOUT_S} s and was killed\n"
                      f"{text(expired.stdout)}\n{text(expired.stderr)}")
        results = _read_results(results_file)
    _child_runs[path] = (results, output[-6000:])
    return _child_runs[path]


def _replay(item: pytest.Item) -> None:
    results, output = _run_module_in_child(item)
    outcome, message = results.get(item.nodeid, (None, ""))
    if outcome == "passed":
        return
    if outcome == "skipped":
        pytest.skip(f"(in the compiled-Triton child) {message}")
    if outcome == "failed":
        pytest.fail(f"failed in the compiled-Triton child process:\n{message}", pytrace=False)
    pytest.fail(f"no result for this test from the compiled-Triton child process:\n{output}",
                pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Parent side: report a RUN_IN_CHILD test from its child run, without setting up its
    fixtures here."""
    if not _runs_in_child(item):
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    phases = (("setup", lambda: None), ("call", lambda: _replay(item)), ("teardown", lambda: None))
    for when, func in phases:
        call = pytest.CallInfo.from_call(func, when=when, reraise=(pytest.exit.Exception, KeyboardInterrupt))
        ihook.pytest_runtest_logreport(report=ihook.pytest_runtest_makereport(item=item, call=call))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
