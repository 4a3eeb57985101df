"""Engine behaviour on a tiny random Llama: batching, sampling, stops, aborts, adapter slots."""

from __future__ import annotations

import pytest
from fixtures_models import build_tiny_model, make_adapter_zoo, tiny_engine

from loraquilt.server.adapters.registry import UnknownAdapter
from loraquilt.server.engine import Engine
from loraquilt.server.request import Request, RequestError, SamplingParams
from loraquilt.server.scheduler import QueueFull

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = build_tiny_model(root / "base", "llama", seed=3)
    adapters = make_adapter_zoo(base, root / "adapters", count=4, seed=30)
    return base, adapters


def make_engine(model_folder, **overrides) -> Engine:
    base, adapters = model_folder
    settings = dict(max_batch_size=8, max_active_adapters=4, max_seq_len=128)
    return tiny_engine(base, adapters, **{**settings, **overrides})


@pytest.fixture(scope="module")
def engine(model_folder):
    return make_engine(model_folder)


def alone(engine: Engine, request: Request):
    (result,) = engine.generate([request])
    return result


def test_batched_equals_alone_with_adapters_and_mixes(engine):
    requests = [
        Request(prompt="The river", adapter="a0", sampling=GREEDY),
        Request(prompt="A long prompt about the mountains and the sea", adapter="a1", sampling=GREEDY),
        Request(prompt="Birds", sampling=GREEDY),
        Request(prompt="The river", mix=(("a2", 0.5), ("a3", -0.25)), sampling=GREEDY),
        Request(prompt="The river", adapter="a2", sampling=GREEDY),
    ]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        assert result.token_ids == alone(engine, request).token_ids
    assert batched[0].token_ids != batched[4].token_ids  # different adapter, same prompt


def test_request_joining_mid_flight_gets_the_same_answer(engine):
    first = Request(prompt="The quick brown fox", adapter="a0", sampling=SamplingParams(max_new_tokens=20, ignore_eos=True))
    late = Request(prompt="Rivers carry water", adapter="a1", sampling=GREEDY)
    engine.add_request(first)
    results = {}
    for step in range(40):
        if step == 5:
            engine.add_request(late)
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.finished
        if len(results) == 2:
            break
    assert results[first.request_id].token_ids == alone(engine, first).token_ids
    assert results[late.request_id].token_ids == alone(engine, late).token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    request = Request(prompt="Books on the shelf", adapter="a1", sampling=params)
    solo = alone(engine, request)
    crowd = engine.generate([Request(prompt="Other text", sampling=GREEDY), request,
                             Request(prompt="More", adapter="a0", sampling=params)])
    assert crowd[1].token_ids == solo.token_ids
    other_seed = SamplingParams(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, seed=99, ignore_eos=True)
    assert alone(engine, Request(prompt="Books on the shelf", adapter="a1", sampling=other_seed)).token_ids != solo.token_ids


def test_finish_reasons_length_stop_and_eos(engine):
    base = alone(engine, Request(prompt="The engine turns", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert base.finish_reason == "length" and base.completion_tokens == 12
    assert len(base.text) > 4
    stop = base.text[2:4]
    stopped = alone(engine, Request(prompt="The engine turns",
                                    sampling=SamplingParams(max_new_tokens=12, stop=(stop,), ignore_eos=True)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == base.text[: base.text.index(stop)]
    first_token = base.token_ids[0]
    saved = engine.eos_ids
    engine.postprocessor.eos_ids = frozenset({first_token})  # the model's first greedy token ends it
    try:
        ended = alone(engine, Request(prompt="The engine turns", sampling=SamplingParams(max_new_tokens=12)))
        ignored = alone(engine, Request(prompt="The engine turns", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True)))
    finally:
        engine.postprocessor.eos_ids = saved
    assert ended.finish_reason == "eos" and ended.token_ids == (first_token,) and ended.text == ""
    assert ignored.token_ids == base.token_ids


def test_streamed_pieces_add_up_to_the_text(engine):
    request = Request(prompt="Where do the birds go", adapter="a3", sampling=GREEDY)
    engine.add_request(request)
    pieces, result = [], None
    while result is None:
        for output in engine.step():
            pieces.append(output.new_text)
            result = output.finished or result
    assert "".join(pieces) == result.text


def test_chat_wraps_the_prompt_in_the_template(engine):
    plain = engine.encode(Request(prompt="Hello there"))
    chat = engine.encode(Request(prompt="Hello there", chat=True))
    messages = engine.encode(Request(messages=({"role": "user", "content": "Hello there"},)))
    assert chat == messages and len(chat) > len(plain)
    assert engine.tokenizer.decode(chat).startswith("<|im_start|>user")


def test_abort_frees_the_kv_blocks_and_adapter_pin(engine):
    free_before = engine.blocks.available()
    request = Request(prompt="Light", adapter="a2", sampling=SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.add_request(request)
    engine.step()
    engine.step()
    assert engine.adapters.get("a2").pins == 1
    engine.abort(request.request_id)
    outputs = engine.step()
    (cancelled,) = [o.finished for o in outputs if o.request_id == request.request_id]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 2
    engine.blocks.check()
    assert engine.blocks.available() == free_before and engine.adapters.get("a2").pins == 0
    assert not engine.has_work()


def test_more_requests_than_batch_rows_and_adapter_slots(model_folder):
    engine = make_engine(model_folder, max_batch_size=2, max_active_adapters=2)
    requests = [Request(prompt=f"Story number {i} begins", adapter=f"a{i % 4}", sampling=GREEDY) for i in range(6)]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        assert result.token_ids == alone(engine, request).token_ids


def test_bad_requests_are_refused_with_the_field_named(engine):
    with pytest.raises(UnknownAdapter):
        engine.add_request(Request(prompt="x", adapter="nope"))
    with pytest.raises(UnknownAdapter):
        engine.add_request(Request(prompt="x", mix=(("a0", 0.5), ("nope", 0.5))))
    with pytest.raises(RequestError) as error:
        engine.add_request(Request(prompt="word " * 400))
    assert error.value.field == "prompt"
    with pytest.raises(RequestError) as error:
        engine.add_request(Request(prompt_token_ids=(1, 10**6)))
    assert error.value.field == "prompt_token_ids"
    assert not engine.has_work()


def test_queue_bound(model_folder):
    engine = make_engine(model_folder, max_waiting=2)
    engine.add_request(Request(prompt="one"))
    engine.add_request(Request(prompt="two"))
    with pytest.raises(QueueFull):
        engine.add_request(Request(prompt="three"))


def test_unregistered_adapter_finishes_running_requests(model_folder):
    engine = make_engine(model_folder)
    request = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    expected = alone(engine, request).token_ids
    running = Request(prompt="The river", adapter="a0", sampling=GREEDY)
    engine.add_request(running)
    engine.step()
    engine.unregister_adapter("a0")
    with pytest.raises(UnknownAdapter):
        engine.add_request(Request(prompt="x", adapter="a0"))
    result = None
    while result is None:
        result = next((o.finished for o in engine.step() if o.finished), None)
    assert result.token_ids == expected
    assert engine.slots.targets.count(frozenset()) >= 1  # its slot was cleared after the last token
