"""The `loraquilt` command: one sub-command per job, each defined beside the code it runs.

Only the module of the command being run is imported, so client commands start without
loading torch or the model stack."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module that defines it, function adding its parser, one-line help)
COMMANDS = {
    "serve": ("loraquilt.server.app", "add_serve_parser",
              "serve the NF4 model and its adapters over gRPC and the OpenAI HTTP API"),
    "generate": ("loraquilt.client.cli", "add_generate_parser", "send a Generate request to a server"),
    "adapters": ("loraquilt.client.cli", "add_adapters_parser", "register, unregister or list adapters on a server"),
    "run": ("loraquilt.server.local_cli", "add_run_parser", "generate once, locally, and print the text"),
    "info": ("loraquilt.server.local_cli", "add_info_parser", "parameters and bytes of the NF4 model"),
    "bench": ("loraquilt.cli_bench", "add_bench_parser", "benchmarks (JSON out)"),
    "train": ("loraquilt.train.cli", "add_train_parser", "QLoRA fine-tuning of a LoRA adapter on the NF4 base"),
    "demo": ("loraquilt.train.demo.cli", "add_demo_parser", "train, serve and compare the demo adapters"),
    "serve-ray": ("loraquilt.scaleout.cli", "add_serve_ray_parser", "serve replicas on Ray Serve, routed by adapter (needs the ray extra)"),
    "torture": ("loraquilt.bench.torture", "add_torture_parser", "soak test: traffic while adapters cycle (JSON out)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from loraquilt import __version__

    parser = argparse.ArgumentParser(
        prog="loraquilt",
        description="One NF4 base LLM, many LoRA adapters in the same batch, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"loraquilt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, function, help_text) in COMMANDS.items():
        if only is None or name == only:
            getattr(importlib.import_module(module), function)(commands, name, help_text)
        else:
            commands.add_parser(name, help=help_text)
    return parser


class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def quiet_library_logs() -> None:
    """Leave out library log lines a user cannot act on. bitsandbytes, imported on a CPU
    with AVX512-BF16, looks for an optional kernel from the `kernels` hub package for its
    own 4-bit GEMM and logs its absence on every start; loraquilt runs NF4 through its own
    kernels and never calls that GEMM."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("kernels-community"))


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
