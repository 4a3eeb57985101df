"""Does a trained adapter give the same greedy tokens in PEFT as in loraquilt?

PEFT side: `PeftModel.from_pretrained` over transformers + bitsandbytes NF4 (the benchmark's
peer loader, float32 arithmetic). loraquilt side: the engine with the adapter registered.
Both get the same prompt token ids and decode exactly `new_tokens` tokens greedily.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from loraquilt.train.data import Example
from loraquilt.train.evaluate import request_for


@torch.no_grad()
def peft_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy ids of a transformers/PEFT model, one token at a time over its KV cache. An
    activated LoRA's offsets come from the prompt and hold for every later token, as in
    PEFT's generate (a one-token forward alone would not find the invocation)."""
    extra = {}
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "alora_invocation_tokens", None):
        from peft.tuners.lora.variants import calculate_alora_offsets

        extra["alora_offsets"] = calculate_alora_offsets(model.peft_config, model.active_adapter, torch.tensor([ids]))
    out = model(input_ids=torch.tensor([ids]), use_cache=True, **extra)
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                    **extra)
    return tokens


def compare_with_peft(engine, adapter_name: str, model_folder: Path, adapter_folder: Path,
                      examples: Sequence[Example], *, new_tokens: int = 24) -> dict:
    """Greedy tokens of each example's prompt on the adapter, loraquilt vs PEFT."""
    from peft import PeftModel

    from loraquilt.bench.peft_peer import load_nf4_model

    requests = []
    for example in examples:
        request = request_for(example, max_new_tokens=new_tokens, adapter=adapter_name)
        requests.append(replace(request, sampling=replace(request.sampling, ignore_eos=True)))
    ours = [list(result.token_ids) for result in engine.generate(requests)]
    model = PeftModel.from_pretrained(load_nf4_model(Path(model_folder)), str(adapter_folder)).eval()
    theirs = [peft_greedy(model, engine.encode(request), new_tokens) for request in requests]
    rows = []
    for request, a, b in zip(requests, ours, theirs):
        rows.append({"prompt": request.prompt if request.prompt is not None else request.messages[-1]["content"],
                     "equal": a == b, "loraquilt": engine.tokenizer.decode(a), "peft": engine.tokenizer.decode(b)})
    equal = sum(row["equal"] for row in rows)
    return {"prompts": len(rows), "equal": equal, "all_equal": equal == len(rows), "new_tokens": new_tokens,
            "peft_loader": "PeftModel.from_pretrained on transformers + bitsandbytes NF4 (fp32)", "rows": rows}
