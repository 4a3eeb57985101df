"""Every adapter kind in one batch: a DoRA row, a row on an adapter with its own embeddings
and lm_head, an aLoRA row (its invocation mid-prompt), a `ties` merge row, a plain LoRA
row, a linear mix row and a base row step together, and each equals its answer alone
(greedy tokens, and first-token log probabilities within 1e-5), with prompts long enough
to take several prefill chunks."""

from __future__ import annotations

import pytest
from fixtures_kinds import build_kinds, kind_requests, run_observing_batches
from fixtures_models import tiny_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    base, folders = build_kinds(tmp_path_factory.mktemp("kinds"))
    engine = tiny_engine(base, max_batch_size=16, max_active_adapters=8, max_prefill_tokens=24, kv_block_size=4,
                         max_seq_len=128)
    for name, folder in folders.items():
        engine.register_adapter(name, folder)
    return engine


def test_every_kind_in_one_batch_equals_its_answer_alone(engine):
    engine.generate(kind_requests()[3:4])  # the derived adapter built once, so that the batch runs together
    batched, sizes = run_observing_batches(engine, kind_requests(logprobs=3))
    assert max(sizes) == 7  # every row in one step
    for request, result in zip(kind_requests(logprobs=3), batched):
        (alone,) = engine.generate([request])
        assert result.token_ids == alone.token_ids, request.adapter_weights
        for mine, theirs in zip(result.logprobs[0].top, alone.logprobs[0].top):
            assert mine[0] == theirs[0] and abs(mine[1] - theirs[1]) <= 1e-5
    assert len({r.token_ids for r in batched}) == len(batched)  # every row its own answer
    engine.blocks.check()
