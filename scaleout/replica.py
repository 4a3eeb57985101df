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

import grpc
import ray
from prometheus_client import Counter
from ray import serve

from loraquilt.client.routing import key_members, routing_key
from loraquilt.scaleout.config import ReplicaConfig
from loraquilt.scaleout.directory import Registration
from loraquilt.scaleout.resident import ResidentAdapters, ResidentKey
from loraquilt.server.adapters.registry import UnknownAdapter
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.engine_loop import EngineLoop
from loraquilt.server.metrics import Metrics
from loraquilt.server.model.weights import DeviceConfig
from loraquilt.server.service import (
    LoraQuiltService, ServiceConfig, ServiceError, adapter_info, check_adapter_name, status_for,
)
from loraquilt.v1 import loraquilt_pb2 as pb

logger = logging.getLogger("ray.serve")
SERVE_NAMESPACE = "serve"  # where Ray Serve names its replica actors (ray.get_actor(name, namespace))


@dataclass(frozen=True)
class Reply:
    """What the replica answers the ingress: a message, or a status (code name + details)."""

    message: object = None  # a loraquilt.v1 protobuf message
    code: str = "OK"  # grpc.StatusCode name
    details: str = ""

    @classmethod
    def failure(cls, status: ServiceError) -> Reply:
        return cls(code=status.code.name, details=status.message)


class LoraQuiltReplica:
    def __init__(self, config: ReplicaConfig, directory):
        import torch

        torch.set_num_threads(config.threads)
        self.config, self.directory = config, directory
        self.engine = Engine(EngineConfig(
            model=config.model, device=DeviceConfig(config.device, config.dtype),
            max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len, max_waiting=config.max_queue,
            max_active_adapters=config.max_active_adapters, max_cpu_adapters=config.max_cpu_adapters,
            max_lora_rank=config.max_lora_rank, lora_backend=config.lora_backend, progress=False,
        ))
        self.metrics = Metrics()
        self.metrics.watch(self.engine)
        registry = self.metrics.registry
        self.routing = Counter("loraquilt_routing", "Adapter requests by whether their routing key was "
                               "resident on this replica when they arrived", ["result"], registry=registry)
        self.key_loads = Counter("loraquilt_routing_key_loads", "Routing keys made resident on this replica",
                                 registry=registry)
        self.loop = EngineLoop(self.engine, self.metrics).start()
        limit = min(ServiceConfig().max_new_tokens_limit, self.engine.max_seq_len - 1)  # as `serve` clamps it
        self.service = LoraQuiltService(self.loop, ServiceConfig(
            adapter_root=config.adapter_root, max_new_tokens_limit=limit,
            default_max_new_tokens=min(config.default_max_new_tokens, limit)), self.metrics)
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
            handle, names = await self._submit(request, stream=False)
        except Exception as error:
            return Reply.failure(self.service.count_failure(error))
        try:
            async for output in handle.outputs():
                if output.error is not None:
                    return Reply.failure(self.service.count_failure(output.error))
                if output.finished is not None:
                    return Reply(self.service.response_for(output.finished))
        finally:
            handle.cancel()  # no-op once finished; frees the sequence when the call was cancelled
            self.adapters.release(names)
        raise AssertionError("unreachable")

    async def generate_stream(self, request: pb.GenerateRequest):
        """Yields Replies: pieces of text, the last one with the counts (or a failure)."""
        try:
            handle, names = await self._submit(request, stream=True)
        except Exception as error:
            yield Reply.failure(self.service.count_failure(error))
            return
        counted = False
        try:
            async for output in handle.outputs():
                if output.error is not None:
                    counted = True
                    yield Reply.failure(self.service.count_failure(output.error))
                    return
                if output.finished is not None:
                    counted = True
                    response = self.service.response_for(output.finished)
                    response.text, response.token_ids[:] = output.new_text, list(output.new_token_ids)
                    yield Reply(response)
                    return
                if output.new_text or output.new_token_ids:
                    yield Reply(pb.GenerateResponse(text=output.new_text, token_ids=list(output.new_token_ids)))
        finally:
            handle.cancel()
            self.adapters.release(names)
            if not counted:
                self.metrics.requests.labels(status="cancelled").inc()

    async def _submit(self, request: pb.GenerateRequest, stream: bool):
        """Validate, make the request's adapters resident and held, queue it in the engine."""
        await self._report_once()
        engine_request = self.service.to_engine_request(request)  # bad fields first, as the single server
        key = routing_key(request)
        names = key_members(key)
        if not names:
            return self.loop.submit_async(engine_request, stream=stream), ()
        registrations = await self._registrations(names)
        resident_id = serve.get_multiplexed_model_id() or key  # the ingress may route a copy, "key#1"
        self.routing.labels(result="hit" if resident_id in self._resident_keys else "miss").inc()
        await self._resident(resident_id)
        await self.adapters.acquire(registrations)  # a hold for this request (and fresh files if re-registered)
        try:
            return self.loop.submit_async(engine_request, stream=stream), names
        except BaseException:
            self.adapters.release(names)
            raise

    async def _registrations(self, names: tuple[str, ...]) -> dict[str, Registration]:
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
            path = self.service.resolve_adapter_path(request.path)
            record = await asyncio.to_thread(self.engine.adapters.inspect, request.name, path)
            outcome = await self.directory.add.remote(
                request.name, str(path), record.fingerprint, record.rank, tuple(record.target_modules),
                record.size_bytes)
            if outcome == "exists":
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"adapter {request.name!r} is already registered")
            if outcome == "full":
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the adapter directory is full; "
                                                                       "unregister one first")
        except Exception as error:
            return Reply.failure(status_for(error))
        return Reply(pb.AdapterInfo(name=record.name, rank=record.rank, target_modules=list(record.target_modules),
                                    size_bytes=record.size_bytes, tier="disk"))

    async def unregister(self, request: pb.UnregisterAdapterRequest) -> Reply:
        try:
            check_adapter_name(request.name)
            if not await self.directory.remove.remote(request.name):
                raise UnknownAdapter(request.name)
        except Exception as error:
            return Reply.failure(status_for(error))
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
