"""Every Prometheus metric of the server, in one registry.

Counters and histograms are updated as requests move; gauges that describe state
(running/waiting requests, adapters per tier, memory) are read from the engine at scrape
time, so they are never stale. Latency histograms carry a `kind` label ("base",
"adapter", "mix"): bounded cardinality, whatever the number of adapters.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def request_kind(adapter_weights) -> str:
    if not adapter_weights:
        return "base"
    return "adapter" if len(adapter_weights) == 1 else "mix"


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best portable figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


OTHER_ADAPTERS = "_other"


class AdapterLabels:
    """Bounded cardinality for per-adapter series: the first `limit` adapter names seen get
    a label of their own, every later one shares OTHER_ADAPTERS."""

    def __init__(self, limit: int):
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def label(self, name: str, known: bool = True) -> str:
        """known=False (a name that is not registered) never takes a label of its own."""
        with self._lock:
            if name in self._named:
                return name
            if known and len(self._named) < self.limit:
                self._named.add(name)
                return name
            return OTHER_ADAPTERS


class Metrics:
    def __init__(self, adapter_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.adapter_labels = AdapterLabels(adapter_labels)
        self.adapter_requests = Counter("loraquilt_adapter_requests", "Finished requests per adapter (a mix "
                                        "counts for each member) by status", ["adapter", "status"], registry=r)
        self.adapter_generated_tokens = Counter("loraquilt_adapter_generated_tokens", "Tokens generated per "
                                                "adapter (a mix counts for each member)", ["adapter"], registry=r)
        self.requests = Counter("loraquilt_requests", "Finished requests by status", ["status"], registry=r)
        self.ttft = Histogram("loraquilt_time_to_first_token_seconds", "Arrival to first token",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("loraquilt_inter_token_latency_seconds", "Time between tokens",
                                     ["kind"], buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("loraquilt_request_latency_seconds", "Arrival to last token",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraquilt_queue_time_seconds", "Arrival to admission",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraquilt_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("loraquilt_generated_tokens", "Tokens generated", registry=r)
        self.adapter_loads = Counter("loraquilt_adapter_loads", "Adapter folders read and validated", registry=r)
        self.adapter_evictions = Counter("loraquilt_adapter_evictions", "Adapters evicted from a tier",
                                         ["tier"], registry=r)
        self.adapter_load_seconds = Histogram("loraquilt_adapter_load_seconds", "Time to read an adapter folder",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.derived_adapters = Counter("loraquilt_derived_adapters", "Derived adapters (non-linear merges) built",
                                        registry=r)
        self.derived_build_seconds = Histogram("loraquilt_derived_adapter_build_seconds",
                                               "Time to build a derived adapter's weights from its members",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.step_batch = Histogram("loraquilt_step_batch_size", "Sequences per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.http_requests = Counter("loraquilt_http_requests", "HTTP API responses by route and status code",
                                     ["route", "code"], registry=r)
        self.adapter_restore_failures = Counter(
            "loraquilt_adapter_restore_failures", "Recorded adapters (--state-dir) not registered again at start",
            registry=r)
        self._engine = None

    def watch(self, engine) -> None:
        """Read state gauges from this engine at every scrape."""
        self._engine = engine
        self.registry.register(_EngineCollector(self))

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)

    def on_adapter_load(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.adapter_load_seconds.observe(seconds)

    def on_derive(self, seconds: float) -> None:
        self.derived_adapters.inc()
        self.derived_build_seconds.observe(seconds)

    def on_adapter_evict(self, tier: str) -> None:
        self.adapter_evictions.labels(tier=tier).inc()

    def count_adapter_request(self, adapter_weights, status: str) -> None:
        """One finished request on these adapters (none: the base model, not counted here)."""
        known = status != "not_found"
        for name, _ in adapter_weights:
            self.adapter_requests.labels(adapter=self.adapter_labels.label(name, known), status=status).inc()

    def adapter_token_counters(self, adapter_weights) -> list:
        """The per-adapter token counters one request adds to (looked up once per request,
        not at every step)."""
        return [self.adapter_generated_tokens.labels(adapter=self.adapter_labels.label(name))
                for name, _ in adapter_weights]


class _EngineCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._last_lora_info: tuple = (None, 0.0)  # (label values, when they last changed)

    def collect(self):
        engine = self.metrics._engine
        running = GaugeMetricFamily("loraquilt_running_requests", "Sequences in the running batch")
        waiting = GaugeMetricFamily("loraquilt_waiting_requests", "Requests queued for admission")
        batch = GaugeMetricFamily("loraquilt_batch_size", "Sequences in the last engine step")
        adapters = GaugeMetricFamily("loraquilt_adapters", "Registered adapters by tier", labels=["tier"])
        slots = GaugeMetricFamily("loraquilt_adapter_slots", "Device adapter slots by state (used: holds "
                                  "an adapter, registered or still pinned after unregister)", labels=["state"])
        heads = GaugeMetricFamily("loraquilt_adapter_head_places", "Device places for adapters' own input "
                                  "embeddings / lm_head (--max-lora-head-adapters) by state", labels=["state"])
        memory = GaugeMetricFamily("loraquilt_memory_bytes", "Memory by kind", labels=["kind"])
        lora_info = GaugeMetricFamily(
            "loraquilt_lora_requests_info", "Adapters of the running and the waiting requests (comma-separated) "
            "and the device slots, as the Gateway API inference extension reads them; value: when they last "
            "changed (Unix seconds)", labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        kv_usage = GaugeMetricFamily("loraquilt_kv_cache_usage_ratio",
                                     "Fraction of the KV block pool held by running sequences")
        preemptions = CounterMetricFamily("loraquilt_preemptions", "Sequences preempted for KV blocks "
                                          "(their tokens recomputed when readmitted)")
        prefix_queries = CounterMetricFamily("loraquilt_prefix_cache_queries", "Prompt tokens looked up in the "
                                             "prefix cache (full blocks before each prompt's last token)")
        prefix_hits = CounterMetricFamily("loraquilt_prefix_cache_hits", "Prompt tokens served from the "
                                          "prefix cache (their KV not computed again)")
        threads = GaugeMetricFamily("loraquilt_engine_threads", "OpenMP threads of the engine's stepping "
                                    "thread (--threads; auto: fewer while other processes keep CPUs busy)")
        others_busy = GaugeMetricFamily("loraquilt_cpu_others_busy_cores", "CPUs of the process's affinity "
                                        "mask that other processes kept busy in the last window (--threads auto)")
        if engine is not None:
            stats = engine.stats()
            kv_usage.add_metric([], stats.kv_usage)
            preemptions.add_metric([], stats.preemptions)
            prefix_queries.add_metric([], stats.prefix_queries_tokens)
            prefix_hits.add_metric([], stats.prefix_hit_tokens)
            threads.add_metric([], engine.threads.count)
            if engine.threads.others_busy_cores is not None:
                others_busy.add_metric([], engine.threads.others_busy_cores)
            running.add_metric([], stats.running)
            waiting.add_metric([], stats.waiting)
            batch.add_metric([], stats.last_batch_size)
            for tier, count in engine.adapters.tier_counts().items():
                adapters.add_metric([tier], count)
            used = engine.adapters.slots_in_use()
            slots.add_metric(["used"], used)
            slots.add_metric(["free"], engine.slots.config.num_slots - used)
            heads.add_metric(["used"], engine.slots.heads.capacity - engine.slots.heads.free)
            heads.add_metric(["free"], engine.slots.heads.free)
            memory.add_metric(["base_weights"], engine.model.quantized_bytes() + engine.model.dense_bytes())
            memory.add_metric(["adapters"], engine.slots.num_bytes + engine.adapters.host_bytes())
            memory.add_metric(["adapter_slots"], engine.slots.num_bytes)
            memory.add_metric(["adapter_heads"], engine.slots.heads.num_bytes)  # within adapter_slots
            memory.add_metric(["adapters_host"], engine.adapters.host_bytes())
            memory.add_metric(["kv_cache"], engine.cache.num_bytes)
            running_names, waiting_names = engine.adapters_in_flight()
            now = (",".join(sorted(running_names)), ",".join(sorted(waiting_names)),
                   str(engine.config.max_active_adapters))
            if now != self._last_lora_info[0]:
                self._last_lora_info = (now, time.time())
            lora_info.add_metric(list(now), self._last_lora_info[1])
            if torch.cuda.is_available() and engine.model.device.type == "cuda":
                memory.add_metric(["device_allocated"], torch.cuda.memory_allocated(engine.model.device))
        memory.add_metric(["process_rss"], process_rss_bytes())
        yield from (running, waiting, batch, adapters, slots, memory)
        if engine is not None:
            yield from (heads, lora_info, kv_usage, preemptions, prefix_queries, prefix_hits, threads, others_busy)
