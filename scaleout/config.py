"""Settings of a scaled-out server (`loraquilt serve-ray`): plain data, sent to every replica."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraquilt.server.auth import BearerCheck
from loraquilt.server.config_flags import config_from_values, config_values, flags_by_dest
from loraquilt.server.engine_config import EngineConfig

REPLICA_DEPLOYMENT = "LoraQuiltReplica"
DIRECTORY_DEPLOYMENT = "AdapterDirectory"
INGRESS_DEPLOYMENT = "LoraQuiltIngress"


def _accepts_engine_settings(cls):
    """Let `cls(**settings)` take the engine's settings flat, by their flag names
    (`max_batch_size=16, max_queue=64, dtype="float32"`): serve-ray's flags and config file
    keys. They go into the `engine` field (over `engine=` when both are given); the class's
    own fields keep theirs."""
    init = cls.__init__
    own = {field.name for field in dataclasses.fields(cls)}
    engine_keys = set(flags_by_dest(EngineConfig)) - own

    @functools.wraps(init)
    def __init__(self, *args, engine: EngineConfig | None = None, **settings):
        flat = {key: settings.pop(key) for key in list(settings) if key in engine_keys}
        engine = engine or EngineConfig()
        if flat:
            engine = config_from_values(EngineConfig, {**config_values(engine), **flat}, progress=engine.progress)
        init(self, *args, engine=engine, **settings)

    cls.__init__ = __init__
    return cls


@_accepts_engine_settings
@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica builds: one engine on the base model, its own limits.

    `engine` holds the engine settings of `serve` (the same fields and defaults); the
    replica's own `model` and `threads` are its engine's (`engine_config()`)."""

    model: str = ""  # HF folder, .gguf or hub id; "" = embedded (serve-ray resolves it once, for all)
    adapter_root: Path | None = None  # RegisterAdapter paths must lie under it (shared by all replicas)
    max_adapters_per_replica: int = 16  # routing keys resident at once (Ray Serve's multiplex LRU bound)
    resolve_adapters: bool = False  # an unregistered name N with a folder <adapter_root>/N registers on first use
    default_max_new_tokens: int = 128
    threads: int = 1  # torch threads per replica (= its CPU reservation in Ray)
    num_gpus: float = 0.0  # per replica; > 0 puts each replica on a GPU
    metrics_host: str = "127.0.0.1"  # where each replica's Prometheus endpoint listens
    metrics_port: int = 0  # 0: any free port (reported); fixed for one replica per pod on Kubernetes
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.max_adapters_per_replica < 1:
            raise ValueError(f"max_adapters_per_replica must be >= 1, got {self.max_adapters_per_replica}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.engine.model not in (None, self.model or None):
            raise ValueError("set the model on the ReplicaConfig, not its engine (serve-ray resolves it once)")
        if self.engine.threads not in (None, self.threads):
            raise ValueError("set threads on the ReplicaConfig, not its engine (they are the replica's Ray CPUs)")

    def engine_config(self) -> EngineConfig:
        """The engine each replica builds: `engine` with the replica's model and threads."""
        return replace(self.engine, model=self.model or None, threads=self.threads, progress=False)


@dataclass(frozen=True)
class ScaleoutConfig:
    replicas: int = 2  # engine replicas
    replica: ReplicaConfig | None = None
    ingress_replicas: int = 1  # forwarding only; more for more gRPC traffic than one process carries
    admin: BearerCheck | None = None  # Register/Unregister need its token (it holds only a digest)
    affinity: bool = True  # False: replicas chosen without the routing key (for comparisons)
    spread_hot_keys: bool = True  # a key with too much of the traffic is resident on several replicas
    host: str = "127.0.0.1"
    port: int = 9000  # Ray Serve's gRPC proxy
    http_port: int | None = None  # Ray Serve's HTTP proxy (the OpenAI API); None = any free port
    served_model_name: str = ""  # the base model's id over HTTP; "" = the model's name
    api_key: BearerCheck | None = None  # inference calls need this key (gRPC and HTTP)
    state_dir: Path | None = None  # the directory deployment records registrations here (survive restarts)
    app_name: str = "loraquilt"
    request_timeout_s: float | None = None  # the proxy's end-to-end bound; None = none
    ray_metrics_port: int | None = None  # Ray's and Ray Serve's metrics (a local cluster started here)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise ValueError(f"replicas and ingress_replicas must be >= 1, got {self.replicas}, "
                             f"{self.ingress_replicas}")
