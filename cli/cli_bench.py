"""`loraquilt bench KIND`: every benchmark writes JSON; each kind lives beside what it measures."""

from __future__ import annotations


def add_bench_parser(commands, name: str, help_text: str) -> None:
    from loraquilt.kernels.lora import bench as kernel_bench

    bench = commands.add_parser(name, help=help_text)
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    kernel_bench.add_arguments(kinds.add_parser("kernels", help="LoRA kernel backends against a base Linear"))
    from loraquilt.bench import serve as serve_bench

    serve_bench.add_arguments(kinds.add_parser(
        "serve", help="loraquilt vs transformers + PEFT, exact (fp32) and as users get them (--dtype auto), one run"))
    from loraquilt.bench import step as step_bench

    step_bench.add_arguments(kinds.add_parser(
        "step", help="one decode step inside the engine: µs and torch ops per step (base, same, distinct)"))
    from loraquilt.bench import scaleout as scaleout_bench

    scaleout_bench.add_arguments(kinds.add_parser(
        "scaleout", help="adapter-affinity routing on Ray Serve: replicas vs one (needs the ray extra)"))
