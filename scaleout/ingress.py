"""The ingress of `loraquilt serve-ray`: the methods of `loraquilt.v1.LoraQuilt` that Ray
Serve's gRPC proxy calls by name, each forwarded to an engine replica.

Generation calls go to a replica chosen by Ray Serve's multiplexed routing on the
request's routing key (client/routing.py), derived here from the request itself: the
key the replica makes resident, whether or not the caller sent it as metadata, so every
call gets adapter affinity. Admin calls are checked here (--admin-token-file) and go to
any replica.

A replica that dies (crash, OOM, `ray.kill`) takes its running requests with it; Ray
reports that to this hop as an actor error, and the caller gets UNAVAILABLE, which
loraquilt's clients retry (Ray Serve routes the retry to a live replica and restarts the
dead one). Through the proxy alone the caller would get INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.grpc_util import RayServegRPCContext

from loraquilt.client.routing import routing_key
from loraquilt.scaleout.hot_keys import HotKeys
from loraquilt.scaleout.replica import Reply
from loraquilt.server.auth import BearerCheck
from loraquilt.v1 import loraquilt_pb2 as pb

# the replica (or the way to it) is gone; RayActorError covers ActorDiedError
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


@dataclass(frozen=True)
class IngressConfig:
    admin: BearerCheck | None = None  # Register/Unregister need its token
    api_key: BearerCheck | None = None  # Generate, GenerateStream, ListAdapters need this key
    affinity: bool = True  # False: replicas chosen without the routing key (for comparisons)
    replicas: int = 1  # engine replicas
    spread_hot_keys: bool = True  # a hot key resident on several replicas (HotKeys)


class LoraQuiltIngress:
    def __init__(self, replicas, config: IngressConfig):
        self.replicas, self.config = replicas, config  # replicas: a DeploymentHandle
        self.hot_keys = HotKeys(config.replicas) if config.spread_hot_keys else None

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        if _refused(grpc_context, self.config.api_key):
            return pb.GenerateResponse()
        try:
            reply = await self._to_replica(request).generate.remote(request)
        except BackPressureError as error:
            return _busy(grpc_context, error, pb.GenerateResponse())
        except REPLICA_LOST as error:
            return _unavailable(grpc_context, error, pb.GenerateResponse())
        return _deliver(grpc_context, reply, pb.GenerateResponse())

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext):
        if _refused(grpc_context, self.config.api_key):
            return
        replica = self._to_replica(request).options(stream=True)
        try:
            async for reply in replica.generate_stream.remote(request):
                if reply.code != "OK":
                    _deliver(grpc_context, reply, None)
                    return
                yield reply.message
        except BackPressureError as error:
            _busy(grpc_context, error, None)
        except REPLICA_LOST as error:  # after a first message the caller cannot retry transparently
            _unavailable(grpc_context, error, None)

    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest,
                              grpc_context: RayServegRPCContext) -> pb.AdapterInfo:
        return await self._admin(grpc_context, "register", request, pb.AdapterInfo())

    async def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest,
                                grpc_context: RayServegRPCContext) -> pb.UnregisterAdapterResponse:
        return await self._admin(grpc_context, "unregister", request, pb.UnregisterAdapterResponse())

    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           grpc_context: RayServegRPCContext) -> pb.ListAdaptersResponse:
        if _refused(grpc_context, self.config.api_key):
            return pb.ListAdaptersResponse()
        try:
            reply = await self.replicas.list_adapters.remote(request)
        except REPLICA_LOST as error:
            return _unavailable(grpc_context, error, pb.ListAdaptersResponse())
        return _deliver(grpc_context, reply, pb.ListAdaptersResponse())

    def _to_replica(self, request: pb.GenerateRequest):
        """Routed by the key of the request itself: the one the replica makes resident."""
        key = routing_key(request) if self.config.affinity else ""
        if not key:
            return self.replicas
        if self.hot_keys is not None:
            key = self.hot_keys.route(key)
        return self.replicas.options(multiplexed_model_id=key)

    async def _admin(self, grpc_context: RayServegRPCContext, method: str, request, empty):
        if _refused(grpc_context, self.config.admin):
            return empty
        try:
            reply = await getattr(self.replicas, method).remote(request)
        except REPLICA_LOST as error:
            return _unavailable(grpc_context, error, empty)
        return _deliver(grpc_context, reply, empty)


def _refused(grpc_context: RayServegRPCContext, check: BearerCheck | None) -> bool:
    """True (with the status set) when `check` refuses the call's credentials."""
    refusal = None if check is None else check.refusal(grpc_context.invocation_metadata())
    if refusal is not None:
        grpc_context.set_code(refusal[0])
        grpc_context.set_details(refusal[1])
    return refusal is not None


def _deliver(grpc_context: RayServegRPCContext, reply: Reply, empty):
    if reply.code == "OK":
        return reply.message
    grpc_context.set_code(grpc.StatusCode[reply.code])
    grpc_context.set_details(reply.details)
    return empty


def _busy(grpc_context: RayServegRPCContext, error: BackPressureError, empty):
    grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    grpc_context.set_details(f"every replica's queue is full: {error.message}")
    return empty


def _unavailable(grpc_context: RayServegRPCContext, error: BaseException, empty):
    grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
    grpc_context.set_details(f"the replica serving this call went away ({type(error).__name__}); retry")
    return empty
