"""What one training run is asked to do, validated once (no torch here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraquilt.train.metrics import METRICS

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FROZEN_BASES = ("auto", "nf4", "dequantized")
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    data: Path  # JSON lines, rows {"prompt","completion"} or {"messages": [...]}
    out: Path  # the PEFT folder written (adapter_config.json, adapter_model.safetensors, report)
    model: str | None = None  # HF folder, .gguf, hub id; None = the embedded SmolLM2
    eval_data: Path | None = None  # None: a seeded 10% of `data` (at most 200 rows) is held out
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = PROJECTIONS
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    max_steps: int | None = None  # None: epochs * ceil(rows / batch_size)
    warmup_steps: int | None = None  # None: 5% of the steps, at most 20
    seed: int = 0
    # Each step scales the LoRA deltas by a random factor in this range; (0.5, 1) trains an
    # adapter that keeps its behaviour at half weight, as in a 50/50 mix. (1, 1) = off.
    scale_range: tuple[float, float] = (1.0, 1.0)
    # Activated LoRA: the adapter applies from the last occurrence of this text's tokens in
    # a prompt on (every training prompt must hold them); None: a plain LoRA adapter
    alora_invocation: str | None = None
    max_length: int = 256  # prompt + completion tokens per row; longer rows are cut
    metric: str = "exact_match"  # task metric on the eval split (see train/metrics.py)
    max_new_tokens: int = 64  # greedy tokens per eval answer for the task metric
    max_eval_rows: int = 256  # the task metric and eval loss use at most this many eval rows
    device: str = "auto"  # auto, cpu, cuda[:N]
    # How the frozen NF4 base computes. "nf4": bitsandbytes Linear4bit (dequantizes at every
    # forward and backward); "dequantized": the same NF4 values held dequantized, which are
    # bit-identical to what the 4-bit forward multiplies by, ~15x faster per step on CPU.
    # auto = dequantized on CPU, nf4 on CUDA.
    frozen_base: str = "auto"
    # auto = on for CUDA (memory), off on CPU (short rows: the activations are small and
    # recomputing them costs a third of the step)
    gradient_checkpointing: str = "auto"
    threads: int | None = None  # torch CPU threads; None = torch's default (one per core)
    check_peft: bool = False  # load the result in PEFT too and compare greedy outputs
    peft_check_prompts: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", Path(self.eval_data))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range!r}")
        positive = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size,
                    "max_length": self.max_length, "max_new_tokens": self.max_new_tokens,
                    "max_eval_rows": self.max_eval_rows, "peft_check_prompts": self.peft_check_prompts}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.alora_invocation is not None and not (isinstance(self.alora_invocation, str) and self.alora_invocation):
            raise ValueError(f"alora_invocation must be non-empty text, got {self.alora_invocation!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.targets:
            raise ValueError("targets: name at least one projection")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"targets: {', '.join(unknown)} not among {', '.join(PROJECTIONS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets: a projection is named twice")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.frozen_base not in FROZEN_BASES:
            raise ValueError(f"frozen_base must be one of {', '.join(FROZEN_BASES)}, got {self.frozen_base!r}")
        if self.gradient_checkpointing not in SWITCHES:
            raise ValueError(f"gradient_checkpointing must be one of {', '.join(SWITCHES)}, "
                             f"got {self.gradient_checkpointing!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def settings(self) -> dict:
        """The fields that shape the adapter, JSON-ready (for reports and cache keys)."""
        values = asdict(self)
        for name in ("data", "out", "eval_data", "progress", "threads", "check_peft", "peft_check_prompts"):
            values.pop(name)
        values["targets"] = list(self.targets)
        values["scale_range"] = list(self.scale_range)
        return values


@dataclass(frozen=True)
class Runtime:
    """What `auto` resolved to on this machine."""

    device: str  # "cpu", "cuda:0"
    compute_dtype: str  # "float32", "bfloat16"
    frozen_base: str  # "nf4" | "dequantized"
    gradient_checkpointing: bool
    optimizer: str  # "torch.optim.AdamW" | "bitsandbytes.optim.PagedAdamW"
    threads: int = field(default=1)


def resolve_runtime(config: TrainConfig) -> Runtime:
    import torch

    if config.device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    else:
        device = "cuda:0" if config.device == "cuda" else config.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
    cuda = device.startswith("cuda")
    frozen_base = config.frozen_base if config.frozen_base != "auto" else ("nf4" if cuda else "dequantized")
    checkpointing = cuda if config.gradient_checkpointing == "auto" else config.gradient_checkpointing == "on"
    return Runtime(
        device=device,
        compute_dtype="bfloat16" if cuda else "float32",
        frozen_base=frozen_base,
        gradient_checkpointing=checkpointing,
        optimizer="bitsandbytes.optim.PagedAdamW" if cuda else "torch.optim.AdamW",
        threads=torch.get_num_threads(),
    )
