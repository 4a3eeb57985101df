"""Python clients for the loraquilt gRPC service: `LoraQuiltClient` (blocking) and
`AsyncLoraQuiltClient` (asyncio). No torch here.

    client = LoraQuiltClient("127.0.0.1:50051")
    client.register_adapter("sql", "sql-adapter")          # a folder under --adapter-root
    print(client.generate("List the tables", adapter="sql").text)
    for piece in client.generate_stream("Tell me a story", mix={"a": 0.5, "b": 0.5}):
        print(piece.text, end="", flush=True)

A server started with `--admin-token-file` needs `admin_token=` for register/unregister
(sent only on those calls); one started with `--api-key-file` needs `api_key=` (sent on
generation and listing calls); one started with `--tls-cert` needs `tls=True` (system
roots) or `tls="ca.pem"` (a private CA or a self-signed certificate). Every Generate
carries its routing key as metadata (client/routing.py); generation and listing calls that
meet UNAVAILABLE (a replica of `loraquilt serve-ray` that died, a server restarting) are
tried again, `retries` attempts in all (client/retry.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import grpc

from loraquilt.client.retry import RetryingStream, RetryPolicy
from loraquilt.client.routing import routing_metadata
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

Mix = Mapping[str, float] | list[tuple[str, float]] | None
TLS = bool | str | Path | None  # None/False: plaintext; True: system roots; a path: PEM root certificates


def channel_credentials(tls: TLS) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    roots = None if tls is True else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=roots)


def with_bearer(metadata: list[tuple[str, str]] | None, token: str | None) -> list[tuple[str, str]] | None:
    """`metadata` plus `authorization: Bearer <token>` (as it is when token is None)."""
    if token is None:
        return metadata
    return [*(metadata or []), ("authorization", f"Bearer {token}")]


def build_request(prompt: str, *, adapter: str = "", mix: Mix = None, max_new_tokens: int = 0,
                  temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                  stop: list[str] | tuple[str, ...] = (), chat: bool = False,
                  ignore_eos: bool = False, **fields) -> pb.GenerateRequest:
    """fields: any other GenerateRequest field by its proto name (n, best_of, logprobs,
    prompt_logprobs, logit_bias, min_tokens, the penalties, min_p, stop_token_ids,
    json_schema, json_object, regex, grammar); ValueError names an unknown one."""
    entries = list(mix.items()) if isinstance(mix, Mapping) else list(mix or [])
    request = pb.GenerateRequest(
        prompt=prompt, adapter=adapter,
        adapters=[pb.AdapterWeight(name=name, weight=weight) for name, weight in entries],
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop=list(stop), chat=chat, ignore_eos=ignore_eos, **fields,
    )
    if seed is not None:
        request.seed = seed
    return request


DEFAULT_RETRIES = 4  # attempts in all, for generation and listing calls, on UNAVAILABLE


class LoraQuiltClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 channel: grpc.Channel | None = None, metadata: list[tuple[str, str]] | None = None,
                 admin_token: str | None = None, api_key: str | None = None, tls: TLS = None,
                 retries: int = DEFAULT_RETRIES):
        if channel is None:
            credentials = channel_credentials(tls)
            channel = (grpc.secure_channel(target, credentials) if credentials
                       else grpc.insecure_channel(target))
        self.channel = channel
        self.retry = RetryPolicy(attempts=max(1, retries))
        self.stub = pb_grpc.LoraQuiltStub(self.channel)
        self.timeout, self.metadata = timeout, with_bearer(metadata, api_key)
        self.admin_metadata = with_bearer(metadata, admin_token)

    def generate(self, prompt: str, **options) -> pb.GenerateResponse:
        request = build_request(prompt, **options)
        metadata = routing_metadata(request, self.metadata)
        return self.retry.call(lambda: self.stub.Generate(request, timeout=self.timeout, metadata=metadata))

    def generate_stream(self, prompt: str, **options) -> Iterator[pb.GenerateResponse]:
        """Incremental text per message; the last message has finish_reason and counts.
        The returned iterator also has the call's cancel()."""
        request = build_request(prompt, **options)
        metadata = routing_metadata(request, self.metadata)
        return RetryingStream(self.retry, lambda: self.stub.GenerateStream(
            request, timeout=self.timeout, metadata=metadata))

    def register_adapter(self, name: str, path: str) -> pb.AdapterInfo:
        return self.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=path),
                                         timeout=self.timeout, metadata=self.admin_metadata)

    def unregister_adapter(self, name: str) -> None:
        self.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=self.timeout,
                                    metadata=self.admin_metadata)

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.retry.call(lambda: self.stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=self.timeout, metadata=self.metadata)).adapters)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoraQuiltClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLoraQuiltClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 metadata: list[tuple[str, str]] | None = None, admin_token: str | None = None,
                 api_key: str | None = None, tls: TLS = None, retries: int = DEFAULT_RETRIES):
        credentials = channel_credentials(tls)
        self.channel = (grpc.aio.secure_channel(target, credentials) if credentials
                        else grpc.aio.insecure_channel(target))
        self.retry = RetryPolicy(attempts=max(1, retries))
        self.stub = pb_grpc.LoraQuiltStub(self.channel)
        self.timeout, self.metadata = timeout, with_bearer(metadata, api_key)
        self.admin_metadata = with_bearer(metadata, admin_token)

    async def generate(self, prompt: str, **options) -> pb.GenerateResponse:
        request = build_request(prompt, **options)
        metadata = routing_metadata(request, self.metadata)
        return await self.retry.call_async(lambda: self.stub.Generate(request, timeout=self.timeout,
                                                                      metadata=metadata))

    async def generate_stream(self, prompt: str, **options) -> AsyncIterator[pb.GenerateResponse]:
        request = build_request(prompt, **options)
        metadata = routing_metadata(request, self.metadata)
        async for response in self.retry.stream_async(lambda: self.stub.GenerateStream(
                request, timeout=self.timeout, metadata=metadata)):
            yield response

    async def register_adapter(self, name: str, path: str) -> pb.AdapterInfo:
        return await self.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=path),
                                               timeout=self.timeout, metadata=self.admin_metadata)

    async def unregister_adapter(self, name: str) -> None:
        await self.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=self.timeout,
                                          metadata=self.admin_metadata)

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        response = await self.retry.call_async(lambda: self.stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=self.timeout, metadata=self.metadata))
        return list(response.adapters)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLoraQuiltClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
