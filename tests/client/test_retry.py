"""The clients' retries on UNAVAILABLE, against a real gRPC server on 127.0.0.1 whose first
calls fail the way a server or a proxy in front of a dead replica fails."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from loraquilt.client import AsyncLoraQuiltClient, LoraQuiltClient
from loraquilt.client.retry import RetryPolicy
from loraquilt.client.routing import ROUTING_METADATA_KEY
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

FAST = dict(initial_backoff_s=0.01, max_backoff_s=0.05)


class FlakyService(pb_grpc.LoraQuiltServicer):
    """The first `failures` calls fail with `code`: by abort (status only) or, like Ray
    Serve's proxy, with the status set and an empty message returned."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE, with_message: bool = False,
                 fail_stream_after_first: bool = False):
        self.failures, self.code, self.with_message = failures, code, with_message
        self.fail_stream_after_first = fail_stream_after_first
        self.calls, self.keys = 0, []
        self.lock = threading.Lock()

    def _fails(self, context) -> bool:
        with self.lock:
            self.calls += 1
            self.keys.append(dict(context.invocation_metadata()).get(ROUTING_METADATA_KEY))
            return self.calls <= self.failures

    def _fail(self, context, empty):
        if self.with_message:
            context.set_code(self.code)
            context.set_details("replica went away")
            return empty
        context.abort(self.code, "replica went away")

    def Generate(self, request, context):
        if self._fails(context):
            return self._fail(context, pb.GenerateResponse())
        return pb.GenerateResponse(text=request.prompt.upper(), finish_reason="length")

    def GenerateStream(self, request, context):
        if self._fails(context):
            self._fail(context, None)
            return
        for word in request.prompt.split():
            yield pb.GenerateResponse(text=word)
            if self.fail_stream_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")

    def RegisterAdapter(self, request, context):
        if self._fails(context):
            return self._fail(context, pb.AdapterInfo())
        return pb.AdapterInfo(name=request.name)

    def ListAdapters(self, request, context):
        if self._fails(context):
            return self._fail(context, pb.ListAdaptersResponse())
        return pb.ListAdaptersResponse(adapters=[pb.AdapterInfo(name="a")])


@pytest.fixture
def serve():
    servers = []

    def start(service: FlakyService) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_LoraQuiltServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def client_for(target: str, attempts: int = 4) -> LoraQuiltClient:
    client = LoraQuiltClient(target, timeout=30, retries=attempts)
    client.retry = RetryPolicy(attempts=attempts, **FAST)
    return client


@pytest.mark.parametrize("with_message", [False, True], ids=["status-only", "empty-message-then-status"])
def test_generate_is_retried_and_keeps_its_routing_key(serve, with_message):
    service = FlakyService(failures=2, with_message=with_message)
    with client_for(serve(service)) as client:
        assert client.generate("hello", adapter="sql").text == "HELLO"
        assert [a.name for a in client.list_adapters()] == ["a"]
    assert service.calls == 4 and service.keys[:3] == ["sql"] * 3


def test_retries_stop_at_the_limit(serve):
    service = FlakyService(failures=10, with_message=True)
    with client_for(serve(service), attempts=3) as client:
        with pytest.raises(grpc.RpcError) as failed:
            client.generate("hello")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and service.calls == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_other_statuses_are_not_retried(serve, code):
    service = FlakyService(failures=1, code=code)
    with client_for(serve(service)) as client:
        with pytest.raises(grpc.RpcError) as failed:
            client.generate("hello")
    assert failed.value.code() == code and service.calls == 1


def test_admin_calls_are_not_retried(serve):
    service = FlakyService(failures=1)
    with client_for(serve(service)) as client:
        with pytest.raises(grpc.RpcError):
            client.register_adapter("x", "x")  # it may have landed: the caller decides
    assert service.calls == 1


def test_a_stream_is_retried_until_its_first_message_only(serve):
    service = FlakyService(failures=2)
    with client_for(serve(service)) as client:
        assert [piece.text for piece in client.generate_stream("one two three")] == ["one", "two", "three"]
    assert service.calls == 3

    service = FlakyService(failures=0, fail_stream_after_first=True)
    with client_for(serve(service)) as client:
        stream = client.generate_stream("one two")
        assert next(stream).text == "one"
        with pytest.raises(grpc.RpcError) as failed:
            next(stream)  # partial output already delivered: the caller decides
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and service.calls == 1


def test_a_stream_can_be_cancelled(serve):
    service = FlakyService(failures=0)
    with client_for(serve(service)) as client:
        stream = client.generate_stream("one two three")
        assert next(stream).text == "one"
        stream.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            list(stream)
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED and service.calls == 1


def test_the_async_client_retries_too(serve):
    service = FlakyService(failures=2, with_message=True)
    target = serve(service)

    async def run():
        async with AsyncLoraQuiltClient(target, timeout=30) as client:
            client.retry = RetryPolicy(attempts=4, **FAST)
            text = (await client.generate("hello", adapter="sql")).text
            pieces = [piece.text async for piece in client.generate_stream("a b")]
            return text, pieces

    assert asyncio.run(run()) == ("HELLO", ["a", "b"])
    assert service.calls == 4
