"""Request bytes that are not the RPC's protobuf message as a client error.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!"): our fault, retry. This interceptor wraps the deserializer of
every method of the server (the LoraQuilt service, health, reflection): a message that
does not parse (truncated fields, a wrong wire type, invalid UTF-8 in a string) reaches
the method as a `Malformed` marker, and the method answers INVALID_ARGUMENT naming the
RPC and the parser's reason instead of running.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Malformed:
    """Bytes that did not parse as the method's request message."""

    reason: str


def _tolerant(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError and whatever a parser raises on bad bytes
            return Malformed(str(error) or type(error).__name__)

    return parse


def _refusal(method: str, malformed: Malformed) -> str:
    return f"{method}: the request is not a valid protobuf message for this RPC ({malformed.reason})"


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Every method's deserializer made tolerant; a Malformed request is INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary_unary(request, context):
                if isinstance(request, Malformed):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method, request))
                return inner(request, context)

            return handler._replace(request_deserializer=parse, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):
                if isinstance(request, Malformed):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method, request))
                yield from inner_stream(request, context)

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)

        def checked(requests, context):
            for request in requests:
                if isinstance(request, Malformed):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method, request))
                yield request

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary
            return handler._replace(request_deserializer=parse,
                                    stream_unary=lambda requests, context: inner_su(checked(requests, context), context))
        inner_ss = handler.stream_stream
        return handler._replace(request_deserializer=parse,
                                stream_stream=lambda requests, context: inner_ss(checked(requests, context), context))
