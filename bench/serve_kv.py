"""The KV-cache scenarios of `loraquilt bench serve`: `prefix` (prefix caching on against
off) and `high_concurrency` (a paged cache admitting as many requests as its free blocks
hold, against 32 sequence slots, in the same memory).

Each scenario runs its own pair of `loraquilt serve --dtype float32` processes side by side
(started together after the other scenarios' systems have stopped, stopped at its end), with the
bench servers' other flags and a Prometheus endpoint each. Every request of a run is sent
at once as a stream; greedy decoding, exactly the scenario's new tokens per request. After
one warm-up request per adapter on each server, the two servers alternate run by run
(A, B, A, B, ...: `repeats` rounds).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraquilt.bench.serve_scenarios import median_run

Progress = Callable[[str], None]
DTYPE = "float32"  # the exact pair's server dtype
PREFIX_QUERIES = "loraquilt_prefix_cache_queries_total"  # prompt tokens looked up in the prefix cache
PREFIX_HITS = "loraquilt_prefix_cache_hits_total"  # of those, tokens found there
PREEMPTIONS = "loraquilt_preemptions_total"
KV_USAGE = "loraquilt_kv_cache_usage_ratio"
SLOTS = 32  # sequence slots of the fixed-slot cache `high_concurrency` compares against
PAGED_BATCH = 128  # --max-batch-size of the paged server there (at least the requests sent)


@dataclass(frozen=True)
class ServerSettings:
    """What every server of these scenarios shares with the bench's own servers."""

    model_folder: Path
    adapter_root: Path
    max_active_adapters: int
    max_cpu_adapters: int


def counter_total(samples: dict, name: str) -> float | None:
    """The sum of a metric's samples over every label set; None when the server has none."""
    values = [value for (sample, _), value in samples.items() if sample == name]
    return float(sum(values)) if values else None


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None else after - (before or 0.0)


def _ratio(a, b):
    return None if a is None or not b else a / b


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def kv_cache_mb(model_folder: Path, sequences: int, positions: int, dtype: str | None = None) -> float:
    """MiB that `sequences` x `positions` KV positions of the model take in `dtype` (float32)."""
    import torch

    from loraquilt.server.model.config import load_model_config
    from loraquilt.server.model.kv_cache import MIB, kv_bytes_per_position

    config = load_model_config(model_folder)
    per_position = kv_bytes_per_position(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                         head_dim=config.head_dim, dtype=getattr(torch, dtype or DTYPE))
    return sequences * positions * per_position / MIB


class ServerPair:
    """`loraquilt serve` processes by label, started side by side; leaving the `with` block
    stops them all (signalled together, then reaped), whatever happened inside."""

    def __init__(self, settings: ServerSettings, specs: dict[str, dict], progress: Progress):
        self.settings, self.specs, self.progress = settings, specs, progress
        self.servers: dict = {}

    def _start(self, label: str, spec: dict):
        from loraquilt.bench.server_side import ServedLoraQuilt, free_port

        extra = ("--dtype", DTYPE, *spec.get("extra_args", ()))
        self.progress(f"starting loraquilt serve --max-batch-size {spec['max_batch_size']} "
                      f"--max-seq-len {spec['max_seq_len']} {' '.join(extra)} ({label})")
        return ServedLoraQuilt(
            self.settings.model_folder, self.settings.adapter_root, port=free_port(),
            max_batch_size=spec["max_batch_size"], max_active_adapters=self.settings.max_active_adapters,
            max_cpu_adapters=self.settings.max_cpu_adapters, max_seq_len=spec["max_seq_len"],
            log=self.progress, metrics_port=free_port(), extra_args=extra)

    def __enter__(self) -> dict:
        pool = ThreadPoolExecutor(max_workers=len(self.specs))
        futures = {label: pool.submit(self._start, label, spec) for label, spec in self.specs.items()}
        try:
            for label, future in futures.items():
                self.servers[label] = future.result()
        except BaseException:  # a failed start or an interrupt: stop every server that did start
            for label, future in futures.items():
                if label not in self.servers:
                    try:
                        self.servers[label] = future.result()
                    except BaseException:
                        pass
            self.__exit__()
            raise
        finally:
            pool.shutdown(wait=False)
        return self.servers

    def __exit__(self, *exc) -> None:
        for server in self.servers.values():
            server.stop(wait=False)
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


def _register_and_warm(servers: dict, adapters: list[str], adapter_root: Path, folders: dict[str, Path],
                       warm_prompt: str) -> None:
    """Register the adapters on every server and put each onto the device with one short
    request (2 new tokens)."""
    for server in servers.values():
        for name in adapters:
            server.register(name, str(folders[name].relative_to(adapter_root)))
        server.throughput([warm_prompt] * len(adapters), list(adapters), 2)


def _run_summary(result) -> dict:
    return {"ttft_p50_ms": result.ttft_p50_ms, "ttft_p99_ms": result.ttft_p99_ms,
            "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
            "generated_tokens": result.generated_tokens}


def _median_by_ttft(results: list):
    """The run with the median TTFT p50 (the upper, slower one of an even count)."""
    return sorted(results, key=lambda r: r.ttft_p50_ms)[len(results) // 2]


def run_prefix(settings: ServerSettings, folders: dict[str, Path], tokenizer, *, requests: int, adapters: int,
               prefix_tokens: int, tail_tokens: tuple[int, int], new_tokens: int, max_batch_size: int,
               repeats: int, seed: int, warm_prompt: str, progress: Progress) -> dict:
    """`requests` requests in round-robin order over heavy-0..adapters-1; each adapter's
    requests share one instruction prefix of `prefix_tokens` tokens, then a unique tail.
    Every round draws fresh prefixes and tails (the same for both servers), so each run
    starts with none of its prefixes cached: what it reuses, it shares within the run."""
    from loraquilt.bench.workload import make_prefix_prompts

    names = [f"heavy-{i}" for i in range(adapters)]
    max_seq_len = max(256, round_up(prefix_tokens + tail_tokens[1] + new_tokens + 8, 128))
    spec = {"max_batch_size": max_batch_size, "max_seq_len": max_seq_len}
    specs = {"cache_on": {**spec, "extra_args": ("--prefix-cache",)},
             "cache_off": {**spec, "extra_args": ("--no-prefix-cache",)}}
    rounds = [make_prefix_prompts(tokenizer, requests, adapters, prefix_tokens, tail_tokens, seed + 1000 * r)
              for r in range(repeats)]
    runs: dict[str, list] = {label: [] for label in specs}
    with ServerPair(settings, specs, progress) as servers:
        dtypes = {label: server.served_dtype() for label, server in servers.items()}
        _register_and_warm(servers, names, settings.adapter_root, folders, warm_prompt)
        before = {label: server.scrape_metrics() for label, server in servers.items()}
        for index, prompts in enumerate(rounds):
            texts = [p.prompt for p in prompts]
            assigned = [names[p.adapter] for p in prompts]
            for label, server in servers.items():
                runs[label].append(server.stream_batch(texts, assigned, new_tokens))
            progress(f"prefix run {index + 1}/{repeats}: " + ", ".join(
                f"{label} ttft p50 {runs[label][-1].ttft_p50_ms:.0f} ms, {runs[label][-1].tokens_per_s:.1f} tok/s"
                for label in specs))
        after = {label: server.scrape_metrics() for label, server in servers.items()}
    out: dict = {}
    for label in specs:
        best = _median_by_ttft(runs[label])
        hits = _delta(counter_total(after[label], PREFIX_HITS), counter_total(before[label], PREFIX_HITS))
        queries = _delta(counter_total(after[label], PREFIX_QUERIES), counter_total(before[label], PREFIX_QUERIES))
        out[label] = {**_run_summary(best), "runs": [_run_summary(r) for r in runs[label]],
                      "prefix_cache_hit_tokens": hits, "prefix_cache_query_tokens": queries,
                      "prefix_cache_hit_fraction": _ratio(hits, queries), "served_dtype": dtypes[label],
                      "extra_args": ["--dtype", DTYPE, *specs[label]["extra_args"]]}
    prompt_tokens = [len(tokenizer(p.prompt)["input_ids"]) for p in rounds[0]]
    return {**out, "requests": requests, "adapters": names, "prefix_tokens": prefix_tokens,
            "tail_tokens": list(tail_tokens), "prompt_tokens_first_round": prompt_tokens,
            "new_tokens": new_tokens, "dtype": DTYPE, "max_batch_size": max_batch_size,
            "max_seq_len": max_seq_len, "repeats": repeats, "order_within_round": list(specs),
            "prompts": "fresh prefixes and tails every round, the same for both servers",
            "reported_run": "median TTFT p50 (upper of an even count)"}


def run_high_concurrency(settings: ServerSettings, folders: dict[str, Path], tokenizer, *, requests: int,
                         adapters: list[str], prompt_tokens: tuple[int, int], new_tokens: int, cache_positions: int,
                         max_seq_len: int, repeats: int, seed: int, warm_prompt: str,
                         progress: Progress) -> dict:
    """`requests` short requests (prompt + new tokens <= 128) at once, round robin over
    `adapters`, on two servers with the same KV pool (SLOTS x `cache_positions` positions):
    one admitting up to max(PAGED_BATCH, requests) sequences (as free blocks allow), one
    SLOTS. Prefix
    caching is off on both (the same prompts run every round)."""
    from loraquilt.bench.workload import make_bounded_prompts

    pool_mb = kv_cache_mb(settings.model_folder, SLOTS, cache_positions)
    common = ("--kv-cache-mb", f"{pool_mb:.4f}", "--no-prefix-cache")
    specs = {"paged": {"max_batch_size": max(PAGED_BATCH, requests), "max_seq_len": max_seq_len, "extra_args": common},
             "slots32": {"max_batch_size": SLOTS, "max_seq_len": max_seq_len, "extra_args": common}}
    prompts = make_bounded_prompts(tokenizer, requests, seed, *prompt_tokens)
    assigned = [adapters[i % len(adapters)] for i in range(requests)]
    runs: dict[str, list] = {label: [] for label in specs}
    with ServerPair(settings, specs, progress) as servers:
        dtypes = {label: server.served_dtype() for label, server in servers.items()}
        _register_and_warm(servers, adapters, settings.adapter_root, folders, warm_prompt)
        before = {label: server.scrape_metrics() for label, server in servers.items()}
        for index in range(repeats):
            for label, server in servers.items():
                runs[label].append(server.stream_batch(prompts, assigned, new_tokens))
            progress(f"high_concurrency run {index + 1}/{repeats}: " + ", ".join(
                f"{label} {runs[label][-1].tokens_per_s:.1f} tok/s ({runs[label][-1].wall_s:.1f} s)"
                for label in specs))
        after = {label: server.scrape_metrics() for label, server in servers.items()}
    details: dict = {}
    for label in specs:
        best, _ = median_run(runs[label])
        details[label] = {**_run_summary(best), "runs": [_run_summary(r) for r in runs[label]],
                          "max_batch_size": specs[label]["max_batch_size"], "served_dtype": dtypes[label],
                          "preemptions": _delta(counter_total(after[label], PREEMPTIONS),
                                                counter_total(before[label], PREEMPTIONS)),
                          "kv_cache_usage_ratio_after": counter_total(after[label], KV_USAGE),
                          "extra_args": ["--dtype", DTYPE, *common]}
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    paged, slotted = details["paged"], details["slots32"]
    return {"tokens_per_s": paged["tokens_per_s"], "slots32_tokens_per_s": slotted["tokens_per_s"],
            "ttft_p50_ms": paged["ttft_p50_ms"], "slots32_ttft_p50_ms": slotted["ttft_p50_ms"],
            **details, "kv_cache_mb": pool_mb, "kv_cache_positions": SLOTS * cache_positions,
            "requests": requests, "adapters": f"round robin over {', '.join(adapters)}",
            "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": new_tokens,
            "max_request_tokens": max(lengths) + new_tokens, "max_seq_len": max_seq_len, "dtype": DTYPE,
            "prefix_cache": False, "repeats": repeats, "order_within_round": list(specs),
            "reported_run": "median tokens/s (upper of an even count)"}
