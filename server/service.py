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

from loraquilt.server.adapter_admin import AdapterAdmin
from loraquilt.server.generation import GenerationError, GenerationLayer, classify
from loraquilt.server.proto_mapping import adapter_info, final_response, grpc_fields, piece_response
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc


def grpc_code(error: GenerationError) -> grpc.StatusCode:
    return grpc.StatusCode[error.kind.name]


class LoraQuiltService(pb_grpc.LoraQuiltServicer):
    def __init__(self, generation_layer: GenerationLayer, admin: AdapterAdmin):
        self.generation_layer, self.admin = generation_layer, admin

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
            engine_request = self.generation_layer.build_request(**grpc_fields(request))
            self.generation_layer.resolve_adapters(engine_request)
            self.generation_layer.compile_constraint(engine_request)
        except Exception as error:  # refused before it ran
            failure = self.generation_layer.count_failure(error, engine_request)
            context.abort(grpc_code(failure), failure.message)
        try:
            generation = self.generation_layer.open(engine_request, stream=stream)
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
