"""One source for every engine setting: the flags of every command agree with the config
fields they are generated from, the commands' flags match the snapshot taken of them
(tests/server/cli_flags_snapshot.json), and a library user's EngineConfig() is the
engine `loraquilt serve` builds without flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

import pytest
from cli_flags import COMMANDS, ENV_DEFAULTS, SNAPSHOT, flag_table

from loraquilt.__main__ import build_parser
from loraquilt.kernels.lora import BACKENDS
from loraquilt.scaleout.config import ReplicaConfig
from loraquilt.server.adapters.slots import SlotConfig
from loraquilt.server.config_flags import config_from_values, config_values, flag_specs, flags_by_dest
from loraquilt.server.engine_args import engine_config_from_args
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.model.device import DeviceConfig
from loraquilt.server.scheduler import SchedulerConfig


@pytest.fixture
def no_env_defaults(monkeypatch):
    for name in ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command (and bench kind) that COMMANDS lists, by its path ("bench serve")."""
    found = {}

    def walk(parser, path):
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")

    for command in COMMANDS:
        (commands,) = [a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)]
        walk(commands.choices[command], command)
    return found


# flags named like an engine setting that are a command's own: the demo's --threads are
# its training's torch threads as well as its engine's
OWN_FLAGS = {("demo", "--threads")}


def _engine_flag_actions():
    """(command, action, FlagSpec) for every flag of every command that names an engine
    setting (by option string, whether generated or written by hand)."""
    by_option = {spec.option: spec for spec in flag_specs(EngineConfig)}
    for path, parser in _parsers().items():
        for action in parser._actions:
            for option in action.option_strings:
                if option in by_option and (path, option) not in OWN_FLAGS:
                    yield path, action, by_option[option]


def _field_type(spec) -> tuple[type, bool]:
    """The field's annotated type without None, and whether None is allowed (read here
    from the annotation, apart from the flag generator)."""
    owner = EngineConfig if len(spec.path) == 1 else DeviceConfig
    annotation = typing.get_type_hints(owner)[spec.path[-1]]
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return (args[0] if args else annotation), bool(typing.get_args(annotation))


def test_every_engine_flag_agrees_with_its_field(no_env_defaults):
    seen = set()
    for path, action, spec in _engine_flag_actions():
        where = f"{path} {spec.option}"
        seen.add(spec.dest)
        assert getattr(action, "setting", None) is spec, f"{where}: written by hand, not generated from its field"
        assert action.dest == spec.dest, where
        field_type, optional = _field_type(spec)
        default = spec.default
        assert default is None and optional or isinstance(default, field_type), f"{where}: field default {default!r}"
        assert action.default == (None if action.unset else default), f"{where}: default {action.default!r}"
        if field_type is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), where
            continue
        expected_type = spec.field.metadata.get("type") or (field_type if field_type in (int, float) else None)
        assert action.type is expected_type, f"{where}: type {action.type!r}, field {field_type.__name__}"
        if default is not None and action.type is not None:
            assert action.type(str(default)) == default, f"{where}: its default does not parse back"
        choices = spec.field.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        assert (action.choices is None) == (choices is None), where
        if choices is not None:
            assert tuple(action.choices) == tuple(choices), f"{where}: choices {action.choices}"
            assert default in action.choices, f"{where}: default {default!r} not among the choices"
    assert seen == set(flags_by_dest(EngineConfig)), "an engine setting no command takes"


def test_flags_match_the_snapshot(no_env_defaults):
    """Flag names, dests, defaults, choices (in any order), nargs and types of every command
    with engine flags are the recorded ones: the CLI's contract (`python
    tests/support/cli_flags.py` rewrites the snapshot for a deliberate change)."""

    def normal(table):
        return {path: [{**action, "choices": None if action["choices"] is None else sorted(map(str, action["choices"]))}
                       for action in actions] for path, actions in table.items()}

    expected, actual = normal(json.loads(SNAPSHOT.read_text())), normal(flag_table())
    assert list(actual) == list(expected)
    for path in expected:
        assert actual[path] == expected[path], path


def test_library_defaults_are_the_command_line_defaults(no_env_defaults):
    serve = build_parser("serve").parse_args(["serve"])
    assert engine_config_from_args(serve) == EngineConfig()
    assert (EngineConfig().max_active_adapters, EngineConfig().max_cpu_adapters) == (32, 256)
    serve_ray = build_parser("serve-ray").parse_args(["serve-ray"])
    assert engine_config_from_args(serve_ray) == EngineConfig()
    assert ReplicaConfig().engine == EngineConfig()


def test_environment_sets_the_dtype_flag_default_only(monkeypatch):
    monkeypatch.setenv("LORAQUILT_DTYPE", "bfloat16")
    args = build_parser("serve").parse_args(["serve"])
    assert engine_config_from_args(args).device.dtype == "bfloat16"
    assert EngineConfig().device.dtype == "auto"
    monkeypatch.setenv("LORAQUILT_DTYPE", "fp8")
    with pytest.raises(SystemExit, match="LORAQUILT_DTYPE='fp8' is not one of"):
        build_parser("serve")


def test_lora_backends_are_the_kernels_list(no_env_defaults):
    (action,) = [a for a in _parsers()["serve"]._actions if "--lora-backend" in a.option_strings]
    assert tuple(action.choices) == tuple(BACKENDS)
    with pytest.raises(ValueError, match="lora_backend must be one of"):
        EngineConfig(lora_backend="cuda")


def test_derived_configs_take_the_engine_defaults():
    engine = EngineConfig()
    assert SchedulerConfig() == SchedulerConfig.from_engine(engine)
    assert SlotConfig() == SlotConfig.from_engine(engine)
    small = EngineConfig(max_batch_size=3, max_prefill_tokens=5, max_waiting=7, max_active_adapters=2,
                         max_lora_rank=8, lora_backend="torch")
    assert SchedulerConfig.from_engine(small) == SchedulerConfig(3, 5, 7)
    assert SlotConfig.from_engine(small) == SlotConfig(2, 8, "torch")


def test_values_round_trip():
    config = EngineConfig(max_waiting=5, kv_cache_mb=1.5, prefix_cache=False, device=DeviceConfig("cpu", "float32"),
                          threads=2, progress=False)
    values = config_values(config)
    assert values["max_queue"] == 5 and values["dtype"] == "float32"
    assert config_from_values(EngineConfig, values, progress=False) == config


def test_replica_config_embeds_the_engine_config():
    flat = ReplicaConfig(model="m", max_batch_size=16, max_queue=64, dtype="float32", lora_backend="torch", threads=3)
    assert flat.engine == EngineConfig(max_batch_size=16, max_waiting=64, device=DeviceConfig(dtype="float32"),
                                       lora_backend="torch")
    assert flat.threads == 3 and flat.model == "m"
    assert flat.engine_config() == dataclasses.replace(flat.engine, model="m", threads=3, progress=False)
    assert ReplicaConfig(model="", threads=1).engine_config().model is None
    moved = dataclasses.replace(flat, model="other", threads=2)
    assert moved.engine == flat.engine and moved.model == "other"
    nested = ReplicaConfig(engine=EngineConfig(max_batch_size=4), max_seq_len=64)
    assert (nested.engine.max_batch_size, nested.engine.max_seq_len) == (4, 64)
    with pytest.raises(TypeError):
        ReplicaConfig(max_waitingg=3)
    with pytest.raises(ValueError, match="model on the ReplicaConfig"):
        ReplicaConfig(model="a", engine=EngineConfig(model="b"))
    with pytest.raises(ValueError, match="kv_block_size"):
        ReplicaConfig(kv_block_size=3)
