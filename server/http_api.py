"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), in the `serve` process beside gRPC,
on the same generation layer, engine and batches.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as
server-sent events), POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
runtime-adapter calls), GET /health. A client that disconnects cancels its request.
Every response is counted in `loraquilt_http_requests_total{route, code}`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from loraquilt.server.adapter_admin import AdapterAdmin
from loraquilt.server.auth import BearerCheck
from loraquilt.server.json_input import JsonInputError, load_json
from loraquilt.server.openai_batch import PromptBatch
from loraquilt.server.generation import ErrorKind, GenerationError, GenerationLayer, classify, result_of
from loraquilt.server.openai_protocol import (
    ResponseShape, body_param, error_body, model_card, parse_chat, parse_completion,
)

MAX_BODY_BYTES = 4 << 20
STARTED = int(time.time())  # the base model's `created`
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health")


@dataclass(frozen=True)
class HttpConfig:
    served_model_name: str  # the base model's id in `model` and /v1/models
    api_key: BearerCheck | None = None  # inference calls need `Authorization: Bearer <key>`
    admin: BearerCheck | None = None  # load/unload need the admin token


class HttpFailure(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def failure_of(error: GenerationError, chat: bool = False) -> HttpFailure:
    return HttpFailure(error.kind.http_status, error.message, body_param(error, chat), error.kind.name.lower())


def admin_failure(error: GenerationError) -> HttpFailure:
    """A load/unload failure, `param` in the body's names: the name when it is unknown or
    taken, the path when the folder is refused (outside the root, not a valid adapter)."""
    param = {"name": "lora_name", "path": "lora_path"}.get(error.param, error.param)
    if error.kind in (ErrorKind.NOT_FOUND, ErrorKind.ALREADY_EXISTS):
        param = "lora_name"
    elif param is None and error.kind in (ErrorKind.INVALID_ARGUMENT, ErrorKind.PERMISSION_DENIED):
        param = "lora_path"
    return HttpFailure(error.kind.http_status, error.message, param, error.kind.name.lower())


def _check_bearer(request: Request, check: BearerCheck | None) -> None:
    """The same decision as the gRPC interceptor's, from the Authorization header."""
    if check is None:
        return
    refusal = check.refusal([("authorization", value) for value in request.headers.getlist("authorization")])
    if refusal is not None:
        code, message = refusal
        raise HttpFailure(ErrorKind[code.name].http_status, message, code=code.name.lower())


async def _read_json(request: Request) -> dict:
    """The body as a JSON object; 413 past MAX_BODY_BYTES (read no further), 400 if not JSON."""
    too_large = HttpFailure(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", code="payload_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    try:
        body = load_json(b"".join(chunks))
    except JsonInputError as error:
        raise HttpFailure(400, f"request body is {error}", code="invalid_argument") from None
    if not isinstance(body, dict):
        raise HttpFailure(400, "request body must be a JSON object", code="invalid_argument")
    return body


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class CountResponses:
    """ASGI middleware: every response in loraquilt_http_requests_total{route, code}
    (route: a known path or "other", so the label set stays bounded)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}  # an exception before the response started

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counter.labels(route=route, code=str(status["code"])).inc()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class LocalBackend:
    """The HTTP API on this process's generation layer and adapter admin (`serve`);
    `serve-ray`'s ingress has its own backend with the same methods (scaleout/)."""

    def __init__(self, generation_layer: GenerationLayer, admin: AdapterAdmin):
        self.generation_layer, self.admin = generation_layer, admin
        self.adapter_root = admin.adapter_root

    async def max_model_len(self) -> int:
        return self.admin.engine.max_seq_len

    async def open(self, fields: dict, stream: bool):
        """A generation (async-iterable pieces, `cancel()`), or GenerationError."""
        request = None
        try:
            request = self.generation_layer.build_request(**fields)
            await asyncio.to_thread(self.generation_layer.resolve_adapters, request)  # off the event loop
            await asyncio.to_thread(self.generation_layer.compile_constraint, request)
        except Exception as error:
            raise self.generation_layer.count_failure(error, request) from None
        return self.generation_layer.open(request, stream=stream, asynchronous=True)

    async def adapters(self) -> list[tuple[str, int, Path]]:
        """(name, registration time, folder) of every registered adapter."""
        return [(record.name, record.created, record.path) for record in self.admin.records()]

    async def load(self, name: str, path: str) -> None:
        await asyncio.to_thread(self.admin.register, name, path)

    async def unload(self, name: str) -> None:
        await asyncio.to_thread(self.admin.unregister, name)


def build_app(backend, config: HttpConfig, http_requests=None, is_serving=lambda: True) -> FastAPI:
    """The API over `backend` (LocalBackend or serve-ray's); `http_requests` is the
    Counter every response is counted in (None: not counted)."""
    app = FastAPI(title="loraquilt", docs_url=None, redoc_url=None, openapi_url=None)
    if http_requests is not None:
        app.add_middleware(CountResponses, counter=http_requests)

    @app.exception_handler(HttpFailure)
    async def on_failure(_request: Request, failure: HttpFailure):
        return JSONResponse(error_body(failure.status, failure.message, failure.param, failure.code),
                            status_code=failure.status)

    @app.exception_handler(404)
    async def on_unknown_route(request: Request, _error):
        return JSONResponse(error_body(404, f"no route {request.method} {request.url.path}"), status_code=404)

    @app.exception_handler(405)
    async def on_wrong_method(request: Request, _error):
        return JSONResponse(error_body(405, f"{request.method} is not allowed on {request.url.path}"),
                            status_code=405)

    @app.get("/health")
    async def health():
        if is_serving():
            return PlainTextResponse("ok")
        return PlainTextResponse("draining", status_code=503)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_bearer(request, config.api_key)
        base = config.served_model_name
        root = backend.adapter_root.resolve() if backend.adapter_root is not None else None
        length = await backend.max_model_len()
        cards = [model_card(base, STARTED, parent=None, root=base, max_model_len=length)]
        for name, created, path in await backend.adapters():
            path = Path(path)
            shown = str(path.relative_to(root)) if root is not None and root in path.parents else str(path)
            cards.append(model_card(name, created, parent=base, root=shown, max_model_len=length))
        return {"object": "list", "data": cards}

    async def generate(request: Request, chat: bool):
        _check_bearer(request, config.api_key)
        body = await _read_json(request)
        try:
            parsed = (parse_chat if chat else parse_completion)(body, config.served_model_name)
            generation = await _open(backend, parsed)
        except GenerationError as error:
            raise failure_of(error, chat) from None
        shape = ResponseShape(chat, parsed.model, logprobs=parsed.fields.get("logprobs") is not None,
                              prompts=parsed.prompt_returns, choices_per_prompt=parsed.fields.get("n") or 1)
        if parsed.stream:
            return StreamingResponse(_events(generation, shape, parsed.include_usage, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(_until_disconnect(request))
        work = asyncio.ensure_future(result_of(generation))
        try:
            await asyncio.wait({watcher, work}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: free the sequence now
                generation.cancel()
            result = await work
        except GenerationError as error:
            raise failure_of(error, chat) from None
        finally:
            watcher.cancel()
        return shape.whole(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        _check_bearer(request, config.admin)
        body = await _read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        for param, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str):
                raise HttpFailure(400, f"{param} must be a string", param, "invalid_argument")
        try:
            await backend.load(name, path)
        except Exception as error:
            raise admin_failure(classify(error)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        _check_bearer(request, config.admin)
        body = await _read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise HttpFailure(400, "lora_name must be a string", "lora_name", "invalid_argument")
        try:
            await backend.unload(name)
        except Exception as error:
            raise admin_failure(classify(error)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


async def _open(backend, parsed):
    """The generation of a parsed body: one, or for completions with several prompts one
    per prompt as a PromptBatch (a prompt refused stops those opened before it)."""
    if len(parsed.prompts) <= 1:
        return await backend.open(parsed.fields, parsed.stream)
    generations = []
    try:
        for prompt in parsed.prompts:
            generations.append(await backend.open(parsed.fields_of(prompt), parsed.stream))
    except BaseException:
        for generation in generations:
            getattr(generation, "close", generation.cancel)()  # serve-ray's only cancel
        raise
    return PromptBatch(generations, parsed.fields.get("n") or 1)


async def _events(generation, shape: ResponseShape, include_usage: bool, chat: bool):
    """The event stream of one generation: chunks of each choice (`index`), a choice's
    finish chunk when it ends, the usage after the last; a failure after the start is an
    error event. Cancelled with the response when the client disconnects: the iteration's
    end frees the sequences."""
    started, ended = set(), set()
    try:
        async for piece in generation:
            index = piece.index
            if piece.text or index not in started or piece.logprobs:  # a token held back from the text still has its logprob
                yield _sse(shape.chunk(piece.text, first=index not in started, logprobs=piece.logprobs,
                                       prompt_logprobs=piece.prompt_logprobs, index=index))
                started.add(index)
            if piece.choice_result is not None:
                yield _sse(shape.chunk("", piece.choice_result, index=index))
                ended.add(index)
            if piece.result is not None:
                for choice in piece.result.all_choices:  # those a cancel ended
                    if choice.index not in ended:
                        yield _sse(shape.chunk("", choice, index=choice.index))
                if include_usage:
                    yield _sse(shape.usage_chunk(piece.result))
    except GenerationError as error:
        failure = failure_of(error, chat)
        yield _sse(error_body(failure.status, failure.message, failure.param, failure.code))
    yield b"data: [DONE]\n\n"


class HttpServer:
    """uvicorn on its own thread and asyncio loop; `port` is the bound one."""

    def __init__(self, app: FastAPI, host: str, port: int, tls=None):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as error:
            self._socket.close()
            raise OSError(f"cannot listen on {host}:{port} for the HTTP API: {error.strerror}") from None
        self.port = self._socket.getsockname()[1]
        options = {} if tls is None else {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                     timeout_graceful_shutdown=1, **options))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="loraquilt-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server did not start on {host}:{port}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._socket.close()

