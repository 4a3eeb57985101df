"""The Ray Serve application of `loraquilt serve-ray`: Ray Serve's gRPC proxy serves
`loraquilt.v1.LoraQuilt` from LoraQuiltIngress, which forwards each call to one of N
LoraQuiltReplica (one engine each) by multiplexed routing on its adapters; one
AdapterDirectory replica holds the registrations.

Ray Serve does the cluster work: placement, restarts of dead replicas, routing with
multiplexed-model affinity, backpressure, its own metrics. This module only describes the
application and starts it.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from loraquilt.scaleout.config import (  # noqa: F401 (deployment names re-exported)
    DIRECTORY_DEPLOYMENT, INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT, ReplicaConfig, ScaleoutConfig,
)
from loraquilt.scaleout.directory import AdapterDirectory
from loraquilt.scaleout.http_backend import RayHttpSettings, http_app_builder
from loraquilt.scaleout.ingress import IngressConfig, LoraQuiltIngress
from loraquilt.scaleout.replica import LoraQuiltReplica
from loraquilt.server.model.sources import EMBEDDED_NAME, resolve_model
from loraquilt.server.openai_protocol import model_id

SERVICER_FUNCTION = "loraquilt.v1.loraquilt_pb2_grpc.add_LoraQuiltServicer_to_server"
HEALTH_CHECK_PERIOD_S = 5.0


def build_app(config: ScaleoutConfig):
    """The bound application: ingress -> engine replicas -> directory."""
    replica = config.replica
    directory = serve.deployment(
        AdapterDirectory, name=DIRECTORY_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
    ).bind(max_adapters=replica.engine.max_adapters, state_dir=str(config.state_dir) if config.state_dir else None)
    # Up to a full batch and as many again waiting in each engine; beyond that, requests
    # wait in Ray's router (which may still send them to a less busy replica), and past
    # --max-queue there the caller gets RESOURCE_EXHAUSTED.
    engine = replica.engine
    replicas = serve.deployment(
        LoraQuiltReplica, name=REPLICA_DEPLOYMENT, num_replicas=config.replicas,
        max_ongoing_requests=2 * engine.max_batch_size, max_queued_requests=engine.max_waiting,
        ray_actor_options={"num_cpus": replica.threads, "num_gpus": replica.num_gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    ).bind(replica, directory)
    # The ingress only forwards (no CPU reserved); it must hold every call in flight.
    in_flight = config.replicas * (2 * engine.max_batch_size + engine.max_waiting)
    http = RayHttpSettings(
        app_name=config.app_name, served_model_name=config.served_model_name or model_id(replica.model or EMBEDDED_NAME),
        adapter_root=str(replica.adapter_root) if replica.adapter_root else None, replicas=config.replicas,
        affinity=config.affinity, spread_hot_keys=config.spread_hot_keys, admin=config.admin, api_key=config.api_key)
    # gRPC methods on the class; the OpenAI HTTP API from a builder run on each ingress replica
    ingress = serve.ingress(http_app_builder(http))(LoraQuiltIngress)
    return serve.deployment(
        ingress, name=INGRESS_DEPLOYMENT, num_replicas=config.ingress_replicas,
        max_ongoing_requests=in_flight, ray_actor_options={"num_cpus": 0},
    ).bind(replicas, IngressConfig(admin=config.admin, api_key=config.api_key, affinity=config.affinity,
                                   replicas=config.replicas,
                                   spread_hot_keys=config.spread_hot_keys))


def app_builder(args: dict):
    """The application for a Serve config file or a KubeRay RayService
    (`import_path: loraquilt.scaleout.app:app_builder`): `args` holds `replicas`,
    `ingress_replicas`, `admin_token_file`, `api_key_file`, `served_model_name`, any ReplicaConfig field and
    any engine setting by its flag name (`max_batch_size`, `max_queue`, `dtype`, ...); each replica resolves `model` itself
    (a .gguf is converted once per node, under a file lock)."""
    from loraquilt.server.auth import BearerCheck, read_token_file

    settings = dict(args)
    replicas = int(settings.pop("replicas", 2))
    ingress_replicas = int(settings.pop("ingress_replicas", 1))
    token_file = settings.pop("admin_token_file", None)
    admin = BearerCheck.for_token(read_token_file(Path(token_file))) if token_file else None
    key_file = settings.pop("api_key_file", None)
    api_key = BearerCheck.for_token(read_token_file(Path(key_file), "API key"), "api") if key_file else None
    served_model_name = settings.pop("served_model_name", "") or ""
    if settings.get("adapter_root"):
        settings["adapter_root"] = Path(settings["adapter_root"])
    replica = ReplicaConfig(model=settings.pop("model", "") or "", **settings)
    return build_app(ScaleoutConfig(replicas=replicas, ingress_replicas=ingress_replicas, replica=replica,
                                    admin=admin, api_key=api_key, served_model_name=served_model_name))


@dataclass
class RunningScaleout:
    config: ScaleoutConfig
    model_name: str

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    def restore_report(self) -> dict:
        """What the directory took back from --state-dir at start (restored / skipped names)."""
        directory = serve.get_deployment_handle(DIRECTORY_DEPLOYMENT, app_name=self.config.app_name)
        return directory.restore_report.remote().result()

    def replica_reports(self) -> dict[str, dict]:
        """Each live replica's report (actor name, metrics endpoint), from the directory;
        a replica silent for several health-check periods is left out (it is gone)."""
        directory = serve.get_deployment_handle(DIRECTORY_DEPLOYMENT, app_name=self.config.app_name)
        reports = directory.replicas.remote().result()
        now = time.time()
        return {replica: report for replica, report in reports.items()
                if now - report["checked"] < 4 * HEALTH_CHECK_PERIOD_S}

    def shutdown(self) -> None:
        serve.shutdown()
        ray.shutdown()


def start_scaleout(config: ScaleoutConfig, *, ray_address: str | None = None,
                   log=lambda line: print(line, file=sys.stderr, flush=True)) -> RunningScaleout:
    """Start (or join, with ray_address) a Ray cluster, Serve with the gRPC proxy on
    config.port, and the application; returns once every replica is up."""
    source = resolve_model(config.replica.model or None, log=log)  # convert or fetch once, for all replicas
    config = replace(config, replica=replace(config.replica, model=str(source.folder)),
                     served_model_name=config.served_model_name or model_id(source.name),
                     http_port=config.http_port or free_port(config.host))
    if not ray.is_initialized():
        options = {} if config.ray_metrics_port is None else {"_metrics_export_port": config.ray_metrics_port}
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, **options)
    serve.start(
        http_options={"host": config.host, "port": config.http_port},
        grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=[SERVICER_FUNCTION],
                                 request_timeout_s=config.request_timeout_s),
    )
    log(f"starting {config.replicas} replica(s) of {source.name}")
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    return RunningScaleout(config, source.name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def metrics_urls(running: RunningScaleout) -> list[str]:
    """Every replica's loraquilt metrics endpoint, then Ray's own (when it was given a port)."""
    urls = sorted(report["metrics"] for report in running.replica_reports().values())
    if running.config.ray_metrics_port is not None:
        urls.append(f"http://127.0.0.1:{running.config.ray_metrics_port}/metrics")
    return urls


def write_scrape_targets(path: Path, urls: list[str]) -> None:
    """A Prometheus file_sd list of the metrics endpoints."""
    targets = [url.removeprefix("http://").removesuffix("/metrics") for url in urls]
    path.write_text(json.dumps([{"targets": targets, "labels": {"job": "loraquilt"}}], indent=2) + "\n")
