"""The OpenAI-compatible HTTP API of `loraquilt serve-ray`: the same routes as `serve`
(server/http_api.py), behind Ray Serve's HTTP proxy, in the ingress deployment. Each
generation goes to a replica chosen by the same adapter-affinity key as gRPC calls
(client/routing.py); the replica runs it on the one generation layer (server/generation.py)
and streams its pieces back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve.exceptions import BackPressureError

from loraquilt.client.routing import key_for
from loraquilt.scaleout.config import DIRECTORY_DEPLOYMENT, REPLICA_DEPLOYMENT
from loraquilt.scaleout.hot_keys import HotKeys
from loraquilt.server.adapter_admin import base_id_taken
from loraquilt.server.auth import BearerCheck
from loraquilt.server.generation import ErrorKind, GenerationError
from loraquilt.v1 import loraquilt_pb2 as pb



@dataclass(frozen=True)
class RayHttpSettings:
    """What the ingress's HTTP app needs (plain data: it travels to every ingress replica)."""

    app_name: str
    served_model_name: str
    adapter_root: str | None
    replicas: int
    affinity: bool = True
    spread_hot_keys: bool = True
    admin: BearerCheck | None = None
    api_key: BearerCheck | None = None


def _raise_failure(reply) -> None:
    if reply.code != "OK":
        raise GenerationError(ErrorKind[reply.code], reply.details, reply.param)


class RayGeneration:
    """A generation running on a replica: async-iterable pieces, `cancel()`."""

    def __init__(self, first, responses):
        self._first, self._responses = first, responses

    def cancel(self) -> None:
        self._responses.cancel()

    async def __aiter__(self):
        try:
            reply = self._first
            while True:
                _raise_failure(reply)
                yield reply.message
                if reply.message.result is not None:
                    return
                reply = await self._responses.__anext__()
        finally:
            self._responses.cancel()  # a no-op once it ended; stops the replica's work otherwise


class RayBackend:
    """The HTTP API's backend on Ray Serve handles (see server/http_api.LocalBackend)."""

    def __init__(self, settings: RayHttpSettings):
        self.settings = settings
        self.adapter_root = Path(settings.adapter_root) if settings.adapter_root else None
        self.replicas = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=settings.app_name)
        self.directory = serve.get_deployment_handle(DIRECTORY_DEPLOYMENT, app_name=settings.app_name)
        self.hot_keys = HotKeys(settings.replicas) if settings.spread_hot_keys else None
        self._max_model_len: int | None = None

    async def max_model_len(self) -> int:
        if self._max_model_len is None:  # every replica runs the same engine settings
            self._max_model_len = await self.replicas.max_model_len.remote()
        return self._max_model_len

    async def open(self, fields: dict, stream: bool) -> RayGeneration:
        from loraquilt.scaleout.ingress import REPLICA_LOST

        key = key_for(fields.get("adapter"), (name for name, _ in fields.get("mix", ()))) if self.settings.affinity else ""
        options = {"stream": True}
        if key:
            options["multiplexed_model_id"] = self.hot_keys.route(key) if self.hot_keys else key
        responses = self.replicas.options(**options).generate_fields.remote(fields, stream)
        try:
            first = await responses.__anext__()
        except BackPressureError as error:
            raise GenerationError(ErrorKind.RESOURCE_EXHAUSTED, f"every replica's queue is full: {error.message}")
        except REPLICA_LOST as error:
            raise GenerationError(ErrorKind.UNAVAILABLE, f"the replica serving this call went away "
                                                         f"({type(error).__name__}); retry")
        _raise_failure(first)
        return RayGeneration(first, responses)

    async def adapters(self) -> list[tuple[str, int, str]]:
        return [(entry.name, entry.created, entry.path) for entry in await self.directory.entries.remote()]

    async def load(self, name: str, path: str) -> None:
        if name == self.settings.served_model_name:
            raise base_id_taken(name)
        _raise_failure(await self.replicas.register.remote(pb.RegisterAdapterRequest(name=name, path=path)))

    async def unload(self, name: str) -> None:
        _raise_failure(await self.replicas.unregister.remote(pb.UnregisterAdapterRequest(name=name)))


def http_app_builder(settings: RayHttpSettings):
    """The builder `serve.ingress` takes (a plain function, which Ray Serve calls on each
    ingress replica as it starts) of the ingress's ASGI app."""

    def build_ray_http_app():
        from loraquilt.server.http_api import HttpConfig, build_app

        config = HttpConfig(served_model_name=settings.served_model_name, api_key=settings.api_key,
                            admin=settings.admin)
        return build_app(RayBackend(settings), config)

    return build_ray_http_app
