"""The `structured` scenario of `loraquilt bench serve`: what structured output costs, on one
`loraquilt serve --dtype float32 --no-prefix-cache` process of its own, driven over the
HTTP API as OpenAI clients call it.

24 chat requests on distinct adapters, sent at once, greedy; half of them (every other
one) with `response_format` json_schema (SCHEMA), against the same requests with no
constraint. The unconstrained rows generate exactly `new_tokens` (ignore_eos); in the
unconstrained run each formerly constrained row generates as many tokens as its
constrained answer had (measured in the warm-up: greedy answers do not change), so both
runs produce the same tokens per row and batch shapes, and the ratio of their tokens/s
(`structured_over_unconstrained`) is the constraint's own cost: compiling, the masks,
their application. Every constrained answer of the measured runs must parse and validate
against SCHEMA (`structured_valid_fraction`).

The two runs alternate (structured, unconstrained, ...: `repeats` rounds, after one
warm-up of each); each reports its median run.
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
LABEL = "structured_server"
SCHEMA = {  # a profile an extraction prompt asks for; strings and lists capped, so answers end
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
        "interests": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "interests", "employed"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "profile", "schema": SCHEMA, "strict": True}}


def _chat(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def closed_batch(port: int, bodies: list[dict]) -> tuple[dict, list[dict]]:
    """Every body sent at once: the run's figures, and the answers in order."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda body: _chat(port, body), bodies))
    wall = time.perf_counter() - start
    generated = sum(answer["usage"]["completion_tokens"] for answer in answers)
    return {"wall_s": wall, "generated_tokens": generated, "tokens_per_s": generated / wall}, answers


def valid(answer: dict) -> bool:
    """The answer's text parses as JSON and validates against SCHEMA."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def bodies_of(prompts: list[str], adapters: list[str], new_tokens: int, constrained: set[int],
              lengths: dict[int, int]) -> list[dict]:
    """One chat body per prompt; rows in `constrained` carry the schema, rows in `lengths`
    generate exactly that many tokens, the others exactly `new_tokens`."""
    bodies = []
    for index, prompt in enumerate(prompts):
        body = {"model": adapters[index], "temperature": 0, "max_tokens": new_tokens,
                "messages": [{"role": "user", "content": f"Describe someone as a JSON profile. {prompt}"}]}
        if index in constrained:
            body["response_format"] = RESPONSE_FORMAT
        else:
            body.update(ignore_eos=True, max_tokens=lengths.get(index, new_tokens))
        bodies.append(body)
    return bodies


def run_structured(settings: ServerSettings, folders: dict[str, Path], *, requests: int, prompts: list[str],
                   new_tokens: int, repeats: int, progress: Progress) -> dict:
    """The scenario's entry (`scenarios.structured.loraquilt`)."""
    from loraquilt.bench.server_side import free_port

    names = sorted(folders, key=lambda name: int(name.rsplit("-", 1)[1]))
    adapters = [names[index % len(names)] for index in range(requests)]
    texts = [prompts[index % len(prompts)] for index in range(requests)]
    constrained = set(range(0, requests, 2))
    http_port = free_port()
    extra = ("--no-prefix-cache", "--http-port", str(http_port))
    spec = {"max_batch_size": requests, "extra_args": extra, "max_seq_len": 512}
    with ServerPair(settings, {LABEL: spec}, progress) as servers:
        server = servers[LABEL]
        for name in sorted(set(adapters)):
            server.register(name, str(folders[name].relative_to(settings.adapter_root)))
        server.throughput(texts[:len(set(adapters))], adapters[:len(set(adapters))], 2)  # adapters onto the device
        structured = bodies_of(texts, adapters, new_tokens, constrained, {})
        _, answers = closed_batch(http_port, structured)  # warm-up; its lengths hold for every greedy run
        lengths = {index: answers[index]["usage"]["completion_tokens"] for index in constrained}
        unconstrained = bodies_of(texts, adapters, new_tokens, set(), lengths)
        closed_batch(http_port, unconstrained)
        progress(f"structured: {requests} requests on {len(set(adapters))} adapters, {len(constrained)} with a "
                 f"JSON schema, against none")
        runs: dict[str, list[dict]] = {"structured": [], "unconstrained": []}
        checked = passed = 0
        for index in range(repeats):
            found, answers = closed_batch(http_port, structured)
            runs["structured"].append(found)
            checked += len(constrained)
            passed += sum(valid(answers[row]) for row in constrained)
            runs["unconstrained"].append(closed_batch(http_port, unconstrained)[0])
            progress(f"structured run {index + 1}/{repeats}: " + ", ".join(
                f"{label} {found[-1]['tokens_per_s']:.1f} tok/s ({found[-1]['wall_s']:.1f} s)"
                for label, found in runs.items()))
        served = server.served_dtype()
    medians = {label: {**sorted(found, key=lambda run: run["tokens_per_s"])[len(found) // 2], "runs": found}
               for label, found in runs.items()}
    return {**medians, "tokens_per_s": medians["structured"]["tokens_per_s"],
            "unconstrained_tokens_per_s": medians["unconstrained"]["tokens_per_s"],
            "structured_over_unconstrained": medians["structured"]["tokens_per_s"] /
            medians["unconstrained"]["tokens_per_s"],
            "structured_valid_fraction": passed / checked if checked else None,
            "requests": requests, "constrained_requests": len(constrained), "adapters": len(set(adapters)),
            "new_tokens": new_tokens, "constrained_lengths": sorted(lengths.values()), "schema": SCHEMA,
            "served_dtype": served, "dtype": DTYPE, "prefix_cache": False, "repeats": repeats,
            "reported_run": "median (upper of an even count)"}
