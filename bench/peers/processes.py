"""What the peer engines share: their run result, and watching and stopping their processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class EngineUnavailable(Exception):
    """A peer engine that cannot run here; its message is the JSON's `skipped` reason."""


@dataclass
class EngineRun:
    tokens_per_s: float
    wall_s: float
    generated_tokens: int
    prompt_tokens: int  # as the engine tokenized the prompts, summed
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # per request, in request order


def make_run(wall_s: float, token_ids: list[list[int]], prompt_tokens: int) -> EngineRun:
    generated = sum(len(ids) for ids in token_ids)
    return EngineRun(generated / wall_s if wall_s > 0 else 0.0, wall_s, generated, prompt_tokens, token_ids)


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid and its descendants so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in descendants(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                stats = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(stats[11]) + int(stats[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def idle_cpu_fraction(pid: int, seconds: float = 2.0) -> float:
    """Cores' worth of CPU the process tree used over `seconds` while sent nothing (0 when idle)."""
    before, start = tree_cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (tree_cpu_seconds(pid) - before) / (time.perf_counter() - start)


def wait_until_idle(pid: int, window_s: float = 0.25, threshold: float = 0.05, limit_s: float = 10.0) -> float:
    """Return once the process tree has used under `threshold` cores over a `window_s`
    window (or after `limit_s`): after a run, before the next system's. vLLM's worker
    busy-polls its shared-memory queue for 1 s after the last message; this keeps that
    second out of the next system's run. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if idle_cpu_fraction(pid, window_s) < threshold:
            break
    return time.perf_counter() - start


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the child's own process group (it was started with start_new_session),
    SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
