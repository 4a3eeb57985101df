"""vLLM's CPU build as a bench peer: `vllm_driver.py` run by the user's vLLM python.

One driver process (and vLLM's engine-core child) lives for all the throughput scenarios;
the bench sends it one batch per run over stdin and reads the answer over stdout. The
environment is vLLM's CPU recipe: a KV cache of `--vllm-kvcache-gib`, the OpenMP threads
bound to every core (vLLM's `auto` keeps one core for its scheduler process, one of two
here), tcmalloc and Intel's OpenMP preloaded where they are installed.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from loraquilt.bench.peers.processes import (EngineRun, EngineUnavailable, log_tail, make_run, stop_process,
                                             wait_until_idle)

DRIVER = Path(__file__).with_name("vllm_driver.py")
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")
START_TIMEOUT_S = 900.0
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class VllmSettings:
    """The `vllm.LLM(...)` keywords of the peer (beside the model folder)."""

    max_loras: int  # every adapter of the run at once, so a batch is never split for lack of slots
    max_num_seqs: int  # = the bench batch: every request of a run decodes together
    max_lora_rank: int = 16
    max_model_len: int = 256  # = loraquilt's --max-seq-len in the bench
    dtype: str = "bfloat16"  # vLLM 0.32 has no bitsandbytes: its base is bf16
    enable_lora: bool = True  # also for `base`: a LoRA server answering base requests
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_num_seqs < 1:
            raise ValueError(f"max_loras and max_num_seqs must be >= 1, got {self.max_loras}, {self.max_num_seqs}")


def driver_env(vllm_python: Path, kvcache_gib: int, cores: int | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's environment: the bench's, plus vLLM's CPU settings."""
    env = dict(os.environ if base is None else base)
    cores = cores or os.cpu_count() or 1
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}"
    iomp = vllm_python.parent.parent / "lib" / "libiomp5.so"
    preload = [p for p in (*TCMALLOC, str(iomp)) if Path(p).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [env.get("LD_PRELOAD")])])
    env.pop("PYTHONPATH", None)  # the driver runs in the vLLM venv alone
    return env


def driver_config(model_folder: Path, adapters: dict[str, Path], settings: VllmSettings) -> dict:
    return {"model": str(model_folder), "adapters": [[name, str(path)] for name, path in adapters.items()],
            "llm": asdict(settings)}


def generate_request(prompts: list[str], adapters: list[str | None], names: list[str], new_tokens: int) -> dict:
    """One run for the driver: adapter names become indices into the driver's adapter list."""
    index = {name: i for i, name in enumerate(names)}
    return {"op": "generate", "prompts": prompts, "new_tokens": new_tokens,
            "adapters": [None if name is None else index[name] for name in adapters]}


def run_from_reply(reply: dict) -> EngineRun:
    if "error" in reply:
        raise RuntimeError(f"vLLM: {reply['error']}")
    return make_run(reply["wall_s"], reply["token_ids"], sum(reply["prompt_tokens"]))


class VllmPeer:
    def __init__(self, vllm_python: Path, model_folder: Path, adapters: dict[str, Path], settings: VllmSettings,
                 workdir: Path, kvcache_gib: int, log: Callable[[str], None]):
        if not vllm_python.exists():
            raise EngineUnavailable(f"--vllm-python {vllm_python} does not exist")
        workdir.mkdir(parents=True, exist_ok=True)
        self.names = list(adapters)
        self.log_path = workdir / "vllm.log"
        config = workdir / "vllm-driver.json"
        config.write_text(json.dumps(driver_config(model_folder, adapters, settings), indent=2))
        self.settings = settings
        env = driver_env(vllm_python, kvcache_gib)
        self.env = {key: env[key] for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
                    if key in env}
        log(f"starting vLLM ({vllm_python}, {len(adapters)} adapters; log {self.log_path})")
        with open(self.log_path, "w") as stderr:
            self.process = subprocess.Popen(
                [str(vllm_python), str(DRIVER), str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr, text=True, env=env, start_new_session=True,
                cwd=workdir)  # vLLM's helper processes put their cwd on sys.path: not a source tree
        try:
            ready = self._read(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        if "error" in ready:
            self.stop()
            raise EngineUnavailable(f"vLLM did not start: {ready['error']}")
        self.versions = ready["versions"]
        log(f"vLLM {self.versions.get('vllm')} ready")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                line = self.process.stdout.readline()
                if line:
                    return json.loads(line)
            if self.process.poll() is not None:
                raise EngineUnavailable(f"vLLM exited with {self.process.returncode}: "
                                        f"{log_tail(self.log_path)}")
        raise EngineUnavailable(f"vLLM gave no answer in {timeout:.0f} s: {log_tail(self.log_path)}")

    def throughput(self, prompts: list[str], adapters: list[str | None], new_tokens: int) -> EngineRun:
        self.process.stdin.write(json.dumps(generate_request(prompts, adapters, self.names, new_tokens)) + "\n")
        self.process.stdin.flush()
        run = run_from_reply(self._read(RUN_TIMEOUT_S))
        wait_until_idle(self.process.pid)
        return run

    def describe(self) -> dict:
        return {"versions": self.versions, "llm": asdict(self.settings), "env": self.env, "log": str(self.log_path),
                "timed": "vllm.LLM.generate over the whole batch (offline API, no HTTP)"}

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_process(self.process)
