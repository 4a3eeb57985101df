"""The engine's settings, declared once: each field carries its default, and its metadata
the help text and choices; the commands' flags are generated from them
(server/config_flags.py, server/engine_args.py), so
`EngineConfig()` in a program and `loraquilt serve` without flags build the same engine.
The scheduler's and the adapter slots' configs are derived from it (`from_engine`).

Torch-free (the scheduler and the CLI parsers import it); the LoRA backends' list is the
kernels' own, looked up when needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraquilt.server.cpu_contention import parse_threads
from loraquilt.server.model.device import DeviceConfig


def lora_backends() -> tuple[str, ...]:
    """The LoRA kernel backends, as the kernels' dispatch lists them (imports torch)."""
    from loraquilt.kernels.lora import BACKENDS

    return tuple(BACKENDS)


@dataclass(frozen=True)
class EngineConfig:
    # field order = the order of the flags in `--help`; metadata keys: config_flags.METADATA_KEYS
    model: str | None = field(default=None, metadata={  # None: the embedded default
        "help": "HF folder, .gguf file, hub id or synthetic:1b (a random-weight 1.1B Llama, written once into "
                "the cache)", "shown": "embedded SmolLM2"})
    max_batch_size: int = field(default=32, metadata={"help": "sequences in the running batch"})
    max_active_adapters: int = field(default=32, metadata={"help": "adapter slots on the device"})
    max_cpu_adapters: int = field(default=256, metadata={"help": "adapters kept in host memory"})  # the host LRU
    max_adapters: int = field(default=10000, metadata={
        "help": "registered adapters before registration answers RESOURCE_EXHAUSTED"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest adapter rank the slots hold"})
    max_lora_head_adapters: int = field(default=4, metadata={
        "help": "adapters with their own input embeddings or lm_head (PEFT modules_to_save of embed_tokens / "
                "lm_head, trainable_token_indices) resident on the device at once; more wait for one to go"})
    max_waiting: int = field(default=1024, metadata={
        "flag": "--max-queue", "help": "waiting requests before RESOURCE_EXHAUSTED"})
    max_seq_len: int = field(default=1024, metadata={"help": "prompt + generated tokens per request"})
    max_prefill_tokens: int = field(default=128, metadata={
        "help": "prompt tokens fed per step over all requests; longer prompts are prefilled in chunks"})
    kv_cache_mb: float | None = field(default=None, metadata={
        "help": "KV cache pool in MiB, shared by all requests in blocks",
        "shown": "what max-batch-size sequences of max-seq-len positions take"})
    kv_block_size: int = field(default=16, metadata={"help": "positions per KV cache block"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of a prompt prefix computed before on the same adapter content"})
    device: DeviceConfig = field(default_factory=DeviceConfig, metadata={"nested": True})  # --device, --dtype
    lora_backend: str = field(default="auto", metadata={
        "help": "LoRA kernels: auto = triton for CUDA tensors, torch otherwise", "choices": lora_backends})
    threads: int | None = field(default=None, metadata={  # None: auto (cpu_contention.py)
        "help": "OpenMP threads of the engine's stepping thread; auto: every usable CPU while no other process "
                "keeps one busy, fewer while others do", "type": parse_threads, "metavar": "N|auto"})
    progress: bool = True  # model loading reports to stderr (not a flag)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_active_adapters", "max_cpu_adapters", "max_adapters", "max_lora_rank",
                     "max_lora_head_adapters", "max_waiting", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.kv_block_size < 1 or self.kv_block_size & (self.kv_block_size - 1):
            raise ValueError(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None (auto), got {self.threads!r}")
        if self.lora_backend not in lora_backends():
            raise ValueError(f"lora_backend must be one of {', '.join(lora_backends())}, got {self.lora_backend!r}")
