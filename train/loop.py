"""The training loop (shuffled batches, AdamW, warmup then linear decay, a progress bar with
the loss) and the eval loss. Plain torch: every step is visible here."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from loraquilt.train.data import TokenizedExample, collate
from loraquilt.train.qlora import ScaleJitter, completion_loss

LOSS_CURVE_POINTS = 50  # the report keeps about this many points of the loss curve


@dataclass(frozen=True)
class LoopStats:
    steps: int
    seconds: float
    tokens: int  # input tokens processed (completion and prompt, without padding)
    first_loss: float
    final_loss: float  # mean of the last 10% of the steps
    loss_curve: tuple[tuple[int, float], ...]  # (step, mean loss over the steps since the last point)


def planned_steps(rows: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    per_epoch = math.ceil(rows / batch_size)
    return max_steps if max_steps is not None else per_epoch * epochs


def batch_order(rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices per step: a fresh seeded permutation per epoch; the last, short batch
    of an epoch is kept."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(rows, generator=generator).tolist()
        batches += [order[i:i + batch_size] for i in range(0, rows, batch_size)]
    return batches[:steps]


def warmup_then_linear(optimizer: torch.optim.Optimizer, warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, examples: list[TokenizedExample], *,
          batch_size: int, steps: int, warmup: int, seed: int, pad_id: int, device: str,
          scale_range: tuple[float, float] = (1.0, 1.0), progress: bool = True) -> LoopStats:
    """`steps` optimizer steps over `examples`; gradients clipped to norm 1; with a
    scale_range other than (1, 1) each step scales the LoRA deltas by a random factor in it."""
    from tqdm.auto import tqdm

    schedule = warmup_then_linear(optimizer, warmup, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    jitter = ScaleJitter(model, *scale_range, seed=seed) if scale_range != (1.0, 1.0) else None
    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(batch_order(len(examples), batch_size, steps, seed), desc="training", unit="step",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for indices in bar:
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
        if jitter is not None:
            jitter.step()
        loss = completion_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {len(losses) + 1}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        recent = losses[-10:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    bar.close()
    if jitter is not None:
        jitter.restore()
    tail = losses[-max(1, len(losses) // 10):]
    return LoopStats(
        steps=len(losses), seconds=time.perf_counter() - started, tokens=tokens,
        first_loss=losses[0], final_loss=sum(tail) / len(tail), loss_curve=_curve(losses),
    )


def _curve(losses: list[float]) -> tuple[tuple[int, float], ...]:
    every = max(1, math.ceil(len(losses) / LOSS_CURVE_POINTS))
    points = []
    for end in range(every, len(losses) + every, every):
        chunk = losses[end - every:end]
        points.append((min(end, len(losses)), round(sum(chunk) / len(chunk), 5)))
    return tuple(points)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[TokenizedExample], *, batch_size: int, pad_id: int,
              device: str) -> float:
    """Mean cross-entropy per completion token over `examples` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        kept = int((batch["labels"][:, 1:] != -100).sum())
        total += completion_loss(model, batch).item() * kept
        count += kept
    model.train(was_training)
    return total / max(1, count)
