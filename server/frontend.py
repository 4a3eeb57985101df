"""What every frontend of one engine stands on, built in one place: the engine loop (the
thread that steps the engine), the generation layer every transport submits through,
and the adapter admin. `serve` (server/app.py) and the Ray Serve replica
(scaleout/replica.py) both build theirs here, so the limits a request meets are the same
whichever process answers it.

`StartSequence` is how a server starts its parts: each part that started registers how to
stop it; when a later part fails (a port in use, unreadable TLS files, a state file it
cannot use), everything started so far is stopped, newest first, and the failure comes
back as one `ServerStartError` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from loraquilt.server.adapter_admin import AdapterAdmin
from loraquilt.server.adapters.state_file import RegistrationState
from loraquilt.server.engine import Engine
from loraquilt.server.engine_loop import EngineLoop
from loraquilt.server.generation import GenerationLayer, ServiceConfig
from loraquilt.server.metrics import Metrics


class ServerStartError(RuntimeError):
    """A part of the server could not start (the message says which and why, in one line);
    the parts started before it were stopped."""


@dataclass
class Frontend:
    loop: EngineLoop
    generation_layer: GenerationLayer
    admin: AdapterAdmin
    service: ServiceConfig  # as the generation layer applies it (limits clamped to the model)


def clamped(service: ServiceConfig, engine: Engine) -> ServiceConfig:
    """The service limits this engine can honour: nothing longer than its KV row can be generated."""
    limit = min(service.max_new_tokens_limit, engine.max_seq_len - 1)
    return replace(service, max_new_tokens_limit=limit,
                   default_max_new_tokens=min(service.default_max_new_tokens, limit))


def build_frontend(engine: Engine, metrics: Metrics, service: ServiceConfig, *,
                   state: RegistrationState | None = None, resolve_adapters: bool = False,
                   reserved_names: tuple[str, ...] = (), loop_thread: bool = True) -> Frontend:
    """The engine loop (started on its own thread unless loop_thread=False: the caller then
    runs `loop.run_here()`), the generation layer and the adapter admin of `engine`."""
    loop = EngineLoop(engine, metrics)
    if loop_thread:
        loop.start()
    limits = clamped(service, engine)
    admin = AdapterAdmin(engine, service.adapter_root, state, resolve_on_first_use=resolve_adapters,
                         reserved_names=reserved_names)
    generation_layer = GenerationLayer(loop, limits, metrics, resolve=admin.resolve)
    return Frontend(loop, generation_layer, admin, limits)


class StartSequence:
    """Start parts in order; on a failure stop the started ones (newest first) and raise
    ServerStartError with the failing step's name and reason."""

    def __init__(self) -> None:
        self._stops: list[tuple[str, Callable[[], None]]] = []

    def started(self, name: str, stop: Callable[[], None]) -> None:
        self._stops.append((name, stop))

    def step(self, what: str, start: Callable[[], object]):
        """Run `start` (returns its result); on an error undo everything and raise
        ServerStartError("<what>: <reason>")."""
        try:
            return start()
        except ServerStartError:
            self.undo()
            raise
        except Exception as error:  # noqa: BLE001 - every start failure becomes one line
            self.undo()
            reason = str(error) or type(error).__name__
            raise ServerStartError(f"{what}: {reason}") from None

    def undo(self) -> None:
        while self._stops:
            _, stop = self._stops.pop()
            try:
                stop()
            except Exception:  # noqa: BLE001 - stopping what started must not hide the cause
                pass
