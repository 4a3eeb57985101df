"""Every adapter kind in one batch on CUDA (mirrors tests/model/test_adapter_kinds_batch.py):
a DoRA row, a row with its own embeddings and lm_head, an aLoRA row, a `ties` merge, a
plain row, a linear mix and a base row step together on the compiled Triton LoRA kernels in
float32, and each equals its answer alone: first-token log probabilities within 1e-3 and
greedy tokens identical, except after a step where the answer alone had its top two
tokens within TIE of each other (bitsandbytes picks its CUDA kernel by batch shape, so the
batch and a lone request round differently in the last bits; such a parting is reported).
Runs in a child process with TRITON_INTERPRET=0 (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from fixtures_kinds import build_kinds, kind_requests, run_observing_batches

from _gpu import DEVICE, GPU

pytestmark = GPU
RUN_IN_CHILD = True
LOGPROB_ATOL = 1e-3
TIE = 1e-3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.weights import DeviceConfig

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 GEMMs
    base, folders = build_kinds(tmp_path_factory.mktemp("kinds"))
    engine = Engine(EngineConfig(model=str(base), device=DeviceConfig(DEVICE, "float32"), max_batch_size=16,
                                 max_active_adapters=8, max_lora_rank=16, max_prefill_tokens=24, kv_block_size=4,
                                 max_seq_len=128, lora_backend="auto", progress=False))
    for name, folder in folders.items():
        engine.register_adapter(name, folder)
    yield engine
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_every_kind_in_one_batch_equals_its_answer_alone(engine):
    engine.generate(kind_requests()[3:4])  # the derived adapter built once
    batched, sizes = run_observing_batches(engine, kind_requests(logprobs=2))
    assert max(sizes) == 7
    partings = []
    for request, result in zip(kind_requests(logprobs=2), batched):
        (alone,) = engine.generate([request])
        for (token, value), (expected, reference) in zip(result.logprobs[0].top, alone.logprobs[0].top):
            assert token == expected and abs(value - reference) <= LOGPROB_ATOL, request.adapter_weights
        for step, (mine, theirs) in enumerate(zip(result.token_ids, alone.token_ids)):
            if mine != theirs:
                top = alone.logprobs[step].top
                assert len(top) == 2 and top[0][1] - top[1][1] < TIE, (request.adapter_weights, step)
                partings.append((request.adapter_weights, step))
                break
    print(f"greedy partings at near-ties: {partings}")
