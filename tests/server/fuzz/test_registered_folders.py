"""Fuzzing adapter folders: a good PEFT folder with its config mutated or its safetensors
truncated, corrupted or mislabelled, registered over gRPC or HTTP; whatever is accepted
serves (or is refused per request), then goes."""

from __future__ import annotations

import json
import shutil
import struct
from itertools import count
from pathlib import Path

import grpc
import pytest
from fixtures_fuzz import JSON_VALUES, PROFILES, assert_client_error, assert_http_answer, fuzz
from hypothesis import strategies as st

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from loraquilt.v1 import loraquilt_pb2 as pb

_folders = count()


# -- adapter folders ---------------------------------------------------------------------------------

CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
               "use_dora", "bias", "modules_to_save", "fan_in_fan_out", "layers_to_transform", "task_type",
               "unknown_field"]
CONFIG_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), JSON_VALUES),
    st.tuples(st.just("drop"), st.sampled_from(CONFIG_KEYS), st.none()),
    st.tuples(st.just("replace"), st.just(""), st.one_of(JSON_VALUES, st.just("[" * 100_000))),
    st.tuples(st.just("bytes"), st.just(""), st.binary(max_size=80)),
)
WEIGHT_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("header"), st.sampled_from(["dtype", "shape", "offsets", "key", "length"]),
              st.one_of(JSON_VALUES, st.sampled_from(["I64", "BOOL", "F8_E4M3", "C64", "BF16", [8, 10**12], [-1, 64]]))),
    st.tuples(st.just("bytes"), st.just(0.0), st.binary(max_size=80)),
    st.tuples(st.just("directory"), st.just(0.0), st.none()),
)


def mutate_config(config: dict, mutation) -> bytes:
    kind, key, value = mutation
    if kind == "set":
        config[key] = value
    elif kind == "drop":
        config.pop(key, None)
    elif kind == "replace":
        return value.encode() if isinstance(value, str) and value.startswith("[") else \
            json.dumps(value).encode("utf-8", "surrogatepass")
    else:
        return value
    return json.dumps(config).encode("utf-8", "surrogatepass")


def mutate_weights(data: bytes, mutation, target: Path) -> None:
    kind, where, value = mutation
    if kind == "directory":
        target.mkdir()
        return
    if kind == "truncate":
        data = data[: int(len(data) * where)]
    elif kind == "flip":
        position = min(len(data) - 1, int(len(data) * where))
        data = data[:position] + bytes([data[position] ^ value]) + data[position + 1:]
    elif kind == "bytes":
        data = value
    else:  # rewrite one field of the JSON header (its length kept consistent unless that is the field)
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        name = next(key for key in header if key != "__metadata__")
        if where == "dtype":
            header[name]["dtype"] = value
        elif where == "shape":
            header[name]["shape"] = value
        elif where == "offsets":
            header[name]["data_offsets"] = value
        elif where == "key":
            header[str(value)[:40] or "x"] = header.pop(name)
        encoded = json.dumps(header).encode("utf-8", "surrogatepass")
        prefix = struct.pack("<Q", len(encoded) if where != "length" else (hash(str(value)) % 2**64))
        data = prefix + encoded + data[8 + length:]
    target.write_bytes(data)


@pytest.mark.parametrize("profile", PROFILES)
def test_adapter_folders(live, profile):
    good_config = json.loads((live.good / CONFIG_FILE).read_text())
    good_weights = (live.good / WEIGHTS_FILE).read_bytes()

    def check(case):
        config_mutation, weight_mutation, over_http = case
        folder = live.root / f"fuzzed-{next(_folders)}"
        folder.mkdir()
        config = mutate_config(dict(good_config), config_mutation) if config_mutation else \
            json.dumps(good_config).encode()
        (folder / CONFIG_FILE).write_bytes(config)
        if weight_mutation:
            mutate_weights(good_weights, weight_mutation, folder / WEIGHTS_FILE)
        else:
            (folder / WEIGHTS_FILE).write_bytes(good_weights)
        name = "fz"
        if over_http:
            status, answer = live.http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder.name})
            outcome = assert_http_answer(status, answer, case)
            registered = status == 200
        else:
            try:
                live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=folder.name), timeout=60,
                                          metadata=live.admin)
                registered, outcome = True, "ok"
            except grpc.RpcError as error:
                outcome = assert_client_error(error.code(), error.details(), case)
                registered = False
        if registered:  # whatever was accepted serves (or is refused per request), then goes
            try:
                live.stub.Generate(pb.GenerateRequest(prompt="The river", adapter=name, max_new_tokens=2), timeout=60)
            except grpc.RpcError as error:
                assert_client_error(error.code(), error.details(), case)
            live.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=60, metadata=live.admin)
        assert name not in live.adapter_names()
        shutil.rmtree(folder, ignore_errors=True)
        return "ok" if outcome == "ok" else "refused"

    cases = st.tuples(st.one_of(st.none(), CONFIG_MUTATIONS), st.one_of(st.none(), WEIGHT_MUTATIONS), st.booleans())
    outcomes = fuzz(cases, check, profile, live)
    assert outcomes["ok"] and outcomes["refused"], outcomes
