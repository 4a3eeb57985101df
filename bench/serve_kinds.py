"""The adapter-kind scenarios of `loraquilt bench serve`, each on `loraquilt serve --dtype
float32` processes of its own, driven over gRPC:

- `merge`: three heavy adapters, resident; the first request of a `ties` merge of them
  (density 0.5) builds its derived adapter: `first_request_s` (its first token, build
  included) and `build_s` (the server's own build time, from
  loraquilt_derived_adapter_build_seconds). Then B requests on that merge against B on one
  of its members alone, T tokens each, alternating rounds: `merge_over_single`, the median
  of the rounds' tokens/s ratios.
- `dora`: B requests on B distinct DoRA adapters (the heavy adapters' A and B with
  magnitude vectors) against B on the B distinct heavy adapters, alternating rounds:
  `dora_over_plain`.
- `alora`: a conversation of `alora_history_tokens` tokens the base model has read,
  answered in turn by `alora_turns` adapters (each turn appends its invocation and a short
  answer, so the history grows), on three servers side by side: aLoRA adapters (the heavy
  adapters' weights with an invocation each), the base model continuing the same prompts,
  and the heavy adapters as plain LoRA. Each turn measures the time to the first token of
  the turn's prompt on each server (systems alternating); `conversations` conversations
  of fresh text. `alora_over_base` and `plain_over_alora`: medians of the turns' ratios.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from loraquilt.bench.serve_kv import DTYPE, ServerPair, ServerSettings, counter_total

Progress = Callable[[str], None]
MERGE_WEIGHTS = (0.5, 0.3, 0.4)
MERGE = {"method": "ties", "density": 0.5}
BUILD_SECONDS = "loraquilt_derived_adapter_build_seconds_sum"
ANSWER = " The answer looks right to me."


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def dora_folder(plain: Path, out: Path, seed: int) -> Path:
    """The plain adapter's A and B as a PEFT DoRA adapter: a magnitude vector per module
    (seeded, 0.8-1.2 per row); written once."""
    if (out / "adapter_model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(tensors):
        if key.endswith(".lora_B.weight"):
            rows = tensors[key].shape[0]
            tensors[key.removesuffix(".lora_B.weight") + ".lora_magnitude_vector"] = \
                0.8 + 0.4 * torch.rand(rows, generator=generator)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = json.loads((plain / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}, indent=2))
    return out


def alora_folder(plain: Path, out: Path, invocation: list[int]) -> Path:
    """The plain adapter as an aLoRA adapter with this invocation (its weights hard-linked)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "adapter_model.safetensors"
    if not target.exists():
        os.link(plain / "adapter_model.safetensors", target)
    config = json.loads((plain / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": invocation}, indent=2))
    return out


def _closed_batch(server, prompts: list[str], fields: list[dict], new_tokens: int) -> dict:
    """Every request sent at once over gRPC; generated tokens/s over the wall time."""
    def call(index: int) -> int:
        reply = server.client.generate(prompts[index], max_new_tokens=new_tokens, ignore_eos=True, **fields[index])
        return len(reply.token_ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        generated = sum(pool.map(call, range(len(prompts))))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "generated_tokens": generated, "tokens_per_s": generated / wall}


def _first_token_s(server, prompt: str, **fields) -> float:
    start = time.perf_counter()
    for piece in server.client.generate_stream(prompt, max_new_tokens=1, ignore_eos=True, **fields):
        if piece.token_ids:
            break
    return time.perf_counter() - start


def _alternate(server, kinds: dict[str, tuple[list[str], list[dict]]], new_tokens: int, repeats: int, name: str,
               progress: Progress) -> dict[str, list[dict]]:
    """One warm-up of each kind, then `repeats` rounds of each in turn."""
    for prompts, fields in kinds.values():
        _closed_batch(server, prompts, fields, 2)
    runs: dict[str, list[dict]] = {label: [] for label in kinds}
    for index in range(repeats):
        for label, (prompts, fields) in kinds.items():
            runs[label].append(_closed_batch(server, prompts, fields, new_tokens))
        progress(f"{name} run {index + 1}/{repeats}: " + ", ".join(
            f"{label} {found[-1]['tokens_per_s']:.1f} tok/s" for label, found in runs.items()))
    return runs


def _summary(runs: dict[str, list[dict]], top: str, bottom: str) -> dict:
    rounds = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[top], runs[bottom])]
    medians = {label: _median([run["tokens_per_s"] for run in found]) for label, found in runs.items()}
    return {"tokens_per_s": medians, "ratio": _median(rounds), "rounds": rounds, "runs": runs}


def run_merge(settings: ServerSettings, heavy: list[Path], prompts: list[str], new_tokens: int, repeats: int,
              progress: Progress) -> dict:
    from loraquilt.v1 import loraquilt_pb2 as pb

    members = [f"heavy-{index}" for index in range(len(MERGE_WEIGHTS))]
    spec = {"max_batch_size": len(prompts), "max_seq_len": 256}
    with ServerPair(settings, {"merge_server": spec}, progress) as servers:
        server = servers["merge_server"]
        for name, folder in zip(members, heavy):
            server.register(name, str(folder.relative_to(settings.adapter_root)))
        server.throughput([prompts[0]] * len(members), members, 2)  # the members resident, on the device
        mix = list(zip(members, MERGE_WEIGHTS))
        merge = pb.Merge(method=MERGE["method"], density=MERGE["density"])
        progress(f"merge: the first request of a ties merge of {len(members)} resident adapters (builds it)")
        first = _first_token_s(server, prompts[0], mix=mix, merge=merge)
        build = counter_total(server.scrape_metrics(), BUILD_SECONDS)
        again = _first_token_s(server, prompts[0], mix=mix, merge=merge)
        fields = {"merged": [{"mix": mix, "merge": merge}] * len(prompts),
                  "single": [{"adapter": members[0]}] * len(prompts)}
        progress(f"merge: {len(prompts)} requests x {new_tokens} tokens on the merge against one member alone")
        runs = _alternate(server, {label: (prompts, found) for label, found in fields.items()}, new_tokens,
                          repeats, "merge", progress)
    found = _summary(runs, "merged", "single")
    return {"first_request_s": first, "build_s": build, "second_request_s": again,
            "merge_over_single": found["ratio"], "merge_over_single_rounds": found["rounds"],
            "tokens_per_s": found["tokens_per_s"]["merged"], "single_tokens_per_s": found["tokens_per_s"]["single"],
            "runs": found["runs"], "members": len(members), "weights": list(MERGE_WEIGHTS), **MERGE,
            "requests": len(prompts), "new_tokens": new_tokens, "dtype": DTYPE, "repeats": repeats}


def run_dora(settings: ServerSettings, heavy: list[Path], prompts: list[str], new_tokens: int, repeats: int,
             seed: int, progress: Progress) -> dict:
    count = len(prompts)
    dora = [dora_folder(folder, folder.parent / f"dora-{index}", seed + index)
            for index, folder in enumerate(heavy[:count])]
    spec = {"max_batch_size": count, "max_seq_len": 256}
    with ServerPair(settings, {"dora_server": spec}, progress) as servers:
        server = servers["dora_server"]
        for index in range(count):
            server.register(f"heavy-{index}", str(heavy[index].relative_to(settings.adapter_root)))
            server.register(f"dora-{index}", str(dora[index].relative_to(settings.adapter_root)))
        kinds = {label: (prompts, [{"adapter": f"{label}-{index}"} for index in range(count)])
                 for label in ("dora", "heavy")}
        progress(f"dora: {count} requests x {new_tokens} tokens on distinct DoRA adapters against distinct plain ones")
        runs = _alternate(server, kinds, new_tokens, repeats, "dora", progress)
    found = _summary(runs, "dora", "heavy")
    return {"dora_over_plain": found["ratio"], "dora_over_plain_rounds": found["rounds"],
            "tokens_per_s": found["tokens_per_s"]["dora"], "plain_tokens_per_s": found["tokens_per_s"]["heavy"],
            "runs": found["runs"], "requests": count, "new_tokens": new_tokens, "dtype": DTYPE, "repeats": repeats}


def _invocation(tokenizer, index: int) -> tuple[str, list[int]]:
    text = f"\n<|im_start|>check{index}\n"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def _holds(tokenizer, prompt: str, invocation: list[int]) -> bool:
    ids = tokenizer(prompt)["input_ids"]
    width = len(invocation)
    return any(ids[start:start + width] == invocation for start in range(len(ids) - width + 1))


def run_alora(settings: ServerSettings, heavy: list[Path], tokenizer, *, history_tokens: int, turns: int,
              conversations: int, seed: int, progress: Progress) -> dict:
    from loraquilt.bench.workload import make_bounded_prompts

    invocations = [_invocation(tokenizer, index) for index in range(turns)]
    alora = [alora_folder(heavy[index], heavy[index].parent / f"alora-{index}", ids)
             for index, (_, ids) in enumerate(invocations)]
    histories = make_bounded_prompts(tokenizer, conversations, seed, history_tokens, history_tokens)
    max_seq_len = history_tokens + turns * 24 + 64
    spec = {"max_batch_size": 4, "max_seq_len": max_seq_len}
    labels = {"alora": "alora_server", "base": "base_server", "plain": "plain_server"}
    ttft: dict[str, list[float]] = {system: [] for system in labels}
    with ServerPair(settings, {label: spec for label in labels.values()}, progress) as servers:
        for index in range(turns):
            servers[labels["alora"]].register(f"alora-{index}", str(alora[index].relative_to(settings.adapter_root)))
            servers[labels["plain"]].register(f"heavy-{index}", str(heavy[index].relative_to(settings.adapter_root)))
        for system, adapter in (("alora", "alora-{}"), ("plain", "heavy-{}")):  # every adapter onto the device
            server = servers[labels[system]]
            server.throughput(["warm up"] * turns, [adapter.format(index) for index in range(turns)], 2)
        adapters = {"alora": "alora-{}", "base": "", "plain": "heavy-{}"}
        progress(f"alora: {conversations} conversations of {history_tokens} tokens, answered in turn by {turns} "
                 "adapters: aLoRA vs the base model continuing vs plain LoRA")
        for number, history in enumerate(histories):
            for server in servers.values():  # the base model has read the conversation
                _first_token_s(server, history)
            prompt = history
            for turn, (text, ids) in enumerate(invocations):
                prompt += text
                if not _holds(tokenizer, prompt, ids):
                    raise RuntimeError(f"the invocation {text!r} does not tokenize the same inside the prompt")
                order = list(labels) if turn % 2 == 0 else list(reversed(labels))
                for system in order:
                    adapter = adapters[system].format(turn)
                    ttft[system].append(_first_token_s(servers[labels[system]], prompt, adapter=adapter))
                progress(f"alora conversation {number + 1}, turn {turn + 1}: first token "
                         + ", ".join(f"{system} {ttft[system][-1] * 1e3:.0f} ms" for system in labels))
                prompt += ANSWER
    alora_over_base = [a / b for a, b in zip(ttft["alora"], ttft["base"])]
    plain_over_alora = [p / a for p, a in zip(ttft["plain"], ttft["alora"])]
    return {"alora_over_base": _median(alora_over_base), "plain_over_alora": _median(plain_over_alora),
            "ttft_p50_ms": {system: _median(values) * 1e3 for system, values in ttft.items()},
            "ttft_ms": {system: [value * 1e3 for value in values] for system, values in ttft.items()},
            "history_tokens": history_tokens, "turns": turns, "conversations": conversations,
            "dtype": DTYPE, "prefix_cache": True}
