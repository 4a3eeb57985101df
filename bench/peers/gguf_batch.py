"""Runs inside the convert python (`--convert-python`), not in loraquilt's: runs one of
llama.cpp's convert scripts once per argument list, in one interpreter, so torch and
transformers are imported once rather than once per adapter.

    python gguf_batch.py SCRIPT.py JOBS.json     JOBS: [[arg, ...], ...]

Each job is exactly `python SCRIPT.py arg ...`. Exits non-zero at the first failed job.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def main(argv: list[str]) -> int:
    script, jobs_path = argv[1], argv[2]
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT.py` has it (its own modules)
    for number, args in enumerate(jobs, 1):
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (None, 0):
                print(f"job {number}/{len(jobs)} failed ({stop.code}): {args}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
