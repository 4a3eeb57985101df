"""`loraquilt serve`: the engine, its loop thread, the gRPC server (with health and
reflection), the OpenAI-compatible HTTP API and the Prometheus endpoint, started together
on one generation layer and stopped gracefully."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraquilt.server.adapters.registry import RegistryEvents
from loraquilt.server.adapters.state_file import RegistrationState, StateFileError
from loraquilt.server.auth import AuthConfigError, AuthInterceptor, BearerCheck, TLSFiles, read_token_file
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.engine_args import add_engine_arguments, add_threads_argument, engine_config_from_args
from loraquilt.server.frontend import ServerStartError, StartSequence, build_frontend
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.grpc_decode import MalformedRequestInterceptor
from loraquilt.server.metrics import Metrics
from loraquilt.server.openai_protocol import model_id
from loraquilt.server.service import LoraQuiltService
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraQuilt"].full_name
MAX_MESSAGE_BYTES = 4 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    metrics_port: int | None = 9464  # None = no metrics endpoint; 0 = any free port
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None = off; 0 = any free port
    served_model_name: str | None = None  # the base model's id over HTTP; None = the model's name
    grace_seconds: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    preload: tuple[tuple[str, str], ...] = ()  # (name, path) registered at start
    state_dir: Path | None = None  # registrations recorded here survive restarts; None = in memory only
    resolve_adapters: bool = False  # an unregistered name N with a valid <adapter root>/N registers on first use
    metrics_adapter_labels: int = 100  # adapters with series of their own; later ones count as "_other"
    service: ServiceConfig = field(default_factory=ServiceConfig)
    admin_token: str | None = field(default=None, repr=False)  # None: admin RPCs open to every caller
    api_key: str | None = field(default=None, repr=False)  # None: inference open to every caller
    tls: TLSFiles | None = None  # None: plaintext gRPC


class RunningServer:
    """A started server; `port` / `http_port` / `metrics_port` are the bound ones."""

    def __init__(self, engine: Engine, config: ServerConfig, *, loop_thread: bool = True):
        """loop_thread=False: the caller runs `self.loop.run_here()` itself. A part that
        cannot start (a port in use, TLS files that do not load, a state file or a preload
        it cannot use) raises ServerStartError in one line, after stopping every part
        started before it."""
        self.engine, self.config = engine, config
        self.metrics = Metrics(adapter_labels=config.metrics_adapter_labels)
        engine.adapters.events = RegistryEvents(on_load=self.metrics.on_adapter_load,
                                                on_evict=self.metrics.on_adapter_evict,
                                                on_derive=self.metrics.on_derive)
        self.metrics.watch(engine)
        self.served_model_name = config.served_model_name or model_id(engine.model_name)
        self.http = self.http_port = self.metrics_port = self._metrics_server = None
        self._serving = True
        self._stopped = threading.Event()
        start = StartSequence()
        state = RegistrationState(config.state_dir) if config.state_dir is not None else None
        recorded = start.step("state dir", lambda: state.load() if state is not None else [])
        frontend = build_frontend(engine, self.metrics, config.service, state=state,
                                  resolve_adapters=config.resolve_adapters,
                                  reserved_names=(self.served_model_name,), loop_thread=loop_thread)
        self.loop, self.generation_layer, self.admin = frontend.loop, frontend.generation_layer, frontend.admin
        start.started("engine loop", self.loop.stop)
        start.step("adapters", lambda: self._register_at_start(recorded, state))
        self.grpc = start.step("gRPC", lambda: self._start_grpc())
        start.started("gRPC", lambda: self.grpc.stop(0))
        if config.http_port is not None:
            self.http = start.step("HTTP API", lambda: self._start_http())
            self.http_port = self.http.port
            start.started("HTTP API", self.http.stop)
        if config.metrics_port is not None:
            self._metrics_server = start.step("metrics", self._start_metrics)
            self.metrics_port = self._metrics_server.server_port
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _register_at_start(self, recorded: list, state: RegistrationState | None) -> None:
        """The recorded registrations (--state-dir), then --preload (a recorded name wins)."""
        skipped = self.admin.restore(recorded, log=lambda line: print(line, file=sys.stderr, flush=True))
        self.metrics.adapter_restore_failures.inc(len(skipped))
        if recorded:
            print(f"restored {len(recorded) - len(skipped)} of {len(recorded)} recorded adapters from "
                  f"{state.path}", file=sys.stderr, flush=True)
        registered = {record.name for record in self.engine.adapters.records()}
        for name, path in self.config.preload:
            if name == self.served_model_name:
                raise ServerStartError(f"--preload {name}=...: {name!r} is the served base model's id "
                                       "(--served-model-name); give the adapter another name")
            if name not in registered:
                try:
                    self.engine.register_adapter(name, path)
                except Exception as error:  # noqa: BLE001 - the folder's problem, in one line
                    raise ServerStartError(f"--preload {name}={path}: {error}") from None

    def _start_grpc(self) -> grpc.Server:
        config = self.config
        capacity = self.engine.config.max_batch_size + self.engine.scheduler.config.max_waiting
        admin = BearerCheck.for_token(config.admin_token) if config.admin_token is not None else None
        api = BearerCheck.for_token(config.api_key, "api") if config.api_key is not None else None
        self._checks = admin, api
        # credentials first (an unauthenticated caller learns nothing of its bytes), then decoding
        interceptors = [AuthInterceptor(SERVICE_NAME, admin, api)] if admin or api else []
        interceptors.append(MalformedRequestInterceptor())
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=capacity + 8, thread_name_prefix="loraquilt-rpc"),
            maximum_concurrent_rpcs=capacity + 8, interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        pb_grpc.add_LoraQuiltServicer_to_server(LoraQuiltService(self.generation_layer, self.admin), server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls is not None:
                self.port = server.add_secure_port(address, config.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises when it cannot bind
            self.port = 0
        if self.port == 0:
            server.stop(0)
            raise OSError(f"cannot listen on {address}")
        server.start()
        return server

    def _start_metrics(self):
        host, port = self.config.host, self.config.metrics_port
        try:
            server, _ = self.metrics.serve(port, host)
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} for /metrics: {error.strerror or error}") from None
        return server

    def _start_http(self):
        from loraquilt.server.http_api import HttpConfig, HttpServer, LocalBackend, build_app

        admin, api = self._checks
        http_config = HttpConfig(served_model_name=self.served_model_name, api_key=api, admin=admin)
        app = build_app(LocalBackend(self.generation_layer, self.admin), http_config, self.metrics.http_requests,
                        lambda: self._serving)
        return HttpServer(app, self.config.host, self.config.http_port, self.config.tls)

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def shutdown(self, grace: float | None = None) -> bool:
        """Stop accepting (new calls get UNAVAILABLE), let in-flight requests finish
        within the grace period, then stop. Returns True if nothing was cut off."""
        if self._stopped.is_set():
            return True
        grace = self.config.grace_seconds if grace is None else grace
        self.loop.stop_accepting()  # before health says so: a caller who saw NOT_SERVING is refused
        self._serving = False  # GET /health: 503
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        drained = self.loop.drain(grace)
        self.grpc.stop(grace=1.0).wait()
        if self.http is not None:
            self.http.stop()
        self.loop.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._stopped.set()
        return drained

    def wait(self, timeout: float | None = None) -> bool:
        """Block until shut down (or the timeout); True once stopped."""
        return self._stopped.wait(timeout)


def start_server(engine_config: EngineConfig, config: ServerConfig, *, loop_thread: bool = True) -> RunningServer:
    return RunningServer(Engine(engine_config), config, loop_thread=loop_thread)


# -- CLI ------------------------------------------------------------------------------------

def add_serve_parser(commands, name: str = "serve", help_text: str = "start the gRPC server") -> None:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--adapter-root", type=Path, help="RegisterAdapter paths must lie under this folder")
    parser.add_argument("--preload", metavar="NAME=PATH", nargs="+", action="extend", default=[],
                        help="adapters registered at start")
    parser.add_argument("--state-dir", type=Path,
                        help="record every registration here and register them again at start")
    parser.add_argument("--resolve-adapters", action="store_true",
                        help="a request for an unregistered adapter N registers <adapter-root>/N on first use")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="OpenAI-compatible HTTP API port (-1 disables it, 0 picks a free port)")
    parser.add_argument("--served-model-name", help="the base model's id in the HTTP API (default: its name)")
    parser.add_argument("--metrics-port", type=int, default=9464, help="-1 disables the endpoint")
    parser.add_argument("--metrics-adapter-labels", type=int, default=100,
                        help="adapters (the first seen) with per-adapter series; the rest count as adapter=\"_other\"")
    parser.add_argument("--default-max-new-tokens", type=int, default=128)
    add_engine_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("--grace-seconds", type=float, default=30.0)
    security = parser.add_argument_group("security")
    security.add_argument("--admin-token-file", type=Path,
                          help="Register/UnregisterAdapter then need 'authorization: Bearer <token>' metadata")
    security.add_argument("--api-key-file", type=Path,
                          help="Generate, GenerateStream, ListAdapters and the HTTP API then need "
                               "'authorization: Bearer <key>'")
    security.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC and HTTP over TLS")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.set_defaults(run=_serve)


def parse_preload(entries: list[str]) -> list[tuple[str, str]]:
    """--preload NAME=PATH entries as (name, path) pairs; SystemExit names a malformed one."""
    preload = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--preload entries look like NAME=PATH, got {entry!r}")
        preload.append((name, path))
    return preload


def _serve(args: argparse.Namespace) -> int:
    preload = parse_preload(args.preload)
    engine_config = engine_config_from_args(args)
    if args.state_dir is not None:
        try:
            RegistrationState(args.state_dir).load()  # a corrupt state file stops the start before the model loads
        except StateFileError as error:
            raise SystemExit(str(error)) from None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    try:
        admin_token = read_token_file(args.admin_token_file) if args.admin_token_file else None
        api_key = read_token_file(args.api_key_file, "API key") if args.api_key_file else None
    except AuthConfigError as error:
        raise SystemExit(str(error)) from None
    tls = TLSFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        if tls is not None:
            tls.server_credentials()  # unreadable or non-PEM files fail now, before the model loads
    except AuthConfigError as error:
        raise SystemExit(str(error)) from None
    if admin_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --admin-token-file: anyone who reaches "
              "the port can register and unregister adapters", file=sys.stderr, flush=True)
    config = ServerConfig(
        host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        http_port=None if args.http_port < 0 else args.http_port, served_model_name=args.served_model_name,
        grace_seconds=args.grace_seconds, preload=tuple(preload), state_dir=args.state_dir,
        resolve_adapters=args.resolve_adapters, metrics_adapter_labels=args.metrics_adapter_labels,
        admin_token=admin_token, api_key=api_key,
        tls=tls,
        service=ServiceConfig(adapter_root=args.adapter_root,
                              default_max_new_tokens=args.default_max_new_tokens),
    )
    try:
        server = start_server(engine_config, config, loop_thread=False)
    except (OSError, ServerStartError) as error:  # a port in use, an address that is not ours
        raise SystemExit(f"loraquilt serve: {error}") from None
    scheme = "https" if tls is not None else "http"
    http = f", OpenAI API {scheme}://{args.host}:{server.http_port}/v1" if server.http_port else ""
    metrics = f", metrics http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"loraquilt serving {server.engine.model_name} on {server.target} (gRPC){http}{metrics}",
          file=sys.stderr, flush=True)

    def on_signal(signum, _frame):
        print(f"signal {signal.Signals(signum).name}: finishing in-flight requests "
              f"(grace {config.grace_seconds:.0f}s)", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.loop.run_here()  # the engine steps on the main thread until shutdown stops the loop
    while not server.wait(0.5):
        pass
    print("loraquilt stopped", file=sys.stderr, flush=True)
    return 0
