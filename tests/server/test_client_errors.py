"""Inputs that once got a server error (INTERNAL / 500) and are client errors, on both
transports where they apply: each answered with the documented status and the field it
concerns, and the server's greedy canaries unchanged after each."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from fixtures_live import ADMIN_TOKEN, BASE_ID, SERVICE, start_live, stop_live

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, AdapterError, read_adapter_config
from loraquilt.server.adapters.state_file import RegistrationState, StateFileError
from loraquilt.server.app import RunningServer, ServerConfig, ServerStartError
from loraquilt.server.engine import Engine
from loraquilt.server.generation import ServiceConfig
from loraquilt.v1 import loraquilt_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
HUGE = 10**309  # past float's range: float(HUGE) overflows


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("client-errors"))
    yield live
    stop_live(live)


@pytest.fixture(autouse=True)
def canaries_hold(live):
    yield
    live.assert_canaries()


def error_of(body) -> dict:
    assert isinstance(body, dict) and "error" in body, body
    return body["error"]


# -- malformed protobuf bytes ------------------------------------------------------------------

@pytest.mark.parametrize("method, payload", [
    (SERVICE + "Generate", b"\n|"),  # field 1 (prompt) claims 124 bytes, none follow
    (SERVICE + "GenerateStream", b"\n\x02\xed\xa0"),  # prompt: invalid UTF-8 (a CESU-8 surrogate)
    (SERVICE + "ListAdapters", b"\xff"),
    (SERVICE + "RegisterAdapter", b"\x12\x03\xed\xa0\x80"),  # path: an encoded lone surrogate
    (SERVICE + "UnregisterAdapter", b"\x0a"),
    ("/grpc.health.v1.Health/Check", b"\xff\xff"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", b"\x1a\x05ab"),
])
def test_malformed_protobuf_is_invalid_argument_naming_the_rpc(live, method, payload):
    code, details = live.raw_call(method, payload)
    assert code == INVALID, details
    assert method in details and "not a valid protobuf message" in details


# -- chat roles of the wrong type ----------------------------------------------------------------

@pytest.mark.parametrize("role", [["user"], {"a": 1}, 3, None, "wizard"])
def test_chat_role_of_the_wrong_type_is_a_400_naming_it(live, role):
    status, body = live.http("POST", "/v1/chat/completions",
                             {"model": BASE_ID, "messages": [{"role": role, "content": "hi"}]})
    assert status == 400 and error_of(body)["param"] == "messages[0].role", body


# -- lone surrogates ----------------------------------------------------------------------------

def raw_json(fields: str) -> bytes:
    """A JSON body with an escaped lone surrogate kept as written ("\\ud800")."""
    return fields.encode()


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", f'{{"model": "{BASE_ID}", "prompt": "a\\ud800b"}}', "prompt"),
    ("/v1/chat/completions", f'{{"model": "{BASE_ID}", "messages": [{{"role": "user", "content": "\\udfff"}}]}}',
     "messages[0].content"),
    ("/v1/chat/completions", f'{{"model": "{BASE_ID}", "messages": [{{"role": "user", "content": '
                             '[{"type": "text", "text": "x\\ud83d"}]}]}', "messages[0].content"),
    ("/v1/completions", f'{{"model": "{BASE_ID}", "prompt": "a", "stop": ["\\ud800"]}}', "stop"),
    ("/v1/completions", '{"model": "a\\ud800", "prompt": "a"}', "model"),
    ("/v1/load_lora_adapter", '{"lora_name": "s1", "lora_path": "adapter-0\\ud800"}', "lora_path"),
    ("/v1/load_lora_adapter", '{"lora_name": "s\\ud800", "lora_path": "adapter-0"}', "lora_name"),
])
def test_lone_surrogates_are_a_400_naming_the_field(live, route, body, param):
    status, answer = live.http("POST", route, raw=raw_json(body))
    assert status == 400 and error_of(answer)["param"] == param, answer
    assert "s1" not in live.adapter_names()


def test_a_lone_surrogate_in_a_grpc_path_is_invalid_argument(live):
    # protobuf cannot carry one (its strings are UTF-8): the encoded surrogate is malformed bytes
    code, details = live.raw_call(SERVICE + "RegisterAdapter", b"\x0a\x02s2\x12\x0badapter-0\xed\xa0\x80")
    assert code == INVALID, details
    assert "s2" not in live.adapter_names()


# -- deep nesting -------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                   "/v1/unload_lora_adapter"])
@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deeply_nested_json_bodies_are_a_400(live, route, depth):
    status, body = live.http("POST", route, raw=b'{"model": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and "nested deeper" in error_of(body)["message"], body


def test_an_adapter_config_nested_deep_is_refused_naming_the_file(live):
    folder = live.root / "deep-config"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text('{"r": 8, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    (folder / "adapter_model.safetensors").write_bytes((live.good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(grpc.RpcError) as info:
        live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name="deep", path="deep-config"), timeout=60,
                                  metadata=live.admin)
    assert info.value.code() == INVALID and CONFIG_FILE in info.value.details()
    status, body = live.http("POST", "/v1/load_lora_adapter", {"lora_name": "deep", "lora_path": "deep-config"})
    assert status == 400 and CONFIG_FILE in error_of(body)["message"] and error_of(body)["param"] == "lora_path"
    assert "deep" not in live.adapter_names()


@pytest.mark.parametrize("config", [
    '{"r": 8, "lora_alpha": ' + "9" * 400 + "}",  # an integer past float's range
    '{"r": 8, "lora_alpha": ' + "9" * 5000 + "}",  # past Python's 4300-digit integer parsing limit
    '{"r": 8, "alpha_pattern": {"q_proj": ' + "1" * 320 + "}}",
])
def test_adapter_configs_with_huge_numbers_are_adapter_errors(tmp_path, config):
    (tmp_path / CONFIG_FILE).write_text(config)
    with pytest.raises(AdapterError, match="lora_alpha|alpha_pattern|not valid JSON"):
        read_adapter_config(tmp_path, max_rank=16)


def test_a_state_file_nested_deep_stops_the_start_with_its_reason(tmp_path):
    (tmp_path / "adapters.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StateFileError, match="nested deeper"):
        RegistrationState(tmp_path).load()


# -- numbers past float's range -----------------------------------------------------------------

@pytest.mark.parametrize("field, value, param", [
    ("temperature", HUGE, "temperature"), ("top_p", HUGE, "top_p"), ("temperature", -HUGE, "temperature"),
    ("adapters", [{"name": "a0", "weight": HUGE}], "adapters"),
])
def test_integers_past_float_range_are_a_400_naming_the_field(live, field, value, param):
    body = {"model": BASE_ID, "prompt": "a", "max_tokens": 2, field: value}
    status, answer = live.http("POST", "/v1/completions", raw=json.dumps(body).encode())
    assert status == 400 and error_of(answer)["param"] == param, answer
    status, answer = live.http("POST", "/v1/chat/completions",
                               raw=json.dumps({**body, "messages": [{"role": "user", "content": "a"}]}).encode())
    assert status == 400 and error_of(answer)["param"] == param, answer


@pytest.mark.parametrize("field, value", [("temperature", math.inf), ("top_p", math.nan)])
def test_grpc_non_finite_sampling_values_are_invalid_argument(live, field, value):
    with pytest.raises(grpc.RpcError) as info:
        live.stub.Generate(pb.GenerateRequest(prompt="a", **{field: value}), timeout=60)
    assert info.value.code() == INVALID and field in info.value.details()


# -- the base model's id as an adapter name --------------------------------------------------------

def test_the_served_base_id_cannot_name_an_adapter(live):
    with pytest.raises(grpc.RpcError) as info:
        live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=BASE_ID, path="adapter-0"), timeout=60,
                                  metadata=live.admin)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "base model" in info.value.details()
    status, body = live.http("POST", "/v1/load_lora_adapter", {"lora_name": BASE_ID, "lora_path": "adapter-0"})
    assert status == 400 and error_of(body)["param"] == "lora_name" and "base model" in error_of(body)["message"]
    status, models = live.http("GET", "/v1/models")
    ids = [card["id"] for card in models["data"]]
    assert ids.count(BASE_ID) == 1 and BASE_ID not in live.adapter_names()


def test_preloading_under_the_base_id_stops_the_start(live, tmp_path):
    config = ServerConfig(port=0, metrics_port=None, http_port=None, served_model_name="a0-base",
                          preload=(("a0-base", str(live.good)),), service=ServiceConfig(adapter_root=live.root))
    with pytest.raises(ServerStartError, match="served base model"):
        RunningServer(Engine(live.server.engine.config), config)


def test_credentials_are_checked_before_the_bytes(live):
    # a malformed admin call without the token is UNAUTHENTICATED, not a parse error
    identity = lambda data: data  # noqa: E731
    call = live.channel.unary_unary(SERVICE + "RegisterAdapter", request_serializer=identity,
                                    response_deserializer=identity)
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff", timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ADMIN_TOKEN not in (info.value.details() or "")
