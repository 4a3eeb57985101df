"""Command-line flags generated from config dataclass fields, and configs built back from
the parsed values (vLLM's `EngineArgs` pattern).

A setting is declared once, on its field: `max_batch_size: int = field(default=32,
metadata={"help": ...})` carries the default, the help text, the choices and the parser
(METADATA_KEYS), so the library's `EngineConfig()` and every command that takes the flag
agree by construction. A field holding another config (`metadata={"nested": True}`)
contributes that config's flags. The configs themselves need not import this module.

The flag's dest (its name without the dashes, `--max-queue` -> `max_queue`) is the
setting's key wherever settings arrive as plain data: parsed arguments, serve-ray's config
file. Torch-free: the CLI builds its parsers with it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# What a field's metadata may say (`help` makes the field a flag):
#   help:     what the setting is (the flag's help; the default is added to it)
#   flag:     the option (default: --field-name)
#   choices:  the allowed values, or a callable returning them (resolved when a parser is built)
#   type:     the argparse parser of a value (default: the field's int/float type; str stays str)
#   env:      an environment variable that, set, is the flag's default (the field's stays put)
#   shown:    how the help shows the default (default: the value; None as "auto")
#   metavar:  argparse's metavar
#   nested:   True on a field holding another config: its flags are this config's
METADATA_KEYS = frozenset({"help", "flag", "choices", "type", "env", "shown", "metavar", "nested"})


@dataclass(frozen=True)
class FlagSpec:
    """One generated flag: the field it comes from, and where that field sits."""

    dest: str  # argparse dest = the setting's key in plain-data settings
    path: tuple[str, ...]  # field names from the outer config down to the field
    field: dataclasses.Field
    value_type: type  # the field's type without None: int, float, str or bool

    @property
    def option(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.path[-1].replace("_", "-")

    @property
    def default(self):
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default

    @property
    def choices(self) -> tuple | None:
        choices = self.field.metadata.get("choices")
        return tuple(choices()) if callable(choices) else (None if choices is None else tuple(choices))

    @property
    def parse(self) -> Callable | None:
        """What argparse converts a value with (None: the string itself)."""
        parse = self.field.metadata.get("type")
        if parse is not None:
            return parse
        return self.value_type if self.value_type in (int, float) else None

    def command_line_default(self):
        """The flag's default: the environment variable named by `env` when set (checked
        against the choices), else the field's."""
        env = self.field.metadata.get("env")
        text = os.environ.get(env, "").strip() if env else ""
        if not text:
            return self.default
        value = self.parse(text) if self.parse else text
        if self.choices is not None and value not in self.choices:
            raise SystemExit(f"{env}={text!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def help_text(self, default) -> str:
        help_text = self.field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if self.value_type is bool:
            return f"{help_text} (default {'on' if default else 'off'})"
        shown = self.field.metadata.get("shown")
        if shown is None:
            shown = "auto" if default is None else default
        return f"{help_text} (default {shown})"


def _dest(field: dataclasses.Field) -> str:
    return (field.metadata.get("flag") or field.name).lstrip("-").replace("-", "_")


def _value_type(annotation) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return annotation


@functools.cache
def flag_specs(config_cls: type) -> tuple[FlagSpec, ...]:
    """Every flag of a config class, in field order (a nested config's in its place)."""
    hints = typing.get_type_hints(config_cls)
    specs: list[FlagSpec] = []
    for field in dataclasses.fields(config_cls):
        unknown = set(field.metadata) - METADATA_KEYS
        if unknown:
            raise TypeError(f"{config_cls.__name__}.{field.name}: unknown metadata {sorted(unknown)}")
        if field.metadata.get("nested"):
            specs += [dataclasses.replace(spec, path=(field.name, *spec.path))
                      for spec in flag_specs(field.default_factory)]
        elif "help" in field.metadata:
            specs.append(FlagSpec(_dest(field), (field.name,), field, _value_type(hints[field.name])))
    dests = [spec.dest for spec in specs]
    if len(set(dests)) != len(dests):
        raise TypeError(f"{config_cls.__name__}: two settings share a flag: {dests}")
    return tuple(specs)


def flags_by_dest(config_cls: type) -> dict[str, FlagSpec]:
    return {spec.dest: spec for spec in flag_specs(config_cls)}


def add_config_arguments(parser, config_cls: type, names: Iterable[str] | None = None, *,
                         unset: Iterable[str] = (), help: Mapping[str, str] | None = None,
                         metavar: Mapping[str, str] | None = None) -> None:
    """Add the flags of `config_cls` (those named by dest in `names`, in that order;
    default: all, in field order) to an argparse parser or group.

    unset:   flags that default to None here: the command's own setting applies unless given
             (benchmarks that pass a value on to the servers they start)
    help, metavar: per-flag wording of this command (the meaning stays the field's)"""
    by_dest = flags_by_dest(config_cls)
    unset, help, metavar = set(unset), dict(help or {}), dict(metavar or {})
    chosen = list(by_dest) if names is None else list(names)
    unknown = (set(chosen) | unset | set(help) | set(metavar)) - set(by_dest)
    if unknown:
        raise KeyError(f"{config_cls.__name__} has no flag(s) {sorted(unknown)}")
    for dest in chosen:
        spec = by_dest[dest]
        default = None if dest in unset else spec.command_line_default()
        if dest in help:
            text = help[dest]
        elif dest in unset:
            text = f"{spec.field.metadata['help']} (default: the command's own)".replace("%", "%%")
        else:
            text = spec.help_text(default)
        if spec.value_type is bool:
            options = {"action": argparse.BooleanOptionalAction}
        else:
            options = {"metavar": metavar.get(dest, spec.field.metadata.get("metavar"))}
            if spec.parse is not None:
                options["type"] = spec.parse
            if spec.choices is not None:
                options["choices"] = spec.choices
        action = parser.add_argument(spec.option, dest=dest, default=default, help=text, **options)
        action.setting, action.unset = spec, dest in unset  # what tests/server/test_config_flags.py checks


def config_from_values(config_cls: type, values: Mapping[str, object], **overrides):
    """`config_cls` from settings keyed by flag dest (parsed arguments: `vars(args)`; a
    config file's keys). A setting absent from `values` takes its field's default; other
    keys are ignored. `overrides` are top-level fields of `config_cls`, set by the caller."""
    settings: dict[str, object] = {}
    for field in dataclasses.fields(config_cls):
        if field.name in overrides or not field.init:
            continue
        if field.metadata.get("nested"):
            settings[field.name] = config_from_values(field.default_factory, values)
        elif "help" in field.metadata and _dest(field) in values:
            settings[field.name] = values[_dest(field)]
    return config_cls(**settings, **overrides)


def config_values(config) -> dict[str, object]:
    """The settings of a config keyed by flag dest: config_from_values' inverse."""
    values = {}
    for spec in flag_specs(type(config)):
        value = config
        for name in spec.path:
            value = getattr(value, name)
        values[spec.dest] = value
    return values
