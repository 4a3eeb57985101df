"""The tree's own module, imported by the fake convert scripts as the real ones import theirs."""

import os


def write(argv, kind):
    out = argv[argv.index("--outfile") + 1]
    with open(out, "w") as handle:
        handle.write(f"{kind} {' '.join(argv)}\n")
    with open(os.environ["FAKE_CONVERT_RUNS"], "a") as runs:
        runs.write(f"{kind} {out}\n")
