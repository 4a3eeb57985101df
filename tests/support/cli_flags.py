"""The argparse actions of the commands that take engine settings, as plain data: what
`loraquilt CMD --help` offers (option strings, dest, default, choices, nargs, type), not
its wrapped text. `python tests/support/cli_flags.py` rewrites the snapshot the test
compares against (tests/server/cli_flags_snapshot.json); do that only for a deliberate
change of a flag."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).resolve().parents[1] / "server" / "cli_flags_snapshot.json"
# every command with an engine setting among its flags (bench and its kinds are walked)
COMMANDS = ("serve", "serve-ray", "demo", "run", "info", "bench", "torture")
ENV_DEFAULTS = ("LORAQUILT_DTYPE",)  # read by flag defaults: left out while the parsers are built


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def describe(action: argparse.Action) -> dict:
    return {
        "option_strings": list(action.option_strings),
        "dest": action.dest,
        "action": type(action).__name__,
        "default": _plain(action.default),
        "choices": _plain(list(action.choices)) if action.choices is not None else None,
        "nargs": _plain(action.nargs),
        "type": None if action.type is None else getattr(action.type, "__name__", repr(action.type)),
        "required": action.required,
        "metavar": _plain(action.metavar),
    }


def _walk(parser: argparse.ArgumentParser, path: str, table: dict) -> None:
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _walk(child, f"{path} {name}", table)
            continue
        actions.append(describe(action))
    if actions:
        table[path] = actions


def flag_table() -> dict[str, list[dict]]:
    """{"serve": [action, ...], "bench serve": [...], ...} with the environment's flag
    defaults unset."""
    from loraquilt.__main__ import build_parser

    saved = {name: os.environ.pop(name) for name in ENV_DEFAULTS if name in os.environ}
    try:
        table: dict[str, list[dict]] = {}
        for command in COMMANDS:
            parser = build_parser(command)
            (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            _walk(commands.choices[command], command, table)
        return table
    finally:
        os.environ.update(saved)


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(flag_table(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
