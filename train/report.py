"""The training report: one small JSON file beside the adapter it describes.

    {"adapter": {...files, bytes, parameters},  "model": {...},  "settings": {...},
     "runtime": {...},  "data": {...rows, format},  "training": {...steps, minutes, loss},
     "eval": {"loss_base", "loss", "metric", "base", "adapter", "ratio", "samples"},
     "peft_check": {...} | null,  "versions": {...}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from loraquilt.train.config import Runtime, TrainConfig
from loraquilt.train.data import Example
from loraquilt.train.evaluate import Measurement
from loraquilt.train.loop import LoopStats
from loraquilt.train.metrics import ratio

REPORT_NAME = "training_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SAMPLES = 5


def adapter_bytes(folder: Path) -> int:
    """Bytes of the adapter's weights file (what a server holds per adapter, as stored)."""
    return (Path(folder) / "adapter_model.safetensors").stat().st_size


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("loraquilt", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def eval_section(examples: list[Example], loss_base: float, loss: float, base: Measurement,
                 adapter: Measurement, max_new_tokens: int, source: str) -> dict:
    samples = [{"prompt": e.user_text, "reference": e.completion, "base": b, "adapter": a}
               for e, b, a in zip(examples[:SAMPLES], base.answers, adapter.answers)]
    return {
        "source": source,
        "rows": len(examples),
        "loss_base": round(loss_base, 5),
        "loss": round(loss, 5),
        "metric": adapter.metric,
        "base": round(base.rate, 4),
        "adapter": round(adapter.rate, 4),
        "ratio": None if ratio(adapter.rate, base.rate) is None else round(ratio(adapter.rate, base.rate), 2),
        "generation": {"greedy": True, "max_new_tokens": max_new_tokens, "engine": "loraquilt"},
        "samples": samples,
    }


def build_report(*, config: TrainConfig, runtime: Runtime, model_name: str, model_folder: Path,
                 trainable: int, data: dict, stats: LoopStats, evaluation: dict,
                 peft_check: dict | None) -> dict:
    return {
        "adapter": {
            "folder": str(config.out),
            "files": list(ADAPTER_FILES),
            "bytes": adapter_bytes(config.out),
            "trainable_parameters": trainable,
        },
        "model": {"name": model_name, "folder": str(model_folder)},
        "settings": config.settings(),
        "runtime": asdict(runtime),
        "data": data,
        "training": {
            "steps": stats.steps,
            "seconds": round(stats.seconds, 2),
            "minutes": round(stats.seconds / 60, 2),
            "seconds_per_step": round(stats.seconds / max(1, stats.steps), 3),
            "tokens": stats.tokens,
            "first_loss": round(stats.first_loss, 5),
            "final_loss": round(stats.final_loss, 5),
            "loss_curve": [list(point) for point in stats.loss_curve],
        },
        "eval": evaluation,
        "peft_check": peft_check,
        "versions": versions(),
    }


def write_json(path: Path, value: dict) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_report(folder: Path) -> dict | None:
    path = Path(folder) / REPORT_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def summary_line(report: dict) -> str:
    evaluation, training = report["eval"], report["training"]
    return (f"{training['steps']} steps in {training['minutes']:.1f} min, loss {training['first_loss']:.3f} -> "
            f"{training['final_loss']:.3f}; eval loss {evaluation['loss_base']:.3f} (base) -> "
            f"{evaluation['loss']:.3f}; {evaluation['metric']} {evaluation['base']:.2f} (base) -> "
            f"{evaluation['adapter']:.2f}; adapter {report['adapter']['bytes'] / 1024:.0f} KiB")
