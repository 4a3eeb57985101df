"""The embedded SmolLM2-135M-Instruct: real answers, and real-size adapters equal to PEFT."""

from __future__ import annotations

import pytest
import torch
from fixtures_models import build_peft_adapter, load_nf4_reference
from peft import PeftModel

from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.model.sources import resolve_model
from loraquilt.server.request import Request, SamplingParams
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

pytestmark = pytest.mark.slow
RECIPES = (
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], use_rslora=True),
    dict(r=12, lora_alpha=12, target_modules=["gate_proj", "up_proj"]),
)
PROMPTS = ("What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
           "How many legs does a spider have?")


@pytest.fixture(scope="module")
def smollm2():
    folder = resolve_model(None).folder
    engine = Engine(EngineConfig(device=EXACT, max_batch_size=8, max_active_adapters=4, max_lora_rank=16,
                                 max_seq_len=256, progress=False))
    return engine, folder


def test_chat_answer_names_paris_in_bfloat16():
    """The bf16 path (NF4 dequantized straight to bf16, bf16 KV cache, slots and activations)."""
    engine = Engine(EngineConfig(device=DeviceConfig("cpu", "bfloat16"), max_batch_size=2, max_seq_len=128,
                                 progress=False))
    assert engine.model.dtype == torch.bfloat16 and engine.cache.keys.dtype == torch.bfloat16
    (result,) = engine.generate([Request(prompt="What is the capital of France?", chat=True,
                                         sampling=SamplingParams(max_new_tokens=24))])
    assert "Paris" in result.text


def test_chat_answer_names_paris(smollm2):
    engine, _ = smollm2
    (result,) = engine.generate([Request(prompt="What is the capital of France?", chat=True,
                                         sampling=SamplingParams(max_new_tokens=24))])
    assert "Paris" in result.text


def test_four_adapters_in_one_batch_equal_peft(smollm2, tmp_path):
    engine, folder = smollm2
    adapters = [build_peft_adapter(folder, tmp_path / f"a{i}", seed=100 + i, scale=0.1, **recipe)
                for i, recipe in enumerate(RECIPES)]
    for index, path in enumerate(adapters):
        engine.register_adapter(f"a{index}", path)
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    requests = [Request(prompt=p, chat=True, adapter=f"a{i}", sampling=greedy) for i, p in enumerate(PROMPTS)]
    results = engine.generate(requests)

    model = PeftModel.from_pretrained(load_nf4_reference(folder), adapters[0], adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{index}")
    model.eval()
    differs_from_base = 0
    for index, (request, result) in enumerate(zip(requests, results)):
        ids = engine.encode(request)
        model.set_adapter(f"a{index}")
        expected = _greedy(model, ids, 16)
        assert list(result.token_ids) == expected, f"adapter a{index}"
        with model.disable_adapter():
            differs_from_base += _greedy(model, ids, 16) != expected
    assert differs_from_base >= 3  # the adapters are strong enough to matter


@torch.no_grad()
def _greedy(model, ids: list[int], count: int) -> list[int]:
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(count):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_bf16_greedy_tokens_equal_across_process_starts(tmp_path):
    """The NF4 plan is a rule, not a timing: two processes on one machine compute the same
    way, so the same bf16 greedy requests (with adapters, batched) give the same tokens."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from fixtures_models import build_peft_adapter\n"
        "from loraquilt.server.engine import Engine, EngineConfig\n"
        "from loraquilt.server.model.sources import resolve_model\n"
        "from loraquilt.server.model.weights import DeviceConfig\n"
        "from loraquilt.server.request import Request, SamplingParams\n"
        "from pathlib import Path\n"
        "engine = Engine(EngineConfig(device=DeviceConfig('cpu', 'bfloat16'), max_batch_size=8, max_seq_len=128, "
        "progress=False))\n"
        "root = Path(sys.argv[1])\n"
        f"recipes = {RECIPES[:2]!r}\n"
        "for i, recipe in enumerate(recipes):\n"
        "    engine.register_adapter(f'a{i}', build_peft_adapter(resolve_model(None).folder, root / f'a{i}', seed=i, "
        "**recipe))\n"
        "greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)\n"
        f"prompts = {PROMPTS!r}\n"
        "requests = [Request(prompt=p, adapter=[None, 'a0', 'a1', 'a0'][i], sampling=greedy) "
        "for i, p in enumerate(prompts)]\n"
        "print(json.dumps([r.token_ids for r in engine.generate(requests)]))\n"
    )
    import os
    from pathlib import Path

    support = str(Path(__file__).resolve().parents[1] / "support")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [support, os.environ.get("PYTHONPATH")]))}
    runs = []
    for index in range(2):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"adapters-{index}")],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    assert all(len(tokens) == 16 for tokens in runs[0])
