"""Helpers for the HTTP API tests (tests/server/http_api): a real server on 127.0.0.1 with
gRPC, HTTP and metrics ports, the real `openai` client pointed at it, plain HTTP calls and
its metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
from fixtures_server import metric_value, scrape

from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig

NEW_TOKENS = 8
PROMPTS = ("The river", "Birds fly over the", "A long time ago in a quiet town", "Numbers",
           "The market opens", "Rain falls on", "Seven", "Under the bridge")
ADMIN_TOKEN = "admin-token-0123456789abcdef"
API_KEY = "api-key-0123456789abcdef"
BASE_ID = "tiny-base"
LONG = 2000  # new tokens of a request that must still run when the test acts on it


def engine_config(base, **overrides) -> EngineConfig:
    settings = dict(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=16, max_active_adapters=8,
                    max_cpu_adapters=16, max_lora_rank=16, max_seq_len=2048, lora_backend="torch", progress=False)
    return EngineConfig(**{**settings, **overrides})


def start(base, adapter_root, *, engine=None, **server) -> RunningServer:
    settings = dict(port=0, metrics_port=0, http_port=0, grace_seconds=10, served_model_name=BASE_ID,
                    service=ServiceConfig(adapter_root=adapter_root, default_max_new_tokens=NEW_TOKENS,
                                          max_new_tokens_limit=LONG))
    return RunningServer(Engine(engine or engine_config(base)), ServerConfig(**{**settings, **server}))


def openai_client(server, *, asynchronous: bool = False, **options):
    """The real `openai` client (AsyncOpenAI with asynchronous=True) on a server's HTTP API."""
    options = {"api_key": "unused", "max_retries": 0, "timeout": 60, **options}
    factory = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return factory(base_url=f"http://127.0.0.1:{server.http_port}/v1", **options)


def http(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain HTTP call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(server, name: str, labels: str = "") -> float:
    return metric_value(scrape(server), name, labels)


def streamed_choices(chunks) -> tuple[dict[int, str], dict[int, str]]:
    """The text and the finish reason of each choice of a streamed completion, by index
    (a choice that finishes twice fails)."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in reasons, f"choice {choice.index} finished twice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons
