"""Settings of a scaled-out server (`loraquilt serve-ray`): plain data, sent to every replica."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.auth import AdminCheck

REPLICA_DEPLOYMENT = "LoraQuiltReplica"
DIRECTORY_DEPLOYMENT = "AdapterDirectory"
INGRESS_DEPLOYMENT = "LoraQuiltIngress"


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica builds: one engine on the base model, its own limits."""

    model: str  # HF folder, .gguf or hub id; "" = embedded (serve-ray resolves it once, for all)
    adapter_root: Path | None = None  # RegisterAdapter paths must lie under it (shared by all replicas)
    max_adapters_per_replica: int = 16  # routing keys resident at once (Ray Serve's multiplex LRU bound)
    resolve_adapters: bool = False  # an unregistered name N with a folder <adapter_root>/N registers on first use
    # the engine flags of `serve` (server/engine_args.py), same names and defaults
    max_batch_size: int = 32
    max_seq_len: int = 1024
    max_queue: int = 1024
    max_active_adapters: int = 32  # device slots of each engine
    max_cpu_adapters: int = 256
    max_adapters: int = 10000
    max_lora_rank: int = 16
    max_prefill_tokens: int = 128
    kv_cache_mb: float | None = None  # None: max_batch_size x max_seq_len positions
    kv_block_size: int = 16
    prefix_cache: bool = True
    default_max_new_tokens: int = 128
    device: str = "auto"
    dtype: str = "auto"
    lora_backend: str = "auto"
    threads: int = 1  # torch threads per replica (= its CPU reservation in Ray)
    num_gpus: float = 0.0  # per replica; > 0 puts each replica on a GPU
    metrics_host: str = "127.0.0.1"  # where each replica's Prometheus endpoint listens
    metrics_port: int = 0  # 0: any free port (reported); fixed for one replica per pod on Kubernetes

    def __post_init__(self) -> None:
        if self.max_adapters_per_replica < 1:
            raise ValueError(f"max_adapters_per_replica must be >= 1, got {self.max_adapters_per_replica}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class ScaleoutConfig:
    replicas: int = 2  # engine replicas
    replica: ReplicaConfig | None = None
    ingress_replicas: int = 1  # forwarding only; more for more gRPC traffic than one process carries
    admin: AdminCheck | None = None  # Register/Unregister need its token (it holds only a digest)
    affinity: bool = True  # False: replicas chosen without the routing key (for comparisons)
    spread_hot_keys: bool = True  # a key with too much of the traffic is resident on several replicas
    host: str = "127.0.0.1"
    port: int = 9000  # Ray Serve's gRPC proxy
    http_port: int | None = None  # Ray Serve's HTTP proxy (the OpenAI API); None = any free port
    served_model_name: str = ""  # the base model's id over HTTP; "" = the model's name
    api_key: AdminCheck | None = None  # inference calls need this key (gRPC and HTTP)
    state_dir: Path | None = None  # the directory deployment records registrations here (survive restarts)
    app_name: str = "loraquilt"
    request_timeout_s: float | None = None  # the proxy's end-to-end bound; None = none
    ray_metrics_port: int | None = None  # Ray's and Ray Serve's metrics (a local cluster started here)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise ValueError(f"replicas and ingress_replicas must be >= 1, got {self.replicas}, "
                             f"{self.ingress_replicas}")
