"""The same base and adapters for llama.cpp: GGUF files made with llama.cpp's own tools.

* base, bf16: `convert_hf_to_gguf.py HF_DIR --outtype bf16 --outfile BASE.gguf`
* base, 4-bit: `llama-quantize BASE.gguf BASE-Q4_1.gguf Q4_1 THREADS`
* each adapter: `convert_lora_to_gguf.py --base HF_DIR --outtype f32 --outfile A.gguf PEFT_DIR`
  (the adapters run in batches through `gguf_batch.py`, one interpreter for all)

Files land under OUT/<model key>/ and are reused while newer than their sources; each is
written under a `.part` name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraquilt.bench.peers.processes import EngineUnavailable

HF_SCRIPT, LORA_SCRIPT = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"
BATCH_RUNNER = Path(__file__).with_name("gguf_batch.py")
BASE_OUTTYPE = "bf16"  # the peer's unquantized base, as vLLM's
LORA_OUTTYPE = "f32"  # the adapters exactly as trained (they are small beside the base)
CONVERT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ConvertTools:
    python: Path  # runs the convert scripts
    llama_cpp_dir: Path  # the llama.cpp source tree
    quantize: Path | None  # llama-quantize, None when not built

    def script(self, name: str) -> Path:
        return self.llama_cpp_dir / name

    def check(self) -> None:
        if not self.python.exists():
            raise EngineUnavailable(f"convert python {self.python} does not exist")
        for name in (HF_SCRIPT, LORA_SCRIPT):
            if not self.script(name).exists():
                raise EngineUnavailable(f"{self.script(name)} does not exist (--llama-cpp-dir: the llama.cpp tree)")


@dataclass
class GgufFiles:
    base_bf16: Path
    base_q4: Path | None  # None: q4_skipped says why
    q4_skipped: str | None
    loras: dict[str, Path]  # adapter name -> GGUF LoRA, in the order given


def base_command(tools: ConvertTools, model_folder: Path, out: Path) -> list[str]:
    return [str(tools.python), str(tools.script(HF_SCRIPT)), str(model_folder), "--outtype", BASE_OUTTYPE,
            "--outfile", str(out)]


def lora_args(model_folder: Path, adapter_folder: Path, out: Path) -> list[str]:
    """convert_lora_to_gguf.py's arguments for one PEFT folder (the base gives the config only)."""
    return ["--base", str(model_folder), "--outtype", LORA_OUTTYPE, "--outfile", str(out), str(adapter_folder)]


def lora_batch_command(tools: ConvertTools, jobs_file: Path) -> list[str]:
    return [str(tools.python), str(BATCH_RUNNER), str(tools.script(LORA_SCRIPT)), str(jobs_file)]


def quantize_command(quantize: Path, source: Path, out: Path, q4_type: str, threads: int) -> list[str]:
    return [str(quantize), str(source), str(out), q4_type, str(threads)]


def model_key(model_folder: Path) -> str:
    """A folder name for one model's GGUF files: its path, config and weight files' sizes."""
    digest = hashlib.sha256(str(model_folder.resolve()).encode())
    for path in sorted(model_folder.glob("*.json")) + sorted(model_folder.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return f"{model_folder.name}-{digest.hexdigest()[:12]}"


def is_fresh(out: Path, sources: list[Path]) -> bool:
    if not out.exists():
        return False
    newest = max((p.stat().st_mtime for p in sources if p.exists()), default=0.0)
    return out.stat().st_mtime >= newest


def part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def converter_env() -> dict[str, str]:
    """The convert python runs with the tree's gguf-py (the scripts add it themselves),
    never this venv's modules."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("NO_LOCAL_GGUF", None)
    return env


def _run(command: list[str], what: str, log_path: Path) -> None:
    with open(log_path, "a") as output:
        output.write(f"\n$ {' '.join(command)}\n")
        output.flush()
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=converter_env(),
                              timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-1500:].strip()
        raise EngineUnavailable(f"{what} failed ({done.returncode}): {tail}")


def convert(tools: ConvertTools, model_folder: Path, adapters: dict[str, Path], out_root: Path, *,
            q4_type: str, want_q4: bool, threads: int, log: Callable[[str], None]) -> GgufFiles:
    """The bf16 base, its 4-bit version (when wanted and llama-quantize exists) and every
    adapter, converted or reused."""
    tools.check()
    folder = out_root / model_key(model_folder)
    (folder / "lora").mkdir(parents=True, exist_ok=True)
    log_path = folder / "convert.log"
    model_files = sorted(model_folder.glob("*.json")) + sorted(model_folder.glob("*.safetensors"))
    base = folder / f"base-{BASE_OUTTYPE}.gguf"
    if not is_fresh(base, model_files):
        log(f"converting {model_folder} to a {BASE_OUTTYPE} GGUF (log {log_path})")
        _run(base_command(tools, model_folder, part(base)), HF_SCRIPT, log_path)
        part(base).rename(base)

    loras = {name: folder / "lora" / f"{name}.gguf" for name in adapters}
    stale = [name for name, out in loras.items() if not is_fresh(out, list(adapters[name].iterdir()))]
    if stale:
        started = time.perf_counter()
        log(f"converting {len(stale)} PEFT adapters to GGUF LoRA (log {log_path})")
        jobs_file = folder / "lora-jobs.json"
        jobs_file.write_text(json.dumps([lora_args(model_folder, adapters[name], part(loras[name]))
                                         for name in stale]))
        _run(lora_batch_command(tools, jobs_file), LORA_SCRIPT, log_path)
        for name in stale:
            part(loras[name]).rename(loras[name])
        log(f"converted {len(stale)} adapters in {time.perf_counter() - started:.0f} s")

    q4, q4_skipped = None, None
    if want_q4:
        if tools.quantize is None or not tools.quantize.exists():
            q4_skipped = (f"no llama-quantize at {tools.quantize} (build it beside llama-server or pass "
                          f"--llama-quantize); convert_hf_to_gguf.py has no 4-bit output type")
        else:
            q4 = folder / f"base-{q4_type}.gguf"
            if not is_fresh(q4, [base]):
                log(f"quantizing the base to {q4_type}")
                try:
                    _run(quantize_command(tools.quantize, base, part(q4), q4_type, threads), "llama-quantize",
                         log_path)
                    part(q4).rename(q4)
                except EngineUnavailable as error:
                    q4, q4_skipped = None, str(error)
    return GgufFiles(base, q4, q4_skipped, loras)


def default_convert_python() -> Path:
    return Path(sys.executable)
