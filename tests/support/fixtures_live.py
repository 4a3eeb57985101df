"""One real server (a tiny random Llama, float32) on 127.0.0.1 with gRPC and the HTTP API,
an admin token, an adapter root and a valid adapter folder outside it, for tests that
throw bad input at both transports: canaries (greedy, base and an adapter) recorded at
start, raw calls on both transports, and the documented client statuses."""

from __future__ import annotations

import http.client
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fixtures_models import build_tiny_model, make_adapter_zoo

from loraquilt.server.app import RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

ADMIN_TOKEN = "admin-token-fuzz-0123456789abcdef"
BASE_ID = "tiny-base"
MAX_SEQ_LEN = 128
NEW_TOKENS_LIMIT = 16  # OpenAI's completions default max_tokens
CANARY_TOKENS = 8
TIMEOUT = 60
CANARY_PROMPT = "The river"
# every status a caller may get for input the server refuses (INTERNAL only for the
# documented non-finite-logits case, checked by message)
CLIENT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
})
NON_FINITE = "non-finite"  # in the message of the one documented INTERNAL answer
CLIENT_HTTP = frozenset({400, 401, 403, 404, 405, 409, 413, 422, 429, 431})
SERVICE = "/loraquilt.v1.LoraQuilt/"
# the request message of every RPC the server answers, by full method name
RPC_REQUESTS = {
    SERVICE + "Generate": pb.GenerateRequest, SERVICE + "GenerateStream": pb.GenerateRequest,
    SERVICE + "RegisterAdapter": pb.RegisterAdapterRequest, SERVICE + "UnregisterAdapter": pb.UnregisterAdapterRequest,
    SERVICE + "ListAdapters": pb.ListAdaptersRequest,
    "/grpc.health.v1.Health/Check": None, "/grpc.health.v1.Health/Watch": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": None,
}
STREAMING_RESPONSES = {SERVICE + "GenerateStream", "/grpc.health.v1.Health/Watch"}
STREAMING_REQUESTS = {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}


@dataclass
class Live:
    server: RunningServer
    channel: grpc.Channel
    stub: pb_grpc.LoraQuiltStub
    root: Path  # --adapter-root
    good: Path  # a valid adapter under the root, registered as "a0"
    outside: Path  # a valid adapter folder outside the root
    canaries: dict = field(default_factory=dict)  # (transport, model) -> tokens or text

    @property
    def admin(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {ADMIN_TOKEN}")]

    # -- gRPC --------------------------------------------------------------------------------
    def raw_call(self, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
        """(status, details) of one call carrying `payload` as the request message's bytes."""
        identity = lambda data: data  # noqa: E731
        if method in STREAMING_REQUESTS:
            call = self.channel.stream_stream(method, request_serializer=identity, response_deserializer=identity)
            argument = iter([payload])
        elif method in STREAMING_RESPONSES:
            call = self.channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
            argument = payload
        else:
            call = self.channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
            argument = payload
        try:
            result = call(argument, timeout=5 if method.endswith("Watch") else TIMEOUT, metadata=self.admin)
            if method in STREAMING_RESPONSES or method in STREAMING_REQUESTS:
                for _ in result:
                    pass
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details() or ""

    def grpc_canary(self, adapter: str = "") -> tuple[int, ...]:
        request = pb.GenerateRequest(prompt=CANARY_PROMPT, adapter=adapter, max_new_tokens=CANARY_TOKENS,
                                     ignore_eos=True)
        return tuple(self.stub.Generate(request, timeout=TIMEOUT).token_ids)

    def adapter_names(self) -> set[str]:
        listed = self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT, metadata=self.admin)
        return {adapter.name for adapter in listed.adapters}

    # -- HTTP --------------------------------------------------------------------------------
    def http(self, method: str, path: str, body=None, *, raw: bytes | None = None,
             headers: dict | None = None) -> tuple[int, object]:
        """(status, parsed JSON or text) of one HTTP call (the admin token always sent)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=TIMEOUT)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            sent = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}", **(headers or {})}
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
            status = response.status
        finally:
            connection.close()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def http_canary(self, model: str) -> str:
        status, body = self.http("POST", "/v1/completions", {"model": model, "prompt": CANARY_PROMPT,
                                                             "max_tokens": CANARY_TOKENS, "temperature": 0,
                                                             "ignore_eos": True})
        assert status == 200, body
        return body["choices"][0]["text"]

    # -- invariants --------------------------------------------------------------------------
    def record_canaries(self) -> None:
        self.canaries = self._canaries()

    def _canaries(self) -> dict:
        return {("grpc", "base"): self.grpc_canary(), ("grpc", "a0"): self.grpc_canary("a0"),
                ("http", "base"): self.http_canary(BASE_ID), ("http", "a0"): self.http_canary("a0")}

    def assert_canaries(self) -> None:
        """The server answers and its greedy answers are what they were at start."""
        assert self._canaries() == self.canaries


def start_live(tmp: Path, seed: int = 7, *, max_seq_len: int = MAX_SEQ_LEN,
               new_tokens_limit: int = NEW_TOKENS_LIMIT) -> Live:
    """max_seq_len: the engine's context (the tiny model holds 256 positions);
    new_tokens_limit: the most new tokens one request may ask for."""
    base = build_tiny_model(tmp / "base", "llama", seed=seed)
    root = tmp / "adapters"
    good, other = make_adapter_zoo(base, root, count=2, seed=seed * 10)
    outside = Path(shutil.copytree(good, tmp / "outside" / "adapter"))
    engine_config = EngineConfig(device=DeviceConfig(dtype="float32"), model=str(base), max_batch_size=8,
                                 max_active_adapters=4, max_cpu_adapters=8, max_lora_rank=16,
                                 max_seq_len=max_seq_len, lora_backend="torch", progress=False)
    server = RunningServer(Engine(engine_config), ServerConfig(
        port=0, metrics_port=None, http_port=0, grace_seconds=5, served_model_name=BASE_ID,
        admin_token=ADMIN_TOKEN, preload=(("a0", str(good)), ("a1", str(other))),
        service=ServiceConfig(adapter_root=root, default_max_new_tokens=CANARY_TOKENS,
                              max_new_tokens_limit=new_tokens_limit)))
    channel = grpc.insecure_channel(server.target)
    live = Live(server, channel, pb_grpc.LoraQuiltStub(channel), root, good, outside)
    live.record_canaries()
    return live


def stop_live(live: Live) -> None:
    live.channel.close()
    live.server.shutdown(grace=5)
