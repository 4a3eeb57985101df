"""The gRPC service: protobuf <-> engine types, status codes, streaming. Touches no tensor.

Status codes: unknown adapter NOT_FOUND; bad arguments INVALID_ARGUMENT (the message
names the field); name taken ALREADY_EXISTS; path outside the adapter root
PERMISSION_DENIED; queue full or --max-adapters reached RESOURCE_EXHAUSTED; adapter files
deleted or rewritten since registration FAILED_PRECONDITION; shutting down UNAVAILABLE; a
failed engine step, or non-finite logits for a request, INTERNAL. Admin credentials are
checked before the service sees a call (server/auth.py). Every generation outcome is
counted in `loraquilt_requests_total{status}`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from loraquilt.server.adapters.registry import (
    AdapterChanged, AdapterExists, AdapterRecord, TooManyAdapters, UnknownAdapter,
)
from loraquilt.server.engine import EngineStepError
from loraquilt.server.engine_loop import EngineLoop, ShuttingDown
from loraquilt.server.metrics import Metrics
from loraquilt.server.request import FINISH_CANCELLED, Request, RequestError, SamplingParams
from loraquilt.server.scheduler import QueueFull
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_MIX = 8
MAX_PATH_CHARS = 1024


@dataclass(frozen=True)
class ServiceConfig:
    adapter_root: Path | None = None  # RegisterAdapter paths must resolve inside it
    default_max_new_tokens: int = 128
    max_new_tokens_limit: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("need 1 <= default_max_new_tokens <= max_new_tokens_limit")


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def status_for(error: BaseException) -> ServiceError:
    """The gRPC status a failure maps to."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, AdapterChanged):  # before AdapterError, its base
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if isinstance(error, UnknownAdapter):
        return ServiceError(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, AdapterExists):
        return ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(error))
    if isinstance(error, (RequestError, AdapterError)):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, (QueueFull, TooManyAdapters)):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, ShuttingDown):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, EngineStepError):
        return ServiceError(grpc.StatusCode.INTERNAL, str(error))
    return ServiceError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def check_adapter_name(name: str, field_name: str = "name") -> None:
    if not ADAPTER_NAME.fullmatch(name):  # fullmatch: '$' alone would let a trailing newline in
        raise RequestError(field_name, f"adapter names are 1-128 characters of [A-Za-z0-9._:-] "
                                       f"starting with a letter or digit; got {shown(name)!r}")


class LoraQuiltService(pb_grpc.LoraQuiltServicer):
    def __init__(self, loop: EngineLoop, config: ServiceConfig, metrics: Metrics):
        self.loop, self.config, self.metrics = loop, config, metrics

    # -- generation -----------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        handle = self._submit(request, context, stream=False)
        try:
            for output in handle.outputs():
                if output.error is not None:
                    self._fail(context, output.error)
                if output.finished is not None:
                    return self.response_for(output.finished)
        finally:
            handle.cancel()  # no-op once finished; frees the sequence if the client went away
        raise AssertionError("unreachable")

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        handle = self._submit(request, context)
        counted = False
        try:
            for output in handle.outputs():
                if output.error is not None:
                    counted = True
                    self._fail(context, output.error)
                if output.finished is not None:
                    counted = True
                    response = self.response_for(output.finished)
                    response.text, response.token_ids[:] = output.new_text, list(output.new_token_ids)
                    yield response
                    return
                if output.new_text or output.new_token_ids:
                    yield pb.GenerateResponse(text=output.new_text, token_ids=list(output.new_token_ids))
        finally:
            handle.cancel()
            if not counted:  # the client went away mid-stream
                self.metrics.requests.labels(status="cancelled").inc()

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext, stream: bool = True):
        try:
            engine_request = self.to_engine_request(request)
            handle = self.loop.submit(engine_request, stream=stream)
        except Exception as error:  # refused before it ran
            self._fail(context, error)
        context.add_callback(handle.cancel)  # client cancel or deadline: free the sequence
        return handle

    def to_engine_request(self, request: pb.GenerateRequest) -> Request:
        """The engine's Request for a GenerateRequest; RequestError names a bad field."""
        if not request.prompt:
            raise RequestError("prompt", "must not be empty")
        if request.adapter and request.adapters:
            raise RequestError("adapters", "set either adapter or adapters (a weighted mix), not both")
        if request.adapter:
            check_adapter_name(request.adapter, "adapter")
        if len(request.adapters) > MAX_MIX:
            raise RequestError("adapters", f"at most {MAX_MIX} adapters in a mix, got {len(request.adapters)}")
        for entry in request.adapters:
            check_adapter_name(entry.name, "adapters.name")
            if not math.isfinite(entry.weight):
                raise RequestError("adapters.weight", f"weight of {entry.name!r} must be finite, got {entry.weight}")
        if request.adapters and not sum(e.weight for e in request.adapters) > 0:
            raise RequestError("adapters", "mix weights must sum to a positive number")
        max_new = request.max_new_tokens or self.config.default_max_new_tokens
        if max_new > self.config.max_new_tokens_limit:
            raise RequestError("max_new_tokens", f"{max_new} is over this server's limit of "
                                                 f"{self.config.max_new_tokens_limit}")
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=request.temperature,
            top_p=request.top_p if request.top_p != 0 else 1.0,
            top_k=request.top_k,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
            ignore_eos=request.ignore_eos,
        )
        return Request(
            prompt=request.prompt, chat=request.chat, adapter=request.adapter or None,
            mix=tuple((e.name, e.weight) for e in request.adapters), sampling=sampling,
        )

    def response_for(self, result) -> pb.GenerateResponse:
        """The final GenerateResponse of a finished request (counted as ok or cancelled)."""
        status = "cancelled" if result.finish_reason == FINISH_CANCELLED else "ok"
        self.metrics.requests.labels(status=status).inc()
        return pb.GenerateResponse(
            text=result.text, token_ids=list(result.token_ids), finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
        )

    def _fail(self, context: grpc.ServicerContext, error: BaseException):
        status = self.count_failure(error)
        context.abort(status.code, status.message)

    def count_failure(self, error: BaseException) -> ServiceError:
        """The status a failed generation gets, counted in loraquilt_requests_total."""
        status = status_for(error)
        self.metrics.requests.labels(status=status.code.name.lower()).inc()
        return status

    # -- adapters -------------------------------------------------------------------------

    def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.AdapterInfo:
        try:
            check_adapter_name(request.name)
            path = self.resolve_adapter_path(request.path)
            record = self.loop.engine.register_adapter(request.name, path)
        except Exception as error:
            status = status_for(error)
            context.abort(status.code, status.message)
        return adapter_info(record)

    def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest, context) -> pb.UnregisterAdapterResponse:
        try:
            check_adapter_name(request.name)
            self.loop.engine.unregister_adapter(request.name)
        except Exception as error:
            status = status_for(error)
            context.abort(status.code, status.message)
        return pb.UnregisterAdapterResponse()

    def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        records = sorted(self.loop.engine.adapters.records(), key=lambda r: r.name)
        return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in records])

    def resolve_adapter_path(self, path: str) -> Path:
        """`path` resolved inside the adapter root, or the error that refuses it."""
        root = self.config.adapter_root
        if root is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "adapter registration is disabled: the server has no --adapter-root")
        if not path or "\x00" in path:
            raise RequestError("path", "must be a non-empty path without NUL characters")
        if len(path) > MAX_PATH_CHARS:
            raise RequestError("path", f"at most {MAX_PATH_CHARS} characters, got {len(path)}")
        real_root = root.resolve()
        try:  # symlinks and '..' resolved before the check, the folder's and its files'
            candidate = (real_root / path).resolve()
            files = {name: (candidate / name).resolve() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
            reason = error.strerror if isinstance(error, OSError) else "symlink loop"
            raise RequestError("path", f"{shown(path)!r} cannot be resolved: {reason}") from None
        if candidate != real_root and real_root not in candidate.parents:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"path {shown(path)!r} resolves outside the adapter root")
        for name, target in files.items():
            if real_root not in target.parents:
                raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                                   f"{name} in {shown(path)!r} links outside the adapter root")
        return candidate


def shown(text: str, limit: int = 40) -> str:
    """`text` cut short for an error message (a status's details travel in trailers)."""
    return text if len(text) <= limit else text[:limit] + "..."


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=record.name, rank=record.rank, target_modules=list(record.target_modules),
                          size_bytes=record.size_bytes, tier=record.tier)
