"""The log-probability scenarios of `loraquilt bench serve`, on one `loraquilt serve --dtype
float32 --no-prefix-cache` process of their own, driven over the HTTP API (the calls
lm-evaluation-harness and OpenAI clients make):

- `echo`: prompts of a fixed length on one adapter, sent at once, scored with echo
  (completions `echo: true, logprobs: 1, max_tokens: 0`: every prompt token's log
  probability, lm-eval's loglikelihood call) against the same prompts' prefill alone
  (`max_tokens: 1`, no echo). `echo_over_prefill`: the ratio of their wall times.
- `logprobs`: the bench's prompts on distinct adapters, T new tokens each, with
  `logprobs: 5` (five alternatives per token) on every row against without.
  `logprobs_over_plain`: the ratio of their generated tokens/s.

Within a scenario the two kinds of run alternate (plain, scored, plain, ...: `repeats`
rounds, after one warm-up of each); each kind reports its median run, and the ratio is the
median of the rounds' ratios (a round's two runs see the same load on a shared machine).
The prefix cache is off:
the repeated prompts would otherwise come from it in the plain runs only (a request that
scores its prompt reuses no cached block it has not scored).
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from loraquilt.bench.serve_kv import DTYPE, ServerPair, ServerSettings

Progress = Callable[[str], None]
LABEL = "logprobs_server"


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def closed_batch(port: int, bodies: list[dict]) -> dict:
    """Every body sent at once; wall time, and the tokens scored and generated."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda body: _post(port, body), bodies))
    wall = time.perf_counter() - start
    generated = sum(answer["usage"]["completion_tokens"] for answer in answers)
    scored = sum(len(answer["choices"][0]["logprobs"]["tokens"]) for answer in answers
                 if answer["choices"][0].get("logprobs"))
    return {"wall_s": wall, "generated_tokens": generated, "tokens_per_s": generated / wall,
            "logprob_entries": scored}


def _median(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the upper one of an even count)."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def _round_ratio(runs: dict[str, list[dict]], top: str, bottom: str, key: str) -> tuple[float, list[float]]:
    """The median over rounds of top's `key` / bottom's (the upper one of an even count), and each round's."""
    each = [a[key] / b[key] for a, b in zip(runs[top], runs[bottom])]
    return sorted(each)[len(each) // 2], each


def _alternate(port: int, kinds: dict[str, list[dict]], repeats: int, name: str, key: str,
               progress: Progress) -> dict[str, dict]:
    """One warm-up of each kind, then `repeats` rounds of each in turn; per kind its median
    run (by `key`) and every run."""
    for bodies in kinds.values():
        closed_batch(port, bodies)
    runs: dict[str, list[dict]] = {label: [] for label in kinds}
    for index in range(repeats):
        for label, bodies in kinds.items():
            runs[label].append(closed_batch(port, bodies))
        progress(f"{name} run {index + 1}/{repeats}: " + ", ".join(
            f"{label} {runs[label][-1]['wall_s']:.2f} s ({runs[label][-1]['tokens_per_s']:.1f} tok/s)"
            for label in kinds))
    return {label: {**_median(found, key), "runs": found} for label, found in runs.items()}


def run_logprob_scenarios(settings: ServerSettings, folders: dict[str, Path], tokenizer, *, wanted: set[str],
                          echo_prompts: int, echo_prompt_tokens: int, prompts: list[str], new_tokens: int,
                          repeats: int, seed: int, warm_prompt: str, progress: Progress) -> dict[str, dict]:
    """{"echo": ..., "logprobs": ...} for the scenarios in `wanted`, on one server."""
    from loraquilt.bench.server_side import free_port
    from loraquilt.bench.workload import make_bounded_prompts

    adapters = [f"heavy-{index}" for index in range(min(len(prompts), len(folders)))]
    http_port = free_port()
    extra = ("--no-prefix-cache", "--http-port", str(http_port))
    spec = {"max_batch_size": max(len(prompts), echo_prompts), "extra_args": extra,
            "max_seq_len": max(256, echo_prompt_tokens + 8)}
    out: dict[str, dict] = {}
    with ServerPair(settings, {LABEL: spec}, progress) as servers:
        server = servers[LABEL]
        for name in adapters:
            server.register(name, str(folders[name].relative_to(settings.adapter_root)))
        server.throughput([warm_prompt] * len(adapters), list(adapters), 2)  # the adapters onto the device
        common = {"served_dtype": server.served_dtype(), "dtype": DTYPE, "prefix_cache": False, "repeats": repeats,
                  "extra_args": ["--dtype", DTYPE, *extra[:1]], "reported_run": "median (upper of an even count)"}
        if "echo" in wanted:
            texts = make_bounded_prompts(tokenizer, echo_prompts, seed, echo_prompt_tokens, echo_prompt_tokens)
            base = {"model": adapters[0], "prompt": None, "temperature": 0}
            kinds = {"prefill": [{**base, "prompt": text, "max_tokens": 1, "ignore_eos": True} for text in texts],
                     "echo": [{**base, "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0}
                              for text in texts]}
            progress(f"echo: {echo_prompts} prompts of {echo_prompt_tokens} tokens on {adapters[0]}, "
                     "echo + logprobs 1 + max_tokens 0 against the prefill alone")
            found = _alternate(http_port, kinds, repeats, "echo", "wall_s", progress)
            ratio, rounds = _round_ratio({label: entry["runs"] for label, entry in found.items()}, "echo", "prefill",
                                         "wall_s")
            lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
            out["echo"] = {**found, **common, "wall_s": found["echo"]["wall_s"],
                           "prefill_wall_s": found["prefill"]["wall_s"],
                           "echo_over_prefill": ratio, "echo_over_prefill_rounds": rounds,
                           "prompts": echo_prompts, "prompt_tokens": [min(lengths), max(lengths)],
                           "adapter": adapters[0]}
        if "logprobs" in wanted:
            kinds = {label: [{"model": adapters[index % len(adapters)], "prompt": text, "max_tokens": new_tokens,
                              "temperature": 0, "ignore_eos": True, **extra_fields}
                             for index, text in enumerate(prompts)]
                     for label, extra_fields in (("plain", {}), ("logprobs", {"logprobs": 5}))}
            progress(f"logprobs: {len(prompts)} requests x {new_tokens} tokens on {len(adapters)} adapters, "
                     "logprobs 5 on every row against none")
            found = _alternate(http_port, kinds, repeats, "logprobs", "tokens_per_s", progress)
            ratio, rounds = _round_ratio({label: entry["runs"] for label, entry in found.items()}, "logprobs",
                                         "plain", "tokens_per_s")
            out["logprobs"] = {**found, **common, "tokens_per_s": found["logprobs"]["tokens_per_s"],
                               "plain_tokens_per_s": found["plain"]["tokens_per_s"],
                               "logprobs_over_plain": ratio, "logprobs_over_plain_rounds": rounds,
                               "requests": len(prompts), "new_tokens": new_tokens, "top_logprobs": 5,
                               "adapters": f"round robin over {len(adapters)} heavy adapters"}
    return out
