"""How much arithmetic a `bench serve` workload needs, and what share of the machine's GEMM
rate a run reached (`compute_bound_fraction`).

Counted: the GEMMs that dominate a small Llama at these lengths, 2 FLOPs per multiply-add.

* every quantized projection (q, k, v, o, gate, up, down in every layer) runs once per token
  fed to the model: the prompt tokens and every generated token but the last (the last one
  is returned, never fed back), so ``prompt + generated - 1`` tokens per request;
* the lm_head runs once per generated token (the server computes logits only for each
  sequence's last position: one row at the end of the prefill, one per decode step);
* LoRA: ``2 * rank * (in + out)`` per targeted projection and layer, for every token fed
  for a request on an adapter (shrink ``x @ A.T`` then expand ``t @ B.T``).

Not counted: attention scores and values (``~4 * context * q_size`` per token and layer:
under 2% here at contexts under 100), norms, rotary, activations, sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraquilt.bench.workload import ADAPTER_SHAPES, ALL_PROJECTIONS


@dataclass(frozen=True)
class FlopModel:
    num_layers: int
    projection_shapes: dict[str, tuple[int, int]]  # projection -> (out, in), per layer
    lm_head_params: int  # vocab * hidden

    @classmethod
    def from_folder(cls, folder: Path) -> FlopModel:
        from loraquilt.server.model.config import load_model_config

        config = load_model_config(folder)
        return cls(config.num_layers, {p: config.projection_shape(p) for p in ALL_PROJECTIONS},
                   config.vocab_size * config.hidden_size)

    @property
    def projection_params(self) -> int:
        """Parameters of every quantized projection, all layers."""
        return self.num_layers * sum(out * in_ for out, in_ in self.projection_shapes.values())

    def token_gemms(self) -> list[tuple[int, int, int]]:
        """(out, in, count) of every distinct weight shape one token's forward multiplies by:
        the projections (count = layers x projections of that shape) and the lm_head (once).
        Timing these at the decode batch's rows gives the GEMM rate this model can reach."""
        counts: dict[tuple[int, int], int] = {}
        for shape in self.projection_shapes.values():
            counts[shape] = counts.get(shape, 0) + self.num_layers
        hidden = self.projection_shapes["q_proj"][1]
        head = (self.lm_head_params // hidden, hidden)
        counts[head] = counts.get(head, 0) + 1
        return [(out, in_, count) for (out, in_), count in counts.items()]

    def lora_flops_per_token(self, rank: int, targets: Sequence[str]) -> int:
        """2 * rank * (in + out) per targeted projection, summed over layers."""
        return self.num_layers * sum(2 * rank * sum(self.projection_shapes[p]) for p in targets)


@dataclass(frozen=True)
class RequestWork:
    prompt_tokens: int
    generated_tokens: int
    adapter_kind: str | None = None  # a key of workload.ADAPTER_SHAPES; None = base model


def workload_flops(model: FlopModel, requests: Sequence[RequestWork]) -> float:
    """FLOPs of serving these requests (see the module docstring for what is counted)."""
    total = 0
    for request in requests:
        fed = request.prompt_tokens + max(0, request.generated_tokens - 1)
        total += 2 * model.projection_params * fed + 2 * model.lm_head_params * request.generated_tokens
        if request.adapter_kind is not None:
            rank, _, targets = ADAPTER_SHAPES[request.adapter_kind]
            total += model.lora_flops_per_token(rank, targets) * fed
    return float(total)


def compute_bound_fraction(flops: float, wall_s: float, gflops: float) -> float | None:
    """The share of a GEMM rate (GFLOP/s) a run of ``flops`` in ``wall_s`` seconds reached."""
    if not wall_s or not gflops:
        return None
    return flops / (wall_s * gflops * 1e9)
