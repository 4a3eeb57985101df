"""The model list (base and adapters), loading and unloading adapters over HTTP, and the
API key and admin token on both transports."""

from __future__ import annotations

import openai
import pytest
from fixtures_http import ADMIN_TOKEN, API_KEY, BASE_ID, http, openai_client, start

from loraquilt.client import LoraQuiltClient


# -- models, adapters, credentials -----------------------------------------------------------

def test_models_list_the_base_and_every_adapter(world, oai):
    server = world[2]
    cards = {card.id: card for card in oai.models.list().data}
    assert set(cards) >= {BASE_ID, *(f"a{i}" for i in range(8))}
    base = cards[BASE_ID]
    assert base.object == "model" and base.owned_by == "loraquilt"
    assert base.model_extra["parent"] is None and base.model_extra["max_model_len"] == server.engine.max_seq_len
    assert cards["a3"].model_extra["parent"] == BASE_ID and cards["a3"].model_extra["root"] == "adapter-3"
    assert isinstance(cards["a3"].created, int)


def test_load_and_unload_round_trip(world, oai):
    server = world[2]
    status, text = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "adapter-2"})
    assert status == 200, text
    assert "fresh" in {card.id for card in oai.models.list().data}
    assert oai.completions.create(model="fresh", prompt="The river", max_tokens=4, temperature=0).choices[0].text == \
        oai.completions.create(model="a2", prompt="The river", max_tokens=4, temperature=0).choices[0].text
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "adapter-2"})
    assert status == 400 and "already" in body["error"]["message"]
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "out", "lora_path": "../.."})
    assert status == 403
    status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "empty", "lora_path": "missing"})
    assert status == 400
    status, _ = http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 200
    assert "fresh" not in {card.id for card in oai.models.list().data}
    status, body = http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 404
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="fresh", prompt="The river", max_tokens=4)


def test_api_key_and_admin_token_are_enforced(world):
    base, adapter_root, _ = world
    server = start(base, adapter_root, admin_token=ADMIN_TOKEN, api_key=API_KEY)
    try:
        with openai_client(server, api_key=API_KEY) as client:
            assert client.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
            assert BASE_ID in {card.id for card in client.models.list().data}
        with openai_client(server, api_key="wrong-key-0123456789") as client:
            with pytest.raises(openai.PermissionDeniedError):
                client.completions.create(model=BASE_ID, prompt="Hi", max_tokens=2)
            with pytest.raises(openai.PermissionDeniedError):
                client.models.list()
        status, body = http(server, "POST", "/v1/chat/completions", {"model": BASE_ID, "messages": []})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        with openai_client(server, default_headers={"Authorization": "Basic abc"}) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}])
        load = {"lora_name": "x", "lora_path": "adapter-1"}
        assert http(server, "POST", "/v1/load_lora_adapter", load,
                    {"Authorization": f"Bearer {API_KEY}"})[0] == 403
        assert http(server, "POST", "/v1/load_lora_adapter", load)[0] == 401
        assert http(server, "POST", "/v1/load_lora_adapter", load, {"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 200
        assert http(server, "GET", "/health")[0] == 200  # open: probes carry no key
        with LoraQuiltClient(server.target, timeout=30, api_key=API_KEY, admin_token=ADMIN_TOKEN) as good:
            assert good.generate("Hi", max_new_tokens=2).completion_tokens >= 1
            assert [a.name for a in good.list_adapters()] == ["x"]
            good.unregister_adapter("x")
        import grpc

        with LoraQuiltClient(server.target, timeout=30, retries=1) as keyless:
            with pytest.raises(grpc.RpcError) as caught:
                keyless.generate("Hi", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                list(keyless.generate_stream("Hi", max_new_tokens=2))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                keyless.list_adapters()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.shutdown(grace=5)
