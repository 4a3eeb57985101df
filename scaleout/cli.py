"""`loraquilt serve-ray`: the same gRPC service from several replicas on Ray Serve.

Needs the `ray` extra (`pip install 'loraquilt[ray]'`); ray is imported only when the
command runs, so the rest of loraquilt works without it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from loraquilt.server.engine_args import add_engine_arguments, engine_config_from_args


def add_serve_ray_parser(commands, name: str = "serve-ray", help_text: str = "serve replicas on Ray Serve") -> None:
    parser = commands.add_parser(name, help=help_text, description=(
        "Replicas of the loraquilt engine behind Ray Serve's gRPC proxy: requests carry their "
        "adapter as routing metadata and go to a replica that has it resident. Registered "
        "adapters are validated once and loaded by each replica on first use."))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-adapters-per-replica", type=int, default=16,
                        help="routing keys (an adapter, or a mix's members) resident per replica; LRU beyond")
    parser.add_argument("--adapter-root", type=Path, help="RegisterAdapter paths must lie under this folder, "
                                                          "which every replica must see at the same path")
    parser.add_argument("--port", type=int, default=9000, help="gRPC port of Ray Serve's proxy")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="port of Ray Serve's HTTP proxy: the OpenAI-compatible API (0 picks a free port)")
    parser.add_argument("--served-model-name", help="the base model's id in the HTTP API (default: its name)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy and replica metrics "
                                                            "(Ray's gRPC proxy listens on every interface)")
    parser.add_argument("--threads-per-replica", type=int, default=None,
                        help="torch threads (and Ray CPUs) per replica (default: cores / replicas)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--default-max-new-tokens", type=int, default=128)
    parser.add_argument("--state-dir", type=Path,
                        help="record every registration here (the directory deployment writes it) and take them "
                             "back at start; a folder every node that may run the directory can reach")
    parser.add_argument("--resolve-adapters", action="store_true",
                        help="a request for an unregistered adapter N registers <adapter-root>/N on first use")
    add_engine_arguments(parser)  # each replica's engine, as `serve`'s
    parser.add_argument("--preload", metavar="NAME=PATH", nargs="+", action="extend", default=[],
                        help="adapters registered at start (paths under --adapter-root)")
    parser.add_argument("--admin-token-file", type=Path,
                        help="Register/UnregisterAdapter then need 'authorization: Bearer <token>' metadata")
    parser.add_argument("--api-key-file", type=Path,
                        help="generation, listing and the HTTP API then need 'authorization: Bearer <key>'")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    parser.add_argument("--ray-metrics-port", type=int, default=9465,
                        help="Ray's and Ray Serve's metrics, for a cluster started here (-1: Ray picks)")
    parser.add_argument("--scrape-targets", type=Path,
                        help="write every metrics endpoint here (Prometheus file_sd JSON)")
    parser.set_defaults(run=_serve_ray)


def _serve_ray(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("serve-ray needs Ray Serve: pip install 'loraquilt[ray]'") from None
    from loraquilt.client.client import LoraQuiltClient
    from loraquilt.scaleout.app import HEALTH_CHECK_PERIOD_S, metrics_urls, start_scaleout, write_scrape_targets
    from loraquilt.scaleout.config import ReplicaConfig, ScaleoutConfig
    from loraquilt.server.app import parse_preload
    from loraquilt.server.auth import AuthConfigError, BearerCheck, read_token_file

    preload = parse_preload(args.preload)
    try:
        token = read_token_file(args.admin_token_file) if args.admin_token_file else None
        api_key = read_token_file(args.api_key_file, "API key") if args.api_key_file else None
    except AuthConfigError as error:
        raise SystemExit(str(error)) from None
    if token is None:
        print("warning: Ray Serve's gRPC proxy listens on every interface; without --admin-token-file "
              "anyone who reaches the port can register and unregister adapters", file=sys.stderr, flush=True)
    if args.state_dir is not None:
        from loraquilt.server.adapters.state_file import RegistrationState, StateFileError

        try:
            RegistrationState(args.state_dir).load()  # a bad state file stops the start before Ray starts
        except StateFileError as error:
            raise SystemExit(str(error)) from None
    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // args.replicas)
    try:
        config = ScaleoutConfig(
            replicas=args.replicas, host=args.host, port=args.port, http_port=args.http_port or None,
            state_dir=args.state_dir.resolve() if args.state_dir else None,
            served_model_name=args.served_model_name or "",
            api_key=BearerCheck.for_token(api_key, "api") if api_key else None,
            ray_metrics_port=None if args.ray_metrics_port < 0 or args.ray_address else args.ray_metrics_port,
            admin=BearerCheck.for_token(token) if token else None,
            replica=ReplicaConfig(
                model=args.model or "", adapter_root=args.adapter_root.resolve() if args.adapter_root else None,
                max_adapters_per_replica=args.max_adapters_per_replica, resolve_adapters=args.resolve_adapters,
                engine=engine_config_from_args(args, model=None), default_max_new_tokens=args.default_max_new_tokens,
                threads=threads, num_gpus=args.gpus_per_replica, metrics_host=args.host,
            ))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    running = start_scaleout(config, ray_address=args.ray_address)
    if config.state_dir is not None:
        report = running.restore_report()
        print(f"restored {len(report['restored'])} recorded adapter(s) from {config.state_dir}", file=sys.stderr,
              flush=True)
        for name in report["skipped"]:
            print(f"adapter {name!r} not restored: its files changed (or went away) since it was registered; "
                  "register it again to serve the files there now", file=sys.stderr, flush=True)
    if preload:
        with LoraQuiltClient(running.target, admin_token=token, api_key=api_key, timeout=120) as client:
            for name, path in preload:
                client.register_adapter(name, path)
    print(f"loraquilt serve-ray: {config.replicas} replica(s) of {running.model_name} on {running.target} "
          f"(gRPC) and {running.http_url}/v1 (OpenAI API); each request goes to a replica that holds its "
          "adapters", file=sys.stderr, flush=True)
    time.sleep(2 * HEALTH_CHECK_PERIOD_S)  # every replica reports at its first health check
    urls = metrics_urls(running)
    if args.scrape_targets:
        write_scrape_targets(args.scrape_targets, urls)
    for url in urls:
        print(f"metrics {url}", file=sys.stderr, flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("stopping Ray Serve", file=sys.stderr, flush=True)
    running.shutdown()
    return 0
