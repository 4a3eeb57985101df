"""The gRPC service: protobuf <-> the generation layer (server/generation.py). Touches no
tensor, runs no generation loop of its own.

Status codes are the ErrorKind names: unknown adapter NOT_FOUND; bad arguments
INVALID_ARGUMENT (the message names the field); name taken ALREADY_EXISTS; path outside
the adapter root PERMISSION_DENIED; queue full or --max-adapters reached
RESOURCE_EXHAUSTED; adapter files deleted or rewritten since registration
FAILED_PRECONDITION; shutting down UNAVAILABLE; a failed engine step, or non-finite logits
for a request, INTERNAL. Credentials are checked before the service sees a call
(server/auth.py).
"""

from __future__ import annotations

import grpc

from loraquilt.server.adapter_admin import MAX_PATH_CHARS, AdapterAdmin  # noqa: F401 (re-exported)
from loraquilt.server.adapters.registry import AdapterRecord
from loraquilt.server.generation import (  # noqa: F401 (re-exported)
    MAX_MIX, GenerationError, Generations, ServiceConfig, check_adapter_name, classify,
)
from loraquilt.server.request import GenerationResult, Request
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc


def grpc_code(error: GenerationError) -> grpc.StatusCode:
    return grpc.StatusCode[error.kind.name]


def grpc_fields(request: pb.GenerateRequest) -> dict:
    """A GenerateRequest as the generation layer's fields (`Generations.build_request`)."""
    return dict(
        prompt=request.prompt, chat=request.chat, adapter=request.adapter or None,
        mix=tuple((entry.name, entry.weight) for entry in request.adapters),
        max_new_tokens=request.max_new_tokens or None, temperature=request.temperature,
        top_p=request.top_p if request.top_p != 0 else 1.0, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
    )


def to_engine_request(generations: Generations, request: pb.GenerateRequest) -> Request:
    """The engine's Request for a GenerateRequest; RequestError names a bad field."""
    return generations.build_request(**grpc_fields(request))


def final_response(result: GenerationResult, text: str | None = None, token_ids=None) -> pb.GenerateResponse:
    """The last GenerateResponse: the whole text (unary) or the last piece (stream), with counts."""
    return pb.GenerateResponse(
        text=result.text if text is None else text,
        token_ids=list(result.token_ids if token_ids is None else token_ids),
        finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


def piece_response(piece) -> pb.GenerateResponse:
    if piece.result is not None:
        return final_response(piece.result, piece.text, piece.token_ids)
    return pb.GenerateResponse(text=piece.text, token_ids=list(piece.token_ids))


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=record.name, rank=record.rank, target_modules=list(record.target_modules),
                          size_bytes=record.size_bytes, tier=record.tier)


class LoraQuiltService(pb_grpc.LoraQuiltServicer):
    def __init__(self, generations: Generations, admin: AdapterAdmin):
        self.generations, self.admin = generations, admin

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        generation = self._open(request, context, stream=False)
        try:
            return final_response(generation.result())
        except GenerationError as error:
            context.abort(grpc_code(error), error.message)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        generation = self._open(request, context, stream=True)
        try:
            for piece in generation:
                yield piece_response(piece)
        except GenerationError as error:
            context.abort(grpc_code(error), error.message)

    def _open(self, request: pb.GenerateRequest, context: grpc.ServicerContext, stream: bool):
        engine_request = None
        try:
            engine_request = to_engine_request(self.generations, request)
            self.generations.resolve_adapters(engine_request)
        except Exception as error:  # refused before it ran
            failure = self.generations.count_failure(error, engine_request)
            context.abort(grpc_code(failure), failure.message)
        try:
            generation = self.generations.open(engine_request, stream=stream)
        except GenerationError as error:
            context.abort(grpc_code(error), error.message)
        context.add_callback(generation.cancel)  # client cancel or deadline: free the sequence
        return generation

    def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.AdapterInfo:
        try:
            return adapter_info(self.admin.register(request.name, request.path))
        except Exception as error:
            failure = classify(error)
            context.abort(grpc_code(failure), failure.message)

    def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest, context) -> pb.UnregisterAdapterResponse:
        try:
            self.admin.unregister(request.name)
        except Exception as error:
            failure = classify(error)
            context.abort(grpc_code(failure), failure.message)
        return pb.UnregisterAdapterResponse()

    def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[adapter_info(record) for record in self.admin.records()])
