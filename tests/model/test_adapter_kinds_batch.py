"""Every adapter kind in one batch: a DoRA row, a row on an adapter with its own embeddings
and lm_head, an aLoRA row (its invocation mid-prompt), a `ties` merge row, a plain LoRA
row, a linear mix row and a base row step together, and each equals its answer alone
(greedy tokens, and first-token log probabilities within 1e-5), with a prompt long enough
to take several prefill chunks."""

from __future__ import annotations

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model, tiny_engine
from safetensors.torch import load_file, save_file

from loraquilt.server.adapters.merge import MergeSpec
from loraquilt.server.request import Request, SamplingParams

INVOCATION = [11, 12, 13]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def redraw_tables(folder, seed: int) -> None:
    """PEFT saves modules_to_save copies equal to the base's: move them."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(tensors):
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=generator) * 0.3
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    base = build_tiny_model(root / "base", "llama", seed=27)
    folders = {
        "dora": build_peft_adapter(base, root / "dora", r=8, lora_alpha=16, seed=81, scale=0.2, use_dora=True,
                                   target_modules=TARGETS),
        "heads": build_peft_adapter(base, root / "heads", r=4, lora_alpha=8, seed=82, scale=0.2,
                                    modules_to_save=["embed_tokens", "lm_head"]),
        "alora": build_peft_adapter(base, root / "alora", r=8, lora_alpha=16, seed=83, scale=0.3,
                                    target_modules=TARGETS, alora_invocation_tokens=INVOCATION),
        "p0": build_peft_adapter(base, root / "p0", r=8, lora_alpha=16, seed=84, scale=0.3, target_modules=TARGETS),
        "p1": build_peft_adapter(base, root / "p1", r=4, lora_alpha=8, seed=85, scale=0.3,
                                 target_modules=["q_proj", "v_proj", "down_proj"]),
        "p2": build_peft_adapter(base, root / "p2", r=6, lora_alpha=12, seed=86, scale=0.3,
                                 target_modules=["k_proj", "o_proj", "up_proj"]),
    }
    redraw_tables(folders["heads"], 87)
    engine = tiny_engine(base, max_batch_size=16, max_active_adapters=8, max_prefill_tokens=24, kv_block_size=4,
                         max_seq_len=128)
    for name, folder in folders.items():
        engine.register_adapter(name, folder)
    return engine


def requests(new_tokens: int = 8, logprobs: int | None = None) -> list[Request]:
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
    ids = lambda *parts: tuple(token for part in parts for token in part)  # noqa: E731
    return [
        Request(prompt_token_ids=ids(range(40, 70)), adapter="dora", sampling=sampling),
        Request(prompt_token_ids=ids(range(70, 90)), adapter="heads", sampling=sampling),
        Request(prompt_token_ids=ids(range(90, 120), INVOCATION, range(20, 26)), adapter="alora", sampling=sampling),
        Request(prompt_token_ids=ids(range(30, 55)), mix=(("p0", 0.6), ("p1", 0.5), ("p2", 0.4)),
                merge=MergeSpec("ties", density=0.5), sampling=sampling),
        Request(prompt_token_ids=ids(range(55, 80)), adapter="p0", sampling=sampling),
        Request(prompt_token_ids=ids(range(60, 75)), mix=(("p1", 0.7), ("p2", 0.3)), sampling=sampling),
        Request(prompt_token_ids=ids(range(100, 130)), sampling=sampling),
    ]


def test_every_kind_in_one_batch_equals_its_answer_alone(engine):
    engine.generate(requests()[3:4])  # the derived adapter built once, so that the batch runs together
    sizes, execute = [], engine.runner.execute

    def observed(decodes, prefills):  # the rows of each step, seen around the real runner
        sizes.append(len(decodes) + len(prefills))
        return execute(decodes, prefills)

    engine.runner.execute = observed
    try:
        batched = engine.generate(requests(logprobs=3))
    finally:
        engine.runner.execute = execute
    assert max(sizes) == 7  # every row in one step
    for request, result in zip(requests(logprobs=3), batched):
        (alone,) = engine.generate([request])
        assert result.token_ids == alone.token_ids, request.adapter_weights
        for mine, theirs in zip(result.logprobs[0].top, alone.logprobs[0].top):
            assert mine[0] == theirs[0] and abs(mine[1] - theirs[1]) <= 1e-5
    assert len({r.token_ids for r in batched}) == len(batched)  # every row its own answer
    engine.blocks.check()
