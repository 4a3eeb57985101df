"""The `loraquilt` command: one sub-command per job, each defined beside the code it runs."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from loraquilt import __version__
    from loraquilt.kernels import bench as kernel_bench
    from loraquilt.server import local_cli

    parser = argparse.ArgumentParser(
        prog="loraquilt",
        description="One NF4 base LLM, many LoRA adapters in the same batch, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"loraquilt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    local_cli.add_run_parser(commands)
    local_cli.add_info_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks (JSON out)")
    bench_kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    kernel_bench.add_arguments(
        bench_kinds.add_parser("kernels", help="LoRA kernel backends against a base Linear")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
