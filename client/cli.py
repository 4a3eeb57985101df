"""`loraquilt generate` and `loraquilt adapters register|unregister|list` against a server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-ca", type=Path, help="TLS trusting this PEM certificate (private CA, self-signed)")
    parser.add_argument("--admin-token-file", type=Path,
                        help="admin token for register/unregister (default: $LORAQUILT_ADMIN_TOKEN)")
    parser.add_argument("--api-key-file", type=Path,
                        help="API key for generation and listing (default: $LORAQUILT_API_KEY)")


def add_generate_parser(commands, name: str = "generate", help_text: str = "send a Generate request") -> None:
    generate = commands.add_parser(name, help=help_text)
    generate.add_argument("prompt")
    group = generate.add_mutually_exclusive_group()
    group.add_argument("--adapter", default="", help="registered adapter name")
    group.add_argument("--mix", metavar="NAME=W", nargs="+", action="extend", help="weighted mix")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.add_argument("--chat", action="store_true")
    generate.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--ignore-eos", action="store_true")
    _add_target(generate)
    generate.set_defaults(run=_generate)


def add_adapters_parser(commands, name: str = "adapters", help_text: str = "manage a server's adapters") -> None:
    adapters = commands.add_parser(name, help=help_text)
    actions = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    register = actions.add_parser("register", help="register NAME from PATH (under the server's --adapter-root)")
    register.add_argument("name")
    register.add_argument("path")
    _add_target(register)
    register.set_defaults(run=_register)
    unregister = actions.add_parser("unregister", help="unregister NAME")
    unregister.add_argument("name")
    _add_target(unregister)
    unregister.set_defaults(run=_unregister)
    listing = actions.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true")
    _add_target(listing)
    listing.set_defaults(run=_list)


def _mix(entries: list[str] | None) -> list[tuple[str, float]]:
    mix = []
    for entry in entries or []:
        name, sep, weight = entry.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"--mix entries look like NAME=WEIGHT, got {entry!r}")
        mix.append((name, float(weight)))
    return mix


def _client(args):
    from loraquilt.client.client import LoraQuiltClient

    token = os.environ.get("LORAQUILT_ADMIN_TOKEN") or None
    if args.admin_token_file is not None:
        token = args.admin_token_file.read_text(encoding="utf-8").strip()
    api_key = os.environ.get("LORAQUILT_API_KEY") or None
    if args.api_key_file is not None:
        api_key = args.api_key_file.read_text(encoding="utf-8").strip()
    return LoraQuiltClient(args.target, timeout=args.timeout, admin_token=token, api_key=api_key,
                           tls=args.tls_ca or args.tls or None)


def _rpc_error(error: grpc.RpcError) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


def _generate(args) -> int:
    options = dict(adapter=args.adapter, mix=_mix(args.mix), max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   stop=args.stop, chat=args.chat, ignore_eos=args.ignore_eos)
    try:
        with _client(args) as client:
            if args.stream:
                last = None
                for piece in client.generate_stream(args.prompt, **options):
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                    last = piece
                sys.stdout.write("\n")
                if last is not None:
                    print(f"[{last.completion_tokens} tokens, finish: {last.finish_reason}]", file=sys.stderr)
            else:
                response = client.generate(args.prompt, **options)
                print(response.text)
                print(f"[{response.completion_tokens} tokens, finish: {response.finish_reason}]", file=sys.stderr)
    except grpc.RpcError as error:
        return _rpc_error(error)
    return 0


def _register(args) -> int:
    try:
        with _client(args) as client:
            info = client.register_adapter(args.name, args.path)
    except grpc.RpcError as error:
        return _rpc_error(error)
    print(f"registered {info.name}: rank {info.rank}, {', '.join(info.target_modules)}, "
          f"{info.size_bytes} bytes, tier {info.tier}")
    return 0


def _unregister(args) -> int:
    try:
        with _client(args) as client:
            client.unregister_adapter(args.name)
    except grpc.RpcError as error:
        return _rpc_error(error)
    print(f"unregistered {args.name}")
    return 0


def _list(args) -> int:
    try:
        with _client(args) as client:
            adapters = client.list_adapters()
    except grpc.RpcError as error:
        return _rpc_error(error)
    rows = [{"name": a.name, "rank": a.rank, "target_modules": list(a.target_modules),
             "size_bytes": a.size_bytes, "tier": a.tier} for a in adapters]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<24} rank {row['rank']:<3} {row['tier']:<6} {row['size_bytes']:>10} B  "
                  f"{','.join(row['target_modules'])}")
    return 0
