"""Demo adapters trained once and kept under ``<cache>/demo/<task>-<key>``.

The key hashes everything that shapes the adapter: the rows written by the task's code,
the training settings and the base model's files. A folder counts as done once its
training report exists (written last); a lock keeps two processes from training the
same adapter at once.

The package ships the three adapters that `loraquilt demo` trains on the embedded model
(``train/demo/shipped/<task>-<key>``: weights in bfloat16, with their training reports),
so a first run finds them by the same key and trains nothing; ``--retrain`` trains anew,
and ``loraquilt demo --write-shipped`` refreshes the shipped copies from the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraquilt.train.data import write_examples
from loraquilt.train.demo.tasks import DATA_SEED, DEFAULT_SETTINGS, DemoTask
from loraquilt.train.report import read_report

DEMO_FORMAT = 1  # bump when the demo's training code changes what an adapter learns
SHIPPED = Path(__file__).parent / "shipped"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was made from


@dataclass(frozen=True)
class DemoAdapter:
    task: DemoTask
    folder: Path  # PEFT folder with training_report.json
    report: dict
    trained_now: bool
    wall_seconds: float  # load + train + evaluate when trained now; 0 when cached
    shipped: bool = False  # the copy that comes with the package


def demo_root(cache_dir: Path | None = None) -> Path:
    from loraquilt.server.model.sources import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "demo"


def model_identity(model_folder: Path) -> dict:
    """What tells one base model from another without reading its weights."""
    folder = Path(model_folder)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    return {"config": (folder / "config.json").read_text(encoding="utf-8"), "weights": weights}


def task_settings(task: DemoTask, overrides: dict | None = None) -> dict:
    return {**DEFAULT_SETTINGS, "metric": task.metric, **task.settings, **(overrides or {})}


def adapter_key(task: DemoTask, rows: tuple[list[dict], list[dict]], settings: dict, model_folder: Path) -> str:
    blob = json.dumps({"format": DEMO_FORMAT, "task": task.name, "train": rows[0], "eval": rows[1],
                       "settings": settings, "model": model_identity(model_folder)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def ensure_adapter(task: DemoTask, *, model: str | None, model_folder: Path, root: Path,
                   retrain: bool = False, overrides: dict | None = None, threads: int | None = None,
                   progress: bool = True,
                   log: Callable[[str], None] = print) -> DemoAdapter:
    """The task's adapter from the cache, trained first if missing (or if `retrain`)."""
    from loraquilt.train.config import TrainConfig
    from loraquilt.train.run import train_adapter

    settings = task_settings(task, overrides)
    rows = task.build(DATA_SEED)
    key = adapter_key(task, rows, settings, model_folder)
    folder = root / f"{task.name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{task.name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            report = read_report(folder)
            if report is not None and not retrain:
                return DemoAdapter(task, folder, report, trained_now=False, wall_seconds=0.0)
            shipped = SHIPPED / folder.name
            report = read_report(shipped)
            if report is not None and not retrain:
                return DemoAdapter(task, shipped, report, trained_now=False, wall_seconds=0.0, shipped=True)
            data = root / "data" / f"{task.name}-{key}"
            write_examples(data / "train.jsonl", rows[0])
            write_examples(data / "eval.jsonl", rows[1])
            log(f"training the {task.name} adapter ({task.what}; {len(rows[0])} rows, "
                f"{settings.get('max_steps')} steps) into {folder}")
            started = time.perf_counter()
            config = TrainConfig(data=data / "train.jsonl", eval_data=data / "eval.jsonl", out=folder, model=model,
                                 check_peft=True, threads=threads, progress=progress, **settings)
            report = train_adapter(config, log=log)
            return DemoAdapter(task, folder, report, trained_now=True,
                               wall_seconds=time.perf_counter() - started)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_shipped(adapter: DemoAdapter, destination: Path = SHIPPED) -> Path:
    """Copy a trained demo adapter into the shipped folder: its config and training report
    (with this machine's cache folder written as $LORAQUILT_CACHE, and the base model named
    by its hub id), and its weights in bfloat16 (half the bytes; the server converts
    adapter weights to its compute dtype as it loads them)."""
    from safetensors.torch import load_file, save_file

    cache = str(adapter.folder.parent.parent)  # <cache>/demo/<task>-<key>
    target = Path(destination) / adapter.folder.name
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter.folder / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = EMBEDDED_HUB_ID
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = load_file(adapter.folder / "adapter_model.safetensors")
    save_file({name: tensor.bfloat16().contiguous() for name, tensor in weights.items()},
              target / "adapter_model.safetensors", metadata={"format": "pt"})
    report = (adapter.folder / "training_report.json").read_text(encoding="utf-8").replace(cache, "$LORAQUILT_CACHE")
    (target / "training_report.json").write_text(report, encoding="utf-8")  # last: marks the copy done
    return target
