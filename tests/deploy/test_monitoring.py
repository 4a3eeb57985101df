"""The monitoring kit in deploy/: the Grafana dashboard's queries name metrics the server
exports (fast), and, with Debian's `prometheus` package installed, a real Prometheus
scraping a live `loraquilt serve` under traffic answers every dashboard query with data,
and `promtool check metrics` finds nothing wrong with the /metrics text (slow)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fixtures_models import build_tiny_model, make_adapter_zoo

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "loraquilt.json"
METRIC = re.compile(r"\b(loraquilt_[a-z_]+)")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_names() -> set[str]:
    """Every series name the server's registry can export (counters with _total, histograms
    with _bucket/_sum/_count), read from the code's own Metrics object."""
    from loraquilt.server.metrics import Metrics

    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # the engine gauges come from a collector that needs an engine; take their names from the code
    source = (REPO / "server" / "metrics.py").read_text()
    names.update(re.findall(r'(?:Gauge|Counter)MetricFamily\(\s*"([a-z_]+)"', source))
    expanded = set(names)
    for name in names:
        expanded.update({f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return expanded


def test_every_dashboard_query_names_an_exported_metric():
    queries = dashboard_queries()
    assert len(queries) >= 20
    known = exported_names()
    for query in queries:
        names = METRIC.findall(query)
        assert names, query
        assert set(names) <= known, (query, set(names) - known)
    covered = " ".join(queries)
    for needed in ("generated_tokens", "time_to_first_token", "inter_token", "request_latency", "waiting_requests",
                   "batch_size", "loraquilt_adapters", "adapter_slots", "adapter_loads", "adapter_evictions",
                   "memory_bytes", "adapter_generated_tokens", "kv_cache_usage_ratio", "preemptions",
                   "prefix_cache_hits", "prefix_cache_queries"):
        assert needed in covered, needed


def test_compose_and_prometheus_files_agree():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    assert {"loraquilt", "prometheus", "grafana"} <= set(compose["services"])
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["loraquilt:9464"]
    mounts = " ".join(compose["services"]["grafana"]["volumes"])
    assert "loraquilt.json" in mounts and "provisioning" in mounts


# -- a real Prometheus ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


@pytest.mark.slow
def test_a_real_prometheus_answers_every_dashboard_query(tmp_path):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("needs Prometheus: apt-get install prometheus (Debian), which brings promtool")
    base = build_tiny_model(tmp_path / "base", "llama", seed=19)
    make_adapter_zoo(base, tmp_path / "adapters", count=4, seed=190)
    grpc_port, http_port, metrics_port, prometheus_port = free_port(), free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "loraquilt", "serve", "--model", str(base), "--adapter-root", str(tmp_path / "adapters"),
         "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
         "--max-active-adapters", "2", "--max-cpu-adapters", "2", "--resolve-adapters", "--lora-backend", "torch"],
        stderr=subprocess.PIPE, text=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "loraquilt", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    prometheus = None
    stop = threading.Event()
    try:
        for line in server.stderr:
            if "loraquilt serving" in line:
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def traffic():
            from loraquilt.client import LoraQuiltClient

            models = [None, "adapter-0", "adapter-1", "adapter-2", "adapter-3"]
            with LoraQuiltClient(f"127.0.0.1:{grpc_port}", timeout=60) as client, ThreadPoolExecutor(4) as pool:
                while not stop.is_set():
                    list(pool.map(lambda m: client.generate("The river", adapter=m or "", max_new_tokens=4,
                                                            ignore_eos=True), models))
                    client.generate("Numbers", mix=[("adapter-0", 0.5), ("adapter-3", 0.5)], max_new_tokens=3)
                    body = json.dumps({"model": "adapter-1", "prompt": "Hi", "max_tokens": 2}).encode()
                    urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{http_port}/v1/completions", data=body,
                        headers={"Content-Type": "application/json"}), timeout=60).read()

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        time.sleep(12)  # several scrapes under traffic
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked
        empty = []
        deadline = time.monotonic() + 60
        queries = [query.replace("$__rate_interval", "10s") for query in dashboard_queries()]
        while True:
            empty = [query for query in queries if not prometheus_query(prometheus_port, query)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not empty, empty
    finally:
        stop.set()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        server.terminate()
        server.wait(60)
