"""The engine's command-line flags, defined once, and the one function that turns parsed
arguments into an EngineConfig. `serve`, `serve-ray` (each replica) and `demo` use both,
so an engine flag of `serve` means the same everywhere."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from loraquilt.server.cpu_contention import parse_threads
from loraquilt.server.engine import EngineConfig
from loraquilt.server.model.dtype import add_dtype_argument, default_dtype_spec
from loraquilt.server.model.weights import DeviceConfig


@dataclass(frozen=True)
class EngineFlag:
    dest: str  # the argparse dest (and the ReplicaConfig field of serve-ray)
    field: str  # the EngineConfig field
    type: type  # bool: an on/off pair, --name and --no-name
    default: object
    help: str


ENGINE_FLAGS = (
    EngineFlag("max_batch_size", "max_batch_size", int, 32, "sequences in the running batch"),
    EngineFlag("max_active_adapters", "max_active_adapters", int, 32, "adapter slots on the device"),
    EngineFlag("max_cpu_adapters", "max_cpu_adapters", int, 256, "adapters kept in host memory"),
    EngineFlag("max_adapters", "max_adapters", int, 10000,
               "registered adapters before registration answers RESOURCE_EXHAUSTED"),
    EngineFlag("max_lora_rank", "max_lora_rank", int, 16, "largest adapter rank the slots hold"),
    EngineFlag("max_queue", "max_waiting", int, 1024, "waiting requests before RESOURCE_EXHAUSTED"),
    EngineFlag("max_seq_len", "max_seq_len", int, 1024, "prompt + generated tokens per request"),
    EngineFlag("max_prefill_tokens", "max_prefill_tokens", int, 128,
               "prompt tokens fed per step over all requests; longer prompts are prefilled in chunks"),
    EngineFlag("kv_cache_mb", "kv_cache_mb", float, None,
               "KV cache pool in MiB, shared by all requests in blocks (default: what max-batch-size "
               "sequences of max-seq-len positions take)"),
    EngineFlag("kv_block_size", "kv_block_size", int, 16, "positions per KV cache block"),
    EngineFlag("prefix_cache", "prefix_cache", bool, True,
               "reuse the KV blocks of a prompt prefix computed before on the same adapter content"),
)
LORA_BACKENDS = ("auto", "torch", "triton", "reference")


def add_engine_arguments(parser) -> None:
    """--model, --device, --dtype, --lora-backend and every ENGINE_FLAGS flag."""
    parser.add_argument("--model", help="HF folder, .gguf file, hub id or synthetic:1b (a random-weight "
                        "1.1B Llama, written once into the cache) (default: embedded SmolLM2)")
    for flag in ENGINE_FLAGS:
        name = "--" + flag.dest.replace("_", "-")
        if flag.type is bool:
            parser.add_argument(name, dest=flag.dest, action=argparse.BooleanOptionalAction,
                                default=flag.default, help=f"{flag.help} (default {'on' if flag.default else 'off'})")
            continue
        default = "auto" if flag.default is None else flag.default
        parser.add_argument(name, dest=flag.dest, type=flag.type, default=flag.default,
                            help=f"{flag.help} (default {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_dtype_argument(parser)
    parser.add_argument("--lora-backend", default="auto", choices=LORA_BACKENDS)


def add_threads_argument(parser) -> None:
    """--threads, for commands whose engine owns the machine's cores (`serve`; a serve-ray
    replica's count comes from --threads-per-replica, the demo has its own --threads)."""
    parser.add_argument("--threads", type=parse_threads, default=None, metavar="N|auto",
                        help="OpenMP threads of the engine's stepping thread; auto: every usable CPU while "
                             "no other process keeps one busy, fewer while others do (default auto)")


def engine_config_from_args(args, **overrides) -> EngineConfig:
    """The EngineConfig for parsed arguments (an argparse Namespace, or any object with the
    same attribute names, such as serve-ray's ReplicaConfig). A flag the object lacks takes
    its default; `overrides` are EngineConfig fields set by the caller."""
    values = {flag.field: getattr(args, flag.dest, flag.default) for flag in ENGINE_FLAGS}
    values["model"] = getattr(args, "model", None) or None
    values["lora_backend"] = getattr(args, "lora_backend", "auto")
    values["threads"] = getattr(args, "threads", None)  # None: auto
    device = DeviceConfig(getattr(args, "device", "auto"), getattr(args, "dtype", None) or default_dtype_spec())
    values.update(overrides)
    return EngineConfig(device=values.pop("device", device), **values)
