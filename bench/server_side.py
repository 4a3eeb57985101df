"""loraquilt measured the way a user meets it: a real `loraquilt serve` process on
loopback, driven by the gRPC client from the bench process."""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraquilt.client import LoraQuiltClient


@dataclass
class RunResult:
    tokens_per_s: float
    wall_s: float
    generated_tokens: int
    token_ids: list[list[int]] = field(default_factory=list, repr=False)
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    server_rss_mb: float = 0.0


@dataclass
class StreamRunResult:
    tokens_per_s: float
    wall_s: float
    generated_tokens: int
    ttft_ms: list[float]  # per request, in request order
    ttft_p50_ms: float
    ttft_p99_ms: float
    token_ids: list[list[int]] = field(default_factory=list, repr=False)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


class ServedLoraQuilt:
    """Starts `loraquilt serve` and talks to it; stop() ends the process.

    model_folder None serves the embedded default model; metrics_port -1 turns the
    Prometheus endpoint off; extra_args go to `serve` as they are."""

    def __init__(self, model_folder: Path | None, adapter_root: Path, *, port: int, max_batch_size: int,
                 max_active_adapters: int, max_cpu_adapters: int, max_seq_len: int, log,
                 metrics_port: int = -1, extra_args: tuple[str, ...] = ()):
        self.log = log
        self.port, self.metrics_port = port, metrics_port
        model = [] if model_folder is None else ["--model", str(model_folder)]
        command = [sys.executable, "-m", "loraquilt", "serve", *model,
                   "--adapter-root", str(adapter_root), "--port", str(port), "--metrics-port", str(metrics_port),
                   "--http-port", "-1",
                   "--max-batch-size", str(max_batch_size), "--max-active-adapters", str(max_active_adapters),
                   "--max-cpu-adapters", str(max_cpu_adapters), "--max-seq-len", str(max_seq_len),
                   "--max-queue", "4096", "--grace-seconds", "5", *extra_args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._terminated = False
        self.stderr_tail: deque[str] = deque(maxlen=40)  # the server's last words, for failure reports
        try:
            self._wait_until_serving(deadline=time.monotonic() + 600)
        except BaseException:
            self.process.kill()  # a server that did not come up is not left behind
            self.process.wait()
            raise
        self.startup_log = list(self.stderr_tail)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.target = f"127.0.0.1:{port}"
        self.client = LoraQuiltClient(self.target, timeout=3600)

    def _wait_until_serving(self, deadline: float) -> None:
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip())
            if "loraquilt serving" in line:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"loraquilt serve did not start: {line.strip()}")
        raise RuntimeError("loraquilt serve exited before serving:\n" + "\n".join(self.stderr_tail))

    def served_dtype(self) -> str | None:
        """The compute dtype the server's startup log names ("... on cpu (float32; why): ...")."""
        for line in self.startup_log:
            found = re.search(r" ready in .* on \S+ \((\w+)[;)]", line)
            if found:
                return found.group(1)
        return None

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip())

    def memory_mb(self) -> tuple[float, float]:
        return process_memory_mb(self.process.pid)

    def scrape_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The server's Prometheus samples: (name, sorted label pairs) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def register(self, name: str, path: str) -> None:
        self.client.register_adapter(name, path)

    def unregister(self, name: str) -> None:
        self.client.unregister_adapter(name)

    def throughput(self, prompts: list[str], adapters: list[str | None], new_tokens: int,
                   concurrency: int | None = None) -> RunResult:
        """Every request sent at once (closed batch); tokens/s over the whole wall time."""
        latencies = [0.0] * len(prompts)

        def call(index: int):
            start = time.perf_counter()
            response = self.client.generate(prompts[index], adapter=adapters[index] or "",
                                            max_new_tokens=new_tokens, ignore_eos=True)
            latencies[index] = time.perf_counter() - start
            return list(response.token_ids)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency or len(prompts)) as pool:
            token_ids = list(pool.map(call, range(len(prompts))))
        wall = time.perf_counter() - start
        generated = sum(len(ids) for ids in token_ids)
        return RunResult(generated / wall, wall, generated, token_ids,
                         percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3,
                         self.memory_mb()[0])

    def stream_batch(self, prompts: list[str], adapters: list[str | None], new_tokens: int) -> StreamRunResult:
        """Every request sent at once as a stream (a closed batch): each request's time to
        its first streamed token, and generated tokens/s over the whole wall time."""
        ttft = [0.0] * len(prompts)

        def call(index: int) -> list[int]:
            ids: list[int] = []
            start = time.perf_counter()
            for piece in self.client.generate_stream(prompts[index], adapter=adapters[index] or "",
                                                     max_new_tokens=new_tokens, ignore_eos=True):
                if piece.token_ids and not ids:
                    ttft[index] = time.perf_counter() - start
                ids.extend(piece.token_ids)
            return ids

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            token_ids = list(pool.map(call, range(len(prompts))))
        wall = time.perf_counter() - start
        generated = sum(len(ids) for ids in token_ids)
        ttft_ms = [t * 1e3 for t in ttft]
        return StreamRunResult(generated / wall, wall, generated, ttft_ms, percentile(ttft_ms, 50),
                               percentile(ttft_ms, 99), token_ids)

    def first_token_ms(self, prompt: str, adapter: str) -> float:
        start = time.perf_counter()
        for _ in self.client.generate_stream(prompt, adapter=adapter, max_new_tokens=1, ignore_eos=True):
            break
        return (time.perf_counter() - start) * 1e3

    def hotload(self, folders: list[str], prompt: str, warm_adapter: str | None = None) -> dict:
        """RegisterAdapter -> first token of a never-seen adapter, once per folder.

        warm_adapter: a registered adapter; after each hot-load sample, the first-token
        latency of the same prompt on it (already on the device: one untimed request
        first puts it there) is measured too, as `warm_ttft_*`."""
        samples, warm = [], []
        if warm_adapter is not None:
            self.first_token_ms(prompt, warm_adapter)
        for index, folder in enumerate(folders):
            name = f"hot-{index}"
            start = time.perf_counter()
            self.register(name, folder)
            for _ in self.client.generate_stream(prompt, adapter=name, max_new_tokens=1, ignore_eos=True):
                break
            samples.append((time.perf_counter() - start) * 1e3)
            self.unregister(name)
            if warm_adapter is not None:
                warm.append(self.first_token_ms(prompt, warm_adapter))
        result = {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "samples_ms": samples}
        if warm:
            result.update(warm_ttft_p50_ms=percentile(warm, 50), warm_ttft_p99_ms=percentile(warm, 99),
                          warm_samples_ms=warm, warm_adapter=warm_adapter)
        return result

    def open_loop(self, prompts: list[str], adapters: list[str], new_tokens: int, rate: float,
                  duration_s: float, seed: int) -> dict:
        """Poisson arrivals at `rate` requests/s for `duration_s`; TTFT and inter-token latency."""
        rng = np.random.default_rng(seed)
        ttft, itl, threads = [], [], []
        lock = threading.Lock()

        def one(index: int) -> None:
            start = time.perf_counter()
            last = None
            gaps = []
            first = None
            for piece in self.client.generate_stream(prompts[index % len(prompts)], adapter=adapters[index % len(adapters)],
                                                     max_new_tokens=new_tokens, ignore_eos=True):
                now = time.perf_counter()
                if not piece.token_ids:
                    continue
                if first is None:
                    first = now - start
                else:
                    gaps.extend([(now - last) / len(piece.token_ids)] * len(piece.token_ids))
                last = now
            with lock:
                ttft.append(first or 0.0)
                itl.extend(gaps)

        begin = time.perf_counter()
        next_arrival, index = begin, 0
        while next_arrival - begin < duration_s:
            delay = next_arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=one, args=(index,), daemon=True)
            thread.start()
            threads.append(thread)
            index += 1
            next_arrival += rng.exponential(1.0 / rate)
        for thread in threads:
            thread.join()
        return {"rate_rps": rate, "requests": index, "duration_s": time.perf_counter() - begin,
                "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
                "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3}

    def stop(self, wait: bool = True) -> None:
        """Close the client and end the process (SIGTERM: a graceful drain, then SIGKILL
        after 30 s). wait False only signals it; call stop() again to reap it."""
        self.client.close()
        if self.process.poll() is not None:
            return
        if not self._terminated:
            self.process.terminate()
            self._terminated = True
        if wait:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
