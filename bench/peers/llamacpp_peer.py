"""llama.cpp's `llama-server` as a bench peer, over its native HTTP API on loopback.

    llama-server -m BASE.gguf --lora a.gguf,b.gguf,... --lora-init-without-apply --parallel B -c B*256

then POST /lora-adapters with every scale 0 (otherwise a request without its own `lora`
list would get all of them), and per request POST /completion with the plain-text prompt,
`n_predict` T, `ignore_eos`, temperature 0, no prompt cache and `"lora": [{"id": i,
"scale": 1.0}]` (an empty list for the base model). A run sends all requests at once, one
thread each, and is timed from the first request sent to the last answer. llama.cpp does
not batch requests whose adapter sets differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from loraquilt.bench.peers.processes import (EngineRun, EngineUnavailable, log_tail, make_run, stop_process,
                                             wait_until_idle)

START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LlamaServerSettings:
    parallel: int  # slots (--parallel) = the bench batch
    ctx_per_slot: int = 256  # = loraquilt's --max-seq-len in the bench
    threads: int = os.cpu_count() or 1

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.ctx_per_slot < 1 or self.threads < 1:
            raise ValueError(f"parallel, ctx_per_slot and threads must be >= 1: {self}")


def server_command(binary: Path, model: Path, loras: list[Path], port: int,
                   settings: LlamaServerSettings) -> list[str]:
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(settings.parallel), "-c", str(settings.parallel * settings.ctx_per_slot),
               "-t", str(settings.threads), "-tb", str(settings.threads),
               "--cache-ram", "0"]  # no prompt cache kept in RAM between requests
    if loras:  # comma separated: a second --lora would replace the first
        command += ["--lora", ",".join(str(path) for path in loras), "--lora-init-without-apply"]
    return command


def completion_body(prompt: str, adapter: int | None, new_tokens: int) -> dict:
    """One request: greedy, exactly new_tokens, the adapter (index) alone at scale 1."""
    return {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
            "cache_prompt": False, "return_tokens": True,
            "lora": [] if adapter is None else [{"id": adapter, "scale": 1.0}]}


def answer_tokens(answer: dict) -> tuple[list[int], int]:
    """(generated token ids, prompt tokens) of a /completion answer."""
    ids = list(answer.get("tokens") or [])
    if not ids and answer.get("tokens_predicted"):
        raise RuntimeError(f"llama-server answered without token ids: {sorted(answer)}")
    return ids, int(answer.get("tokens_evaluated", 0))


def _http(url: str, body: dict | list | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class IllegalInstruction(EngineUnavailable):
    """llama-server died of SIGILL while starting."""


class LlamaServerPeer:
    def __init__(self, binary: Path, model: Path, loras: dict[str, Path], settings: LlamaServerSettings,
                 port: int, log_path: Path, log: Callable[[str], None]):
        if not binary.exists():
            raise EngineUnavailable(f"{binary} does not exist")
        self.model, self.settings, self.log_path = model, settings, log_path
        self.names = list(loras)
        self.url = f"http://127.0.0.1:{port}"
        self.command = server_command(binary, model, list(loras.values()), port, settings)
        self.notes: list[str] = []
        log_path.write_text("")  # this run's log alone (a restart appends to it)
        log(f"starting llama-server on {model.name} ({len(loras)} LoRA; log {log_path})")
        try:
            self._start()
        except IllegalInstruction as crash:
            # a CPU path (AMX or repacked weights) the build chose but the machine cannot run
            # (seen here: Q4_1 on AMX under a VM): weights as stored in the GGUF instead
            self.notes.append(f"{crash}; restarted with --no-repack")
            log(f"llama-server on {model.name}: {crash}; restarting with --no-repack")
            self.command = [*self.command, "--no-repack"]
            self._start()
        try:
            self._check_and_zero_adapters(list(loras.values()))
            self.build = _http(f"{self.url}/props").get("build_info")
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        with open(self.log_path, "a") as output:
            output.write(f"$ {' '.join(self.command)}\n")
            output.flush()
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.process.returncode == -signal.SIGILL and "--no-repack" not in self.command:
                    raise IllegalInstruction("llama-server stopped on an illegal instruction (SIGILL) at start-up")
                raise EngineUnavailable(f"llama-server exited with {self.process.returncode}: "
                                        f"{log_tail(self.log_path)}")
            try:
                if _http(f"{self.url}/health", timeout=5).get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise EngineUnavailable(f"llama-server not serving after {START_TIMEOUT_S:.0f} s: {log_tail(self.log_path)}")

    def _check_and_zero_adapters(self, paths: list[Path]) -> None:
        if not paths:
            return
        listed = _http(f"{self.url}/lora-adapters")
        by_id = {entry["id"]: Path(entry["path"]).name for entry in listed}
        expected = {index: path.name for index, path in enumerate(paths)}
        if by_id != expected:
            raise EngineUnavailable(f"llama-server's adapter ids differ from the --lora order: {by_id}")
        _http(f"{self.url}/lora-adapters", [{"id": index, "scale": 0.0} for index in range(len(paths))])

    def throughput(self, prompts: list[str], adapters: list[str | None], new_tokens: int) -> EngineRun:
        index = {name: i for i, name in enumerate(self.names)}
        bodies = [completion_body(prompt, None if name is None else index[name], new_tokens)
                  for prompt, name in zip(prompts, adapters)]

        def call(body: dict) -> tuple[list[int], int]:
            return answer_tokens(_http(f"{self.url}/completion", body, timeout=REQUEST_TIMEOUT_S))

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            answers = list(pool.map(call, bodies))
        wall = time.perf_counter() - start
        wait_until_idle(self.process.pid)
        return make_run(wall, [ids for ids, _ in answers], sum(count for _, count in answers))

    def describe(self) -> dict:
        return {"model": str(self.model), "command": self.command, "settings": asdict(self.settings),
                "log": str(self.log_path), "timed": "first /completion request sent to the last answer",
                "build": self.build, "notes": self.notes}

    def stop(self) -> None:
        stop_process(self.process)
