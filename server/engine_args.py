"""The engine's command-line flags, generated from EngineConfig's fields (its defaults,
help and choices; server/config_flags.py), and the one function that turns parsed
arguments into an EngineConfig. `serve`, `serve-ray` (each replica), `demo`, `run`,
`info` and the benchmarks take their engine flags from here, so an engine flag means the
same, with the same default, everywhere."""

from __future__ import annotations

from collections.abc import Iterable

from loraquilt.server.config_flags import add_config_arguments, config_from_values, flag_specs
from loraquilt.server.engine_config import EngineConfig

# `serve`'s engine flags: every EngineConfig flag but --threads, which only commands whose
# engine owns the machine's cores take (add_threads_argument)
ENGINE_ARGUMENTS = tuple(spec.dest for spec in flag_specs(EngineConfig) if spec.dest != "threads")


def add_engine_arguments(parser, names: Iterable[str] = ENGINE_ARGUMENTS, **options) -> None:
    """The engine flags `names` (dests, in that order; default: ENGINE_ARGUMENTS); `options`
    as config_flags.add_config_arguments takes them (unset, help, metavar)."""
    add_config_arguments(parser, EngineConfig, names, **options)


def add_threads_argument(parser) -> None:
    """--threads, for commands whose engine owns the machine's cores (`serve`; a serve-ray
    replica's count comes from --threads-per-replica)."""
    add_config_arguments(parser, EngineConfig, ("threads",))


def engine_config_from_args(args, **overrides) -> EngineConfig:
    """The EngineConfig for parsed arguments (an argparse Namespace). A flag the command
    lacks takes its field's default; `overrides` are EngineConfig fields set by the caller."""
    values = vars(args)
    if "model" in values and "model" not in overrides:
        overrides["model"] = values["model"] or None  # "" = the embedded default, as None
    return config_from_values(EngineConfig, values, **overrides)
