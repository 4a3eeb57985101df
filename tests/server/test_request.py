"""Validation of SamplingParams and Request: every refusal names the offending field."""

import math

import pytest

from loraquilt.server.request import MAX_STOP_CHARS, MAX_STOP_STRINGS, Request, RequestError, SamplingParams


def assert_refused(field: str, build) -> None:
    with pytest.raises(RequestError) as caught:
        build()
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


# -- SamplingParams -------------------------------------------------------------------------


def test_default_sampling_params_are_greedy():
    params = SamplingParams()
    assert params.greedy
    assert params.max_new_tokens >= 1


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "8"])
def test_max_new_tokens_refused(value):
    assert_refused("max_new_tokens", lambda: SamplingParams(max_new_tokens=value))


@pytest.mark.parametrize("value", [-0.1, -1, math.nan, math.inf, -math.inf, "1.0"])
def test_temperature_refused(value):
    assert_refused("temperature", lambda: SamplingParams(temperature=value))


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf])
def test_top_p_refused(value):
    assert_refused("top_p", lambda: SamplingParams(top_p=value))


@pytest.mark.parametrize("value", [-1, -100, 1.5])
def test_top_k_refused(value):
    assert_refused("top_k", lambda: SamplingParams(top_k=value))


@pytest.mark.parametrize("value", [-1, 2**64, 2**64 + 5, 1.5, "7"])
def test_seed_refused(value):
    assert_refused("seed", lambda: SamplingParams(seed=value))


def test_too_many_stop_strings_refused():
    stop = tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))
    assert_refused("stop", lambda: SamplingParams(stop=stop))


@pytest.mark.parametrize(
    "stop",
    [("",), ("ok", ""), ("x" * (MAX_STOP_CHARS + 1),), (None,), (3,)],
    ids=["empty", "empty-among-valid", "too-long", "none", "int"],
)
def test_bad_stop_string_refused(stop):
    assert_refused("stop", lambda: SamplingParams(stop=stop))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"temperature": 0.0},
        {"temperature": 0},
        {"temperature": 2.5},
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"seed": None},
        {"top_k": 0},
        {"top_k": 1},
        {"max_new_tokens": 1},
        {"stop": tuple(f"s{i}" for i in range(MAX_STOP_STRINGS))},
        {"stop": ("x" * MAX_STOP_CHARS,)},
        {"stop": ("\n", "日本", "🙂")},
    ],
    ids=lambda kwargs: ",".join(f"{k}={str(v)[:12]}" for k, v in kwargs.items()),
)
def test_valid_edge_cases_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


@pytest.mark.parametrize("temperature, greedy", [(0, True), (0.0, True), (1e-6, False), (1.0, False)])
def test_greedy_is_temperature_zero(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


# -- Request ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "hi", "messages": ({"role": "user", "content": "hi"},)},
        {"prompt": "hi", "prompt_token_ids": (1, 2)},
        {"messages": ({"role": "user", "content": "hi"},), "prompt_token_ids": (1,)},
        {"prompt": "hi", "messages": ({"role": "user", "content": "hi"},), "prompt_token_ids": (1,)},
    ],
    ids=["none", "prompt+messages", "prompt+ids", "messages+ids", "all-three"],
)
def test_exactly_one_prompt_source_required(kwargs):
    assert_refused("prompt", lambda: Request(**kwargs))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"prompt": ""}, "prompt"), ({"messages": ()}, "messages"), ({"prompt_token_ids": ()}, "prompt_token_ids")],
)
def test_empty_prompt_source_refused(kwargs, field):
    assert_refused(field, lambda: Request(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "hi"},
        {"messages": ({"role": "user", "content": "hi"},)},
        {"prompt_token_ids": (5,)},
        {"prompt": "hi", "chat": True},
    ],
)
def test_each_prompt_source_accepted(kwargs):
    request = Request(**kwargs)
    for name in ("prompt", "messages", "prompt_token_ids"):
        assert getattr(request, name) == kwargs.get(name)  # the given source kept, the others unset
    assert request.chat == kwargs.get("chat", False) and request.adapter_weights == ()


def test_adapter_and_mix_together_refused():
    assert_refused("adapters", lambda: Request(prompt="x", adapter="a", mix=(("b", 1.0),)))


def test_duplicate_adapter_in_mix_refused():
    assert_refused("adapters", lambda: Request(prompt="x", mix=(("a", 0.5), ("b", 0.2), ("a", 0.5))))


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, "1", None, 1001.0])
def test_bad_mix_weight_refused(weight):
    assert_refused("adapters.weight", lambda: Request(prompt="x", mix=(("a", 1.0), ("b", weight))))


def test_negative_and_zero_mix_weights_accepted():
    """A weight may be negative or zero (subtracting an adapter) while the mix sums to more than 0."""
    request = Request(prompt="x", mix=(("a", -0.5), ("b", 0.0), ("c", 1.0)))
    assert request.adapter_weights == (("a", -0.5), ("b", 0.0), ("c", 1.0))


@pytest.mark.parametrize("mix", [(("a", -0.5), ("b", 0.5)), (("a", 0.0),), (("a", -1.0),)])
def test_mix_summing_to_zero_or_less_refused(mix):
    assert_refused("adapters", lambda: Request(prompt="x", mix=mix))


@pytest.mark.parametrize("kwargs, field", [
    ({"adapter": "a/b"}, "adapter"), ({"adapter": ""}, "adapter"), ({"mix": (("a b", 1.0),)}, "adapters.name"),
    ({"mix": tuple((f"m{i}", 1.0) for i in range(9))}, "adapters"),
    ({"prompt": "a\ud800"}, "prompt"), ({"prompt": None, "messages": ({"role": "user", "content": "\udfff"},)},
                                         "messages[0].content"),
])
def test_names_mix_size_and_text_are_checked_by_the_request(kwargs, field):
    assert_refused(field, lambda: Request(**{"prompt": "x", **kwargs}))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, ()),
        ({"adapter": "math"}, (("math", 1.0),)),
        ({"mix": (("math", 0.7), ("code", 0.3))}, (("math", 0.7), ("code", 0.3))),
        ({"mix": (("math", 2),)}, (("math", 2.0),)),
    ],
    ids=["base", "single", "mix", "int-weight"],
)
def test_adapter_weights(kwargs, expected):
    weights = Request(prompt="x", **kwargs).adapter_weights
    assert weights == expected
    assert all(isinstance(weight, float) for _, weight in weights)


def test_request_ids_are_unique_unless_given():
    assert Request(prompt="x").request_id != Request(prompt="x").request_id
    assert Request(prompt="x", request_id="mine").request_id == "mine"


def test_request_carries_its_sampling_params():
    params = SamplingParams(temperature=0.7, top_k=20, seed=3)
    assert Request(prompt="x", sampling=params).sampling is params
    assert Request(prompt="x").sampling == SamplingParams()
