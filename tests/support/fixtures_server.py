"""Helpers for tests that talk to a real server: free ports, waiting on a condition, and
reading its Prometheus text."""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, seconds: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `condition` until it holds or `seconds` pass; its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def scrape(server) -> str:
    """The /metrics text of a server (anything with a `metrics_port`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of series `name{labels}` in Prometheus text; 0 when absent."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)
