"""The peer that `loraquilt bench serve` compares against: transformers + PEFT on the same base.

The base model is loaded by transformers with bitsandbytes NF4 (blocksize 64, double
quantization), exactly the quantization loraquilt serves, either exact in float32 or with
the user's defaults (see ``load_nf4_model``); LoRA adapters are attached with PEFT. Three
ways of serving many adapters are measured:

* ``throughput`` - one batched ``generate`` over all requests, using PEFT's mixed-batch
  inference (``adapter_names=[...]``, one adapter per row) when the rows differ;
* ``sequential`` - one request at a time, switching with ``set_adapter`` (a naive server);
* ``hotload`` - latency of loading a new adapter and producing its first token.

Prompts are plain text, tokenized like loraquilt does (``tokenizer(prompt)["input_ids"]``),
left padded, decoded greedily for exactly ``new_tokens`` tokens (eos never stops a row).
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PeerResult:
    tokens_per_s: float
    wall_s: float
    generated_tokens: int
    token_ids: list[list[int]]  # generated ids per request, in request order
    step_ms: float | None  # wall_s / decode steps when known
    notes: str = ""
    peak_rss_mb: float = 0.0  # process peak RSS after the scenario


def load_nf4_model(model_folder: Path, *, exact_fp32: bool = True) -> torch.nn.Module:
    """The transformers + bitsandbytes NF4 model of ``model_folder`` on CPU, in eval mode.

    exact_fp32 True (the exact peer): float32 compute dtype and model dtype (embeddings,
    norms, lm_head in fp32), and bitsandbytes' fused AVX512-BF16 path turned off. On CPUs
    with AVX512-BF16, ``Linear4bit.forward`` in eval mode otherwise repacks the weight for a
    fused kernel that computes in bfloat16 whatever the compute dtype; turned off, every
    projection dequantizes to float32 and runs an fp32 matmul.

    exact_fp32 False (what users get): exactly ``from_pretrained(folder,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True))``. With transformers 5.23 and bitsandbytes 0.50.2 that is
    model dtype ``"auto"`` (the checkpoint's ``config.json`` dtype: bfloat16 for the embedded
    SmolLM2 folder, so embeddings, norms and lm_head run in bf16), compute dtype float32 (the
    config's default: a projection casts its input to fp32, multiplies by the fp32
    dequantized weight and casts back), and on AVX512-BF16 CPUs the fused bf16 kernel. On that
    fused path every ``state_dict()`` call (PEFT makes one per ``load_adapter``) unpacks the
    weights by re-quantizing their bf16 absmax, and the next forward packs them again: the
    base weights drift a little with each adapter load. ``describe_nf4_model`` says which.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not exact_fp32:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True)
        return AutoModelForCausalLM.from_pretrained(model_folder, quantization_config=quantization).eval()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def describe_nf4_model(model: torch.nn.Module) -> dict:
    """The dtypes a loaded NF4 model computes in, and whether bitsandbytes' fused
    AVX512-BF16 kernel serves its projections."""
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    fused = bool(linears) and all(bool(m.support_avx512bf16_for_cpu) for m in linears)
    compute = {str(m.compute_dtype).removeprefix("torch.") for m in linears}
    return {
        "model_dtype": str(model.dtype).removeprefix("torch."),  # embeddings, norms, lm_head
        "bnb_4bit_compute_dtype": ",".join(sorted(compute)),
        "fused_avx512bf16_kernel": fused,
        "projections": "bf16 fused NF4 kernel (gemv_4bit)" if fused
        else "dequantize to the compute dtype + matmul",
    }


class PeftPeer:
    """transformers + PEFT serving one NF4 base model and its LoRA adapters on CPU."""

    def __init__(
        self, model_folder: Path, *, exact_fp32: bool = True, log: Callable[[str], None] = _stderr
    ) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(model_folder)
        self.exact_fp32 = exact_fp32
        self.log = log
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.tokenizer.eos_token_id
        self.model = load_nf4_model(self.folder, exact_fp32=exact_fp32)
        self.adapters: list[str] = []
        # The first forward pass does one-time work (bitsandbytes may repack weights).
        self._generate(["Hello"], [None], 2)
        self.description = describe_nf4_model(self.model)
        path = "exact fp32" if exact_fp32 else "user defaults"
        log(f"peft peer: NF4 base loaded in {time.perf_counter() - started:.1f} s ({path}: model "
            f"{self.description['model_dtype']}, projections {self.description['projections']} in "
            f"{self.description['bnb_4bit_compute_dtype']})")

    @property
    def _is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def _add_adapter(self, folder: Path, name: str) -> None:
        from peft import PeftModel

        if self._is_peft:
            self.model.load_adapter(str(folder), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
        self.adapters.append(name)

    def load_adapters(self, folders: Sequence[Path], names: Sequence[str]) -> None:
        """Attach PEFT LoRA folders under the given names."""
        if len(folders) != len(names):
            raise ValueError(f"{len(folders)} folders but {len(names)} names")
        started = time.perf_counter()
        for folder, name in zip(folders, names):
            self._add_adapter(Path(folder), name)
        self.log(f"peft peer: {len(names)} adapters loaded in {time.perf_counter() - started:.1f} s")

    def _pad_left(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
        return input_ids, attention_mask

    def _adapter_mode(self, adapters: Sequence[str | None]) -> tuple[AbstractContextManager, dict, str]:
        """The context, extra generate kwargs and a description for a batch's adapters."""
        distinct = set(adapters)
        if not self._is_peft:
            if distinct != {None}:
                raise ValueError("adapters requested but none is loaded")
            return nullcontext(), {}, "base model"
        if distinct == {None}:
            return self.model.disable_adapter(), {}, "base model (adapters disabled)"
        if len(distinct) == 1:
            self.model.set_adapter(adapters[0], inference_mode=True)
            return nullcontext(), {}, f"one adapter ({adapters[0]})"
        names = [BASE_ADAPTER if name is None else name for name in adapters]
        return nullcontext(), {"adapter_names": names}, f"mixed batch of {len(distinct)} adapters"

    def _generate(
        self, prompts: Sequence[str], adapters: Sequence[str | None], new_tokens: int
    ) -> tuple[list[list[int]], str]:
        """Greedy ids of exactly ``new_tokens`` new tokens per prompt, and the mode used."""
        from transformers import GenerationConfig

        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        input_ids, attention_mask = self._pad_left(prompts)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        context, kwargs, mode = self._adapter_mode(adapters)
        with torch.inference_mode(), context:
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs
            )
        generated = output[:, input_ids.shape[1] :]
        if generated.shape[1] != new_tokens:
            raise RuntimeError(f"generate returned {generated.shape[1]} tokens, expected {new_tokens}")
        return generated.tolist(), mode

    def throughput(
        self, prompts: Sequence[str], adapters: Sequence[str | None], new_tokens: int
    ) -> PeerResult:
        """All requests in one batched ``generate``."""
        started = time.perf_counter()
        token_ids, mode = self._generate(prompts, adapters, new_tokens)
        wall = time.perf_counter() - started
        generated = len(prompts) * new_tokens
        return PeerResult(
            tokens_per_s=generated / wall,
            wall_s=wall,
            generated_tokens=generated,
            token_ids=token_ids,
            step_ms=wall / new_tokens * 1000,
            notes=f"one batched generate of {len(prompts)} rows, {mode}",
            peak_rss_mb=peak_rss_mb(),
        )

    def sequential(
        self,
        prompts: Sequence[str],
        adapters: Sequence[str | None],
        new_tokens: int,
        max_requests: int | None = None,
    ) -> PeerResult:
        """One request at a time, switching adapters with ``set_adapter``.

        Only the first ``max_requests`` are run; wall_s and generated_tokens are then
        extrapolated to all requests and token_ids holds the requests that ran.
        """
        total = len(prompts)
        count = total if max_requests is None else max(1, min(max_requests, total))
        token_ids: list[list[int]] = []
        started = time.perf_counter()
        for prompt, adapter in zip(prompts[:count], adapters[:count]):
            ids, _ = self._generate([prompt], [adapter], new_tokens)
            token_ids.extend(ids)
        measured = time.perf_counter() - started
        tokens_per_s = count * new_tokens / measured
        notes = f"one request at a time with set_adapter, {count} requests"
        if count < total:
            notes = (f"timed first {count} of {total} requests ({measured:.2f} s) and extrapolated; "
                     f"token_ids holds those {count}")
        return PeerResult(
            tokens_per_s=tokens_per_s,
            wall_s=measured * total / count,
            generated_tokens=total * new_tokens,
            token_ids=token_ids,
            step_ms=measured / (count * new_tokens) * 1000,
            notes=notes,
            peak_rss_mb=peak_rss_mb(),
        )

    def hotload(self, folders: Sequence[Path], prompt: str, repeats: int) -> dict:
        """Latency of load_adapter + set_adapter + the first generated token, per repeat.

        Folders are cycled under fresh names and deleted after each repeat, so memory stays
        bounded. One untimed repeat warms up first; if no adapter is loaded yet, the first
        folder is also attached once (untimed) so that every repeat is a ``load_adapter``.
        """
        if not folders or repeats < 1:
            raise ValueError("hotload needs at least one folder and one repeat")
        if not self._is_peft:
            self._add_adapter(Path(folders[0]), "hotload-anchor")
        previous = self.model.active_adapter
        samples: list[float] = []
        for index in range(repeats + 1):
            name = f"hotload-{index}"
            started = time.perf_counter()
            self.model.load_adapter(str(folders[index % len(folders)]), adapter_name=name)
            self._generate([prompt], [name], 1)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if index:
                samples.append(elapsed_ms)
            self.model.set_adapter(previous, inference_mode=True)
            self.model.delete_adapter(name)
        return {
            "p50_ms": float(np.percentile(samples, 50)),
            "p99_ms": float(np.percentile(samples, 99)),
            "samples_ms": samples,
        }
