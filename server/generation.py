"""One generation path for every transport: the gRPC service, the OpenAI-compatible HTTP
API and the Ray Serve replica are thin adapters over this module.

It owns: validating a request's fields into an engine `Request` (the same rules and
messages whatever the wire), submitting it to the engine loop, the stream of its pieces
(sync or asyncio), cancelling it, and mapping every failure to one `ErrorKind`, from
which the gRPC status (same name) and the HTTP status are both derived. Every outcome is
counted here, once, in `loraquilt_requests_total{status}`. Touches no tensor and no wire
format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from loraquilt.server.adapters.merge import MergeSpec
from loraquilt.server.adapters.peft_folder import AdapterError
from loraquilt.server.adapters.registry import AdapterChanged, AdapterExists, TooManyAdapters, UnknownAdapter
from loraquilt.server.engine import EngineStepError
from loraquilt.server.engine_loop import EngineLoop, RequestHandle, ShuttingDown
from loraquilt.server.metrics import Metrics
from loraquilt.server.request import FINISH_CANCELLED, GenerationResult, Request, RequestError, SamplingParams
from loraquilt.server.scheduler import QueueFull



PROCESSING_FIELDS = frozenset({"logit_bias", "min_tokens", "repetition_penalty", "presence_penalty",
                               "frequency_penalty", "min_p", "stop_token_ids", "logprobs", "prompt_logprobs",
                               "constraint", "n", "best_of"})


MERGE_FIELDS = ("method", "density", "seed", "rank")


def merge_spec(fields: dict | None) -> MergeSpec | None:
    """A request's merge options (MergeSpec's fields by name) as a MergeSpec; None: none given."""
    if fields is None:
        return None
    if not isinstance(fields, dict):
        raise RequestError("merge", f'must be an object like {{"method": "ties", "density": 0.5}}, '
                                    f"got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(MERGE_FIELDS))
    if unknown:
        raise RequestError("merge", f"unknown fields {unknown}; it takes {', '.join(MERGE_FIELDS)}")
    return MergeSpec(**fields)


class ErrorKind(enum.Enum):
    """Why a call failed. The member name is the gRPC status code; `http_status` the HTTP
    status (values are (gRPC code number, HTTP status), so no two members alias)."""

    INVALID_ARGUMENT = (3, 400)
    NOT_FOUND = (5, 404)
    ALREADY_EXISTS = (6, 400)
    PERMISSION_DENIED = (7, 403)
    RESOURCE_EXHAUSTED = (8, 429)
    FAILED_PRECONDITION = (9, 409)
    INTERNAL = (13, 500)
    UNAVAILABLE = (14, 503)
    UNAUTHENTICATED = (16, 401)

    @property
    def http_status(self) -> int:
        return self.value[1]


class GenerationError(Exception):
    """A failure as every transport reports it: its kind, a message for the caller, and
    the request field it concerns (None when it is not one field)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param


def classify(error: BaseException) -> GenerationError:
    """The kind of failure an exception from validation, the registry or the engine is."""
    if isinstance(error, GenerationError):
        return error
    if isinstance(error, AdapterChanged):  # before AdapterError, its base
        return GenerationError(ErrorKind.FAILED_PRECONDITION, str(error))
    if isinstance(error, UnknownAdapter):
        return GenerationError(ErrorKind.NOT_FOUND, str(error))
    if isinstance(error, AdapterExists):
        return GenerationError(ErrorKind.ALREADY_EXISTS, str(error))
    if isinstance(error, RequestError):
        return GenerationError(ErrorKind.INVALID_ARGUMENT, str(error), error.field)
    if isinstance(error, AdapterError):
        return GenerationError(ErrorKind.INVALID_ARGUMENT, str(error))
    if isinstance(error, (QueueFull, TooManyAdapters)):
        return GenerationError(ErrorKind.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, ShuttingDown):
        return GenerationError(ErrorKind.UNAVAILABLE, str(error))
    if isinstance(error, EngineStepError):
        return GenerationError(ErrorKind.INTERNAL, str(error))
    return GenerationError(ErrorKind.INTERNAL, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class ServiceConfig:
    """What every transport of one server shares."""

    adapter_root: Path | None = None  # registration paths must resolve inside it
    default_max_new_tokens: int = 128  # when a request does not say
    max_new_tokens_limit: int = 4096  # the most one request may ask for

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("need 1 <= default_max_new_tokens <= max_new_tokens_limit")


@dataclass(frozen=True)
class Piece:
    """New output of a generation: text and token ids since the last piece; the last piece
    also carries the result."""

    text: str
    token_ids: tuple[int, ...]
    result: GenerationResult | None = None
    logprobs: tuple = ()  # TokenLogprob per token of token_ids, when the request asked for them
    prompt_logprobs: tuple = ()  # a choice's first piece: GenerationResult.prompt_logprobs, when asked for
    index: int = 0  # the choice it belongs to (n > 1)
    choice_result: GenerationResult | None = None  # that choice ended (with n = 1: `result`)


class Generation:
    """One submitted request: iterate it (sync, or `async for` when opened with
    `asynchronous=True`) for its pieces, up to the one with the result; a failure is
    raised as GenerationError. When the iteration stops, the sequence
    is freed if it still runs, a generation that never finished is counted as
    cancelled, and `on_close` runs, once."""

    def __init__(self, owner: GenerationLayer, handle: RequestHandle, on_close: Callable[[], None] | None):
        self._owner, self._handle, self._on_close = owner, handle, on_close
        self._counted = self._closed = False

    def cancel(self) -> None:
        """Ask the engine to stop it (a client went away); safe from any thread. The
        iteration then ends with a cancelled result."""
        self._handle.cancel()

    def _accept(self, output) -> Piece | None:
        if output.error is not None:
            self._counted = True
            raise self._owner.count_failure(output.error, self._handle.request)
        if output.finished is not None:
            self._counted = True
            self._owner.count_result(output.finished, self._handle.request)
        if output.finished is not None or output.choice_finished is not None or output.new_text \
                or output.new_token_ids:
            return Piece(output.new_text, tuple(output.new_token_ids), output.finished, tuple(output.new_logprobs),
                         tuple(output.prompt_logprobs), output.index, output.choice_finished)
        return None

    def close(self) -> None:
        """End it without iterating it (a request of several prompts refused after this
        one was opened): freed, counted as cancelled, on_close run."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._handle.cancel()  # a no-op once finished
        if not self._counted:
            self._counted = True
            self._owner.count_status("cancelled", self._handle.request)
        if self._on_close is not None:
            self._on_close()

    def __iter__(self) -> Iterator[Piece]:
        try:
            for output in self._handle.outputs():
                piece = self._accept(output)
                if piece is not None:
                    yield piece
        finally:
            self._close()

    async def __aiter__(self) -> AsyncIterator[Piece]:
        try:
            async for output in self._handle.outputs():
                piece = self._accept(output)
                if piece is not None:
                    yield piece
        finally:
            self._close()

    def result(self) -> GenerationResult:
        """Run to the end; the result (raises GenerationError on failure)."""
        pieces = iter(self)
        try:
            for piece in pieces:
                if piece.result is not None:
                    return piece.result
        finally:
            pieces.close()
        raise GenerationError(ErrorKind.INTERNAL, "the generation ended without a result")

    async def result_async(self) -> GenerationResult:
        return await result_of(self)


async def result_of(pieces) -> GenerationResult:
    """Run an async-iterable generation (a Generation, or one on a serve-ray replica) to its
    end; its result (raises GenerationError on failure)."""
    iterator = pieces.__aiter__()
    try:
        async for piece in iterator:
            if piece.result is not None:
                return piece.result
    finally:
        await iterator.aclose()
    raise GenerationError(ErrorKind.INTERNAL, "the generation ended without a result")


class GenerationLayer:
    """The generation layer of one server process: build, submit, count."""

    def __init__(self, loop: EngineLoop, config: ServiceConfig, metrics: Metrics,
                 resolve: Callable[[tuple[str, ...]], None] | None = None):
        """resolve: registers unregistered adapter names on first use (AdapterAdmin.resolve),
        or None."""
        self.loop, self.config, self.metrics = loop, config, metrics
        self._resolve = resolve

    def resolve_adapters(self, request: Request) -> None:
        """Register, on first use, the request's adapters that are not registered yet (with
        --resolve-adapters), before `open`; it reads files, so an asyncio caller runs it in
        a thread."""
        if self._resolve is not None and request.adapter_weights:
            self._resolve(tuple(name for name, _ in request.adapter_weights))

    def compile_constraint(self, request: Request) -> None:
        """Compile the request's structured-output constraint into the engine's cache before
        `open` (RequestError, naming the field, when it is invalid), so the engine's
        add_request finds it there; it may take milliseconds, so an asyncio caller runs it
        in a thread."""
        if request.sampling.constraint is not None:
            self.loop.engine.structured.compile(request.sampling.constraint)

    def build_request(self, *, prompt: str | None = None, messages: tuple[dict, ...] | None = None,
                      prompt_token_ids: tuple[int, ...] | None = None, chat: bool = False, adapter: str | None = None,
                      mix: tuple[tuple[str, float], ...] = (), max_new_tokens: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                      stop: tuple[str, ...] = (), ignore_eos: bool = False, merge: dict | None = None,
                      **processing) -> Request:
        """The engine Request for these fields (its types check the values; RequestError
        names the first bad field); this layer adds the server's own limits. `processing`:
        SamplingParams' logits-processing, log-probability, constraint and choice fields
        (logit_bias, min_tokens, repetition_penalty, presence_penalty, frequency_penalty,
        min_p, stop_token_ids, logprobs, prompt_logprobs, constraint, n, best_of). merge: how
        the mix is combined, MergeSpec's fields (method, density, seed, rank); None: linear."""
        unknown = set(processing) - PROCESSING_FIELDS
        if unknown:
            raise TypeError(f"build_request() got unexpected fields {sorted(unknown)}")
        max_new = self.config.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new > self.config.max_new_tokens_limit:
            raise RequestError("max_new_tokens", f"{max_new} is over this server's limit of "
                                                 f"{self.config.max_new_tokens_limit}")
        sampling = SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop=tuple(stop), ignore_eos=ignore_eos, **processing)
        return Request(prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids, chat=chat,
                       adapter=adapter or None, mix=tuple(mix), sampling=sampling, merge=merge_spec(merge))

    def open(self, request: Request, *, stream: bool = True, asynchronous: bool = False,
             on_close: Callable[[], None] | None = None) -> Generation:
        """Submit to the engine loop. stream=False delivers only the result (one wake-up);
        asynchronous=True: iterate it with `async for` on the calling asyncio loop.
        A refusal (unknown adapter, queue full, shutting down, best_of streamed) is counted
        and raised as GenerationError; on_close then runs at once."""
        try:
            if stream and request.sampling.ranks_choices:
                raise RequestError("best_of", "cannot be streamed: the choices returned are known only "
                                              "once every sampled one has ended")
            handle = (self.loop.submit_async if asynchronous else self.loop.submit)(request, stream=stream)
        except Exception as error:
            if on_close is not None:
                on_close()
            raise self.count_failure(error, request) from None
        return Generation(self, handle, on_close)

    def count_failure(self, error: BaseException, request: Request | None = None) -> GenerationError:
        """The failure `error` is, counted in loraquilt_requests_total{status} (and per
        adapter when the request got as far as naming them)."""
        failure = classify(error)
        self.count_status(failure.kind.name.lower(), request)
        return failure

    def count_result(self, result: GenerationResult, request: Request | None = None) -> None:
        self.count_status("cancelled" if result.finish_reason == FINISH_CANCELLED else "ok", request)

    def count_status(self, status: str, request: Request | None) -> None:
        self.metrics.requests.labels(status=status).inc()
        if request is not None:
            self.metrics.count_adapter_request(request.adapter_weights, status)
