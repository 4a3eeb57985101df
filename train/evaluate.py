"""Task metrics measured through loraquilt's own engine: greedy answers to the eval rows,
batched, on the base model, one adapter or a weighted mix - the same answers a client of
`loraquilt serve` gets for the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraquilt.train.data import Example
from loraquilt.train.metrics import metric_function


@dataclass(frozen=True)
class Measurement:
    metric: str
    rate: float  # mean score in [0, 1]
    answers: tuple[str, ...]  # greedy answer per eval row, in row order
    scores: tuple[float, ...]


def open_engine(model_folder: Path | str, *, max_lora_rank: int = 16, max_adapters: int = 8,
                max_batch_size: int = 32, max_seq_len: int = 512):
    """An engine for evaluation: the served NF4 model, room for a few adapters, quiet."""
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.weights import DeviceConfig

    # float32: the exact path, which the training report checks against PEFT token for token
    return Engine(EngineConfig(
        model=str(model_folder), device=DeviceConfig(dtype="float32"), max_batch_size=max_batch_size, max_seq_len=max_seq_len,
        max_active_adapters=max_adapters, max_cpu_adapters=max_adapters,
        max_lora_rank=max(16, max_lora_rank), progress=False,
    ))


def request_for(example: Example, *, max_new_tokens: int, adapter: str | None = None,
                mix: Sequence[tuple[str, float]] = ()):
    """The request a client would send for this row: its plain prompt, or its chat turns."""
    from loraquilt.server.request import Request, SamplingParams

    greedy = SamplingParams(max_new_tokens=max_new_tokens)
    if example.messages is not None:
        return Request(messages=tuple(example.messages), adapter=adapter, mix=tuple(mix), sampling=greedy)
    return Request(prompt=example.prompt, adapter=adapter, mix=tuple(mix), sampling=greedy)


def generate_answers(engine, examples: Sequence[Example], *, max_new_tokens: int, adapter: str | None = None,
                     mix: Sequence[tuple[str, float]] = ()) -> list[str]:
    requests = [request_for(e, max_new_tokens=max_new_tokens, adapter=adapter, mix=mix) for e in examples]
    return [result.text for result in engine.generate(requests)]


def measure(engine, examples: Sequence[Example], metric: str, *, max_new_tokens: int,
            adapter: str | None = None, mix: Sequence[tuple[str, float]] = ()) -> Measurement:
    """Greedy answers on the engine and their metric against each row's completion."""
    function = metric_function(metric)
    answers = generate_answers(engine, examples, max_new_tokens=max_new_tokens, adapter=adapter, mix=mix)
    scores = tuple(function(answer, example.completion) for answer, example in zip(answers, examples))
    return Measurement(metric, sum(scores) / len(scores), tuple(answers), scores)
