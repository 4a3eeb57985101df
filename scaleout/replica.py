"""One engine replica of `loraquilt serve-ray`: a whole loraquilt engine (its own NF4
base, adapter slots, KV cache, batching loop and Prometheus metrics), called by the
ingress (scaleout/ingress.py) through a Ray Serve handle.

Per generation: routing key -> the directory says which files each adapter is -> Ray
Serve's multiplexer makes the key resident here (first use reads the files; beyond
--max-adapters-per-replica keys its LRU evicts one) -> the request holds its adapters ->
the engine loop batches it with everything else on this replica -> a Reply. Failures are
Replies with the single server's status (server/service.py), not exceptions: an
exception reaching the ingress means the replica itself failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import ray
from prometheus_client import Counter
from ray import serve

from loraquilt.client.routing import key_for, key_members
from loraquilt.scaleout.config import ReplicaConfig
from loraquilt.scaleout.directory import Registration
from loraquilt.scaleout.resident import ResidentAdapters, ResidentKey
from loraquilt.server.adapters.registry import UnknownAdapter
from loraquilt.server.engine import Engine
from loraquilt.server.frontend import build_frontend
from loraquilt.server.generation import ErrorKind, GenerationError, ServiceConfig, classify
from loraquilt.server.metrics import Metrics
from loraquilt.server.proto_mapping import adapter_info, final_response, grpc_fields, piece_response
from loraquilt.server.request import check_adapter_name
from loraquilt.v1 import loraquilt_pb2 as pb

logger = logging.getLogger("ray.serve")
SERVE_NAMESPACE = "serve"  # where Ray Serve names its replica actors (ray.get_actor(name, namespace))


@dataclass(frozen=True)
class Reply:
    """What the replica answers the ingress: a message, or a status (code name + details)."""

    message: object = None  # a loraquilt.v1 protobuf message (a generation.Piece for the HTTP API)
    code: str = "OK"  # grpc.StatusCode name = ErrorKind name
    details: str = ""
    param: str | None = None  # the request field a failure concerns

    @classmethod
    def failure(cls, error: GenerationError) -> Reply:
        return cls(code=error.kind.name, details=error.message, param=error.param)


class LoraQuiltReplica:
    def __init__(self, config: ReplicaConfig, directory):
        import torch

        torch.set_num_threads(config.threads)
        self.config, self.directory = config, directory
        self.engine = Engine(config.engine_config())
        self.metrics = Metrics()
        self.metrics.watch(self.engine)
        registry = self.metrics.registry
        self.routing = Counter("loraquilt_routing", "Adapter requests by whether their routing key was "
                               "resident on this replica when they arrived", ["result"], registry=registry)
        self.key_loads = Counter("loraquilt_routing_key_loads", "Routing keys made resident on this replica",
                                 registry=registry)
        frontend = build_frontend(self.engine, self.metrics, ServiceConfig(
            adapter_root=config.adapter_root, default_max_new_tokens=config.default_max_new_tokens))
        self.loop, self.generation_layer, self.admin = frontend.loop, frontend.generation_layer, frontend.admin
        self.adapters = ResidentAdapters(self.engine)
        self._resident_keys: set[str] = set()

        async def load_key(key: str) -> ResidentKey:
            return await self._load_key(key)

        self._resident = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(load_key)
        self._metrics_server, _ = self.metrics.serve(config.metrics_port, config.metrics_host)
        runtime = ray.get_runtime_context()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.report = {
            "replica": self.replica_id,
            "actor": runtime.get_actor_name(), "namespace": SERVE_NAMESPACE,
            "pid": os.getpid(),
            "metrics": f"http://{config.metrics_host}:{self._metrics_server.server_port}/metrics",
        }
        self._reported = False

    # -- generation -----------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest) -> Reply:
        try:
            generation = await self._open(grpc_fields(request), stream=False)
            return Reply(final_response(await generation.result_async()))
        except GenerationError as error:
            return Reply.failure(error)

    async def generate_stream(self, request: pb.GenerateRequest):
        """Yields Replies: pieces of text, the last one with the counts (or a failure)."""
        async for reply in self.generate_fields(grpc_fields(request), stream=True):
            yield reply if reply.code != "OK" else Reply(piece_response(reply.message))

    async def generate_fields(self, fields: dict, stream: bool):
        """The generation layer's fields (`GenerationLayer.build_request`) in, Replies of
        generation.Piece out (stream=False: only the last); the HTTP API's path."""
        try:
            generation = await self._open(fields, stream=stream)
            async for piece in generation:
                yield Reply(piece)
        except GenerationError as error:
            yield Reply.failure(error)

    async def _open(self, fields: dict, stream: bool):
        """Validate, make the request's adapters resident and held, queue it in the engine
        (the hold is released when the generation ends)."""
        await self._report_once()
        engine_request = None
        try:
            engine_request = self.generation_layer.build_request(**fields)  # bad fields first, as `serve`
            await asyncio.to_thread(self.generation_layer.compile_constraint, engine_request)
            key = key_for(engine_request.adapter, (name for name, _ in engine_request.mix))
            names = key_members(key)
            if names:
                registrations = await self._registrations(names)
                resident_id = serve.get_multiplexed_model_id() or key  # the ingress may route a copy, "key#1"
                self.routing.labels(result="hit" if resident_id in self._resident_keys else "miss").inc()
                await self._resident(resident_id)
                await self.adapters.acquire(registrations)  # a hold for this request (fresh files if re-registered)
        except Exception as error:
            raise self.generation_layer.count_failure(error, engine_request) from None
        return self.generation_layer.open(engine_request, stream=stream, asynchronous=True,
                                     on_close=(lambda: self.adapters.release(names)) if names else None)

    async def _registrations(self, names: tuple[str, ...]) -> dict[str, Registration]:
        found = await self.directory.lookup.remote(list(names))
        missing = [name for name in names if found.get(name) is None]
        if missing and self.config.resolve_adapters:  # register <adapter root>/<name> on first use
            for name in missing:
                if not (self.admin.resolve_path(name)).is_dir():  # PERMISSION_DENIED outside the root
                    raise UnknownAdapter(name)
                reply = await self.register(pb.RegisterAdapterRequest(name=name, path=name))
                if reply.code not in ("OK", "ALREADY_EXISTS"):  # ALREADY_EXISTS: a concurrent first use
                    raise GenerationError(ErrorKind[reply.code], reply.details)
            found = await self.directory.lookup.remote(list(names))
        for name in names:
            if found.get(name) is None:
                raise UnknownAdapter(name)
        return {name: found[name] for name in names}

    async def _load_key(self, key: str) -> ResidentKey:
        """Ray Serve's multiplexer calls this on a key's first use on this replica."""
        names = key_members(key)
        await self.adapters.acquire(await self._registrations(names))
        self.key_loads.inc()
        self._resident_keys.add(key)
        return ResidentKey(self.adapters, key, names, on_release=self._resident_keys.discard)

    # -- adapters -------------------------------------------------------------------------

    async def register(self, request: pb.RegisterAdapterRequest) -> Reply:
        """Validated here, once, against the base model; loaded by replicas on first use."""
        try:
            check_adapter_name(request.name)
            path = self.admin.resolve_path(request.path)
            record = await asyncio.to_thread(self.engine.adapters.inspect, request.name, path)
            outcome = await self.directory.add.remote(
                request.name, str(path), record.fingerprint, record.rank, tuple(record.target_modules),
                record.size_bytes)
            if outcome == "exists":
                raise GenerationError(ErrorKind.ALREADY_EXISTS, f"adapter {request.name!r} is already registered")
            if outcome == "full":
                raise GenerationError(ErrorKind.RESOURCE_EXHAUSTED, "the adapter directory is full; "
                                                                    "unregister one first")
        except Exception as error:
            return Reply.failure(classify(error))
        return Reply(pb.AdapterInfo(name=record.name, rank=record.rank, target_modules=list(record.target_modules),
                                    size_bytes=record.size_bytes, tier="disk", kind=record.kind))

    async def unregister(self, request: pb.UnregisterAdapterRequest) -> Reply:
        try:
            check_adapter_name(request.name)
            if not await self.directory.remove.remote(request.name):
                raise UnknownAdapter(request.name)
        except Exception as error:
            return Reply.failure(classify(error))
        return Reply(pb.UnregisterAdapterResponse())

    async def list_adapters(self, request: pb.ListAdaptersRequest) -> Reply:
        """Every registered adapter; the tier is this replica's (disk: not loaded here)."""
        local = {record.name: record for record in self.engine.adapters.records()}
        here = self.adapters.registered()
        infos = []
        for entry in await self.directory.entries.remote():
            record = local.get(entry.name) if here.get(entry.name) == entry.generation else None
            infos.append(adapter_info(record) if record is not None else pb.AdapterInfo(
                name=entry.name, rank=entry.rank, target_modules=list(entry.target_modules),
                size_bytes=entry.size_bytes, tier="disk"))
        return Reply(pb.ListAdaptersResponse(adapters=infos))

    # -- for serve-ray, the bench and tests ------------------------------------------------

    async def max_model_len(self) -> int:
        return self.engine.max_seq_len

    async def _report_once(self) -> None:
        if not self._reported:
            self._reported = True
            await self.directory.report.remote(self.replica_id, {**self.report, "checked": time.time()})

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose engine loop died is replaced.
        Also (re)publishes this replica's report (the directory may have restarted)."""
        if not self.loop.alive():
            raise RuntimeError("the engine loop thread has stopped")
        try:
            await self.directory.report.remote(self.replica_id, {**self.report, "checked": time.time()})
        except Exception as error:  # the directory restarting is no reason to replace this replica
            logger.warning("could not report to the adapter directory: %s", error)

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            server.shutdown()
