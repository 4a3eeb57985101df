"""Structured output on a live server, both transports: JSON schemas, any JSON object,
regexes, grammars and choices, per row in batches that mix adapters and constraints
(through the real `openai` client and gRPC). The tiny random model has no idea of JSON:
the constraint alone gives the output its structure, so every schema caps its strings and
arrays, and every output here must end by itself ("stop") and validate."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import jsonschema
import openai
import pytest
from fixtures_http import openai_client
from fixtures_live import BASE_ID, start_live, stop_live

from loraquilt.server.request import Constraint, RequestError
from loraquilt.v1 import loraquilt_pb2 as pb

MAX_NEW = 200
ROWS = 8
PROMPTS = ("The river bends", "A computer program is", "Questions and answers:", "The little town",
           "Numbers such as", "Where are you going?", "In the spring", "The quick brown fox")
# (model, extra body) of the 8 rows of a batch: the base, each adapter, a weighted mix
ROW_MODELS = [(BASE_ID, {}), ("a0", {}), ("a1", {}), (BASE_ID, {"adapters": [{"name": "a0", "weight": 0.6},
                                                                                {"name": "a1", "weight": 0.4}]})] * 2


def _object(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties if required is None else required),
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "flat": _object({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}}),
    "nested": _object({"user": _object({"name": NAME, "address": _object({"city": NAME, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "enum": {"enum": ["red", "green", "blue"]},
    "enum_in_object": _object({"color": {"enum": ["red", "green"]}, "size": {"enum": [1, 2, 3]}}),
    "integer_array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                      "minItems": 1, "maxItems": 4},
    # a random model's digits go on as long as a number allows: decimals are bounded by multipleOf
    "bounded_numbers": _object({"x": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},
                                "y": {"type": "integer", "exclusiveMinimum": 0, "maximum": 999}}),
    "optional_fields": _object({"id": {"type": "integer", "minimum": 0, "maximum": 9}, "note": NAME,
                                "flag": {"type": "boolean"}}, required=["id"]),
    "ref": {"$defs": {"point": _object({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "y": {"type": "integer", "minimum": 0, "maximum": 9}})},
            **_object({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})},
    "ref_chain": {"$defs": {"name": NAME, "person": _object({"first": {"$ref": "#/$defs/name"},
                                                             "last": {"$ref": "#/$defs/name"}})},
                  "type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2},
    "array_of_objects": {"type": "array", "items": _object({"k": NAME, "v": {"type": "boolean"}}), "maxItems": 3},
    "const": _object({"version": {"const": 2}, "kind": {"const": "point"}}),
    "any_of": _object({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, NAME]}}),
    "nullable": _object({"maybe": {"type": ["string", "null"], "maxLength": 6}}),
    "pattern": _object({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "mixed_enum": {"type": "array", "items": {"enum": [1, "two", None, True]}, "minItems": 2, "maxItems": 3},
    "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2},
    "boolean": {"type": "boolean"},
    "one_of_tagged": {"oneOf": [_object({"kind": {"const": "a"}, "n": {"type": "integer", "minimum": 0, "maximum": 5}}),
                                _object({"kind": {"const": "b"}, "s": NAME})]},
    "string_lengths": _object({"short": {"type": "string", "minLength": 2, "maxLength": 4},
                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                        "minItems": 1, "maxItems": 2}}),
    "everything": _object({"s": NAME, "i": {"type": "integer", "minimum": -5, "maximum": 5},
                           "n": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}, "b": {"type": "boolean"},
                           "z": {"type": "null"}, "e": {"enum": ["x", "y"]},
                           "a": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                           "o": _object({"deep": {"type": "integer", "minimum": 0, "maximum": 3}})}),
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("structured"), seed=17, max_seq_len=256, new_tokens_limit=MAX_NEW)
    yield live
    stop_live(live)


@pytest.fixture(scope="module")
def oai(live):
    with openai_client(live.server, timeout=120) as client:
        yield client


def grpc_generate(live, **fields) -> pb.GenerateResponse:
    fields.setdefault("prompt", PROMPTS[0])
    fields.setdefault("max_new_tokens", MAX_NEW)
    return live.stub.Generate(pb.GenerateRequest(**fields), timeout=120)


@contextmanager
def mask_rows(engine):
    """The number of constrained rows of every step's mask job while in the block."""
    rows: list[int] = []
    start = engine.structured.start
    engine.structured.start = lambda matchers: rows.append(len(matchers)) or start(matchers)
    try:
        yield rows
    finally:
        engine.structured.start = start


def together(calls):
    """Run the calls at once (one batch: the server's max_batch_size is 8)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def chat_row(oai, index: int, **body):
    model, extra = ROW_MODELS[index]
    sampled = index % 2 == 1  # half greedy, half sampled with a seed
    return oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[index]}], max_tokens=MAX_NEW,
        temperature=1.0 if sampled else 0.0, seed=index if sampled else None,
        extra_body={**extra, **body.pop("extra_body", {})}, **body)


# -- JSON schemas -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMAS)
def test_every_row_of_a_mixed_adapter_batch_validates(live, oai, name):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    with mask_rows(live.server.engine) as rows:
        answers = together([lambda i=i: chat_row(oai, i, response_format=response_format) for i in range(ROWS)])
    assert max(rows) == ROWS  # all eight constrained rows in one step
    for index, answer in enumerate(answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (index, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_grpc_json_schema_and_json_object(live):
    schema = SCHEMAS["everything"]
    replies = together([lambda i=i: grpc_generate(live, prompt=PROMPTS[i], adapter=("", "a0", "a1", "")[i % 4],
                                                  json_schema=json.dumps(schema)) for i in range(4)])
    for reply in replies:
        assert reply.finish_reason == "stop", reply.text
        jsonschema.validate(json.loads(reply.text), schema)
    # any JSON object: a bias towards '"' and '}' keeps the random model's keys and values short
    bias = {live.server.engine.tokenizer.convert_tokens_to_ids(token): 30.0 for token in ('"', "}")}
    reply = grpc_generate(live, json_object=True, logit_bias=bias)
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.text), dict), reply.text


def test_streamed_constrained_output_validates(live, oai):
    schema = SCHEMAS["nested"]
    stream = oai.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "Tell me"}], max_tokens=MAX_NEW, temperature=0,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    chunks = list(stream)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- regexes, grammars, choices ---------------------------------------------------------------------

REGEX = r"[a-z]{2,5}-[0-9]{2,3}( [A-Z][a-z]{0,4})?"
LARK = """start: expr
expr: NUM | "(" expr OP expr ")"
OP: "+" | "*"
NUM: /[0-9]/
"""
GBNF = 'root ::= answer " " num\nanswer ::= "yes" | "no"\nnum ::= [0-9] [0-9]?\n'


def parses_as_expr(text: str) -> bool:
    """LARK's language: a digit, or (expr op expr)."""
    def expr(at: int) -> int:
        if at < len(text) and text[at].isdigit():
            return at + 1
        if at >= len(text) or text[at] != "(":
            return -1
        at = expr(at + 1)
        if at < 0 or at >= len(text) or text[at] not in "+*":
            return -1
        at = expr(at + 1)
        return at + 1 if 0 <= at < len(text) and text[at] == ")" else -1
    return expr(0) == len(text)


def test_regex_grammar_and_choice_rows_with_unconstrained_rows_in_one_batch(live):
    """Each kind on gRPC, beside unconstrained rows that answer as they do alone."""
    plain = [dict(prompt=PROMPTS[i], adapter=("a0", "a1", "")[i % 3], max_new_tokens=12, ignore_eos=True)
             for i in range(3)]
    alone = [grpc_generate(live, **fields).token_ids for fields in plain]
    constrained = [dict(regex=REGEX), dict(grammar=LARK, adapter="a0"), dict(grammar=GBNF, adapter="a1"),
                   dict(choice=["alpha", "beta", "gamma"], temperature=1.0, seed=3),
                   dict(json_schema=json.dumps(SCHEMAS["ref"]), adapter="a1")]
    replies = together([lambda f=f: grpc_generate(live, **f) for f in plain + constrained])
    assert [list(reply.token_ids) for reply in replies[:3]] == [list(ids) for ids in alone]
    regex, lark, gbnf, choice, schema = (reply.text for reply in replies[3:])
    assert all(reply.finish_reason == "stop" for reply in replies[3:]), [r.text for r in replies[3:]]
    assert re.fullmatch(REGEX, regex), regex
    assert parses_as_expr(lark), lark
    assert re.fullmatch(r"(yes|no) [0-9][0-9]?", gbnf), gbnf
    assert choice in ("alpha", "beta", "gamma")
    jsonschema.validate(json.loads(schema), SCHEMAS["ref"])


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"regex": REGEX}}, lambda text: re.fullmatch(REGEX, text)),
    ({"structured_outputs": {"grammar": LARK}}, parses_as_expr),
    ({"structured_outputs": {"choice": ["left", "right", "straight on"]}},
     lambda text: text in ("left", "right", "straight on")),
    ({"structured_outputs": {"json": SCHEMAS["flat"]}}, lambda text: jsonschema.validate(json.loads(text),
                                                                                          SCHEMAS["flat"]) is None),
    ({"guided_json": json.dumps(SCHEMAS["pattern"])},
     lambda text: jsonschema.validate(json.loads(text), SCHEMAS["pattern"]) is None),
    ({"guided_regex": "[0-9]{4}"}, lambda text: re.fullmatch("[0-9]{4}", text)),
    ({"guided_grammar": GBNF}, lambda text: re.fullmatch(r"(yes|no) [0-9][0-9]?", text)),
    ({"guided_choice": ["one", "two"]}, lambda text: text in ("one", "two")),
], ids=["so-regex", "so-grammar", "so-choice", "so-json", "guided_json", "guided_regex", "guided_grammar",
        "guided_choice"])
def test_vllm_fields_on_completions_and_chat(live, oai, body, check):
    completion = oai.completions.create(model="a0", prompt="The river", max_tokens=MAX_NEW, temperature=0,
                                        extra_body=body)
    chat = oai.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_NEW,
                                       temperature=0, extra_body=body)
    for text, reason in ((completion.choices[0].text, completion.choices[0].finish_reason),
                         (chat.choices[0].message.content, chat.choices[0].finish_reason)):
        assert reason == "stop" and check(text), text


def test_the_constraint_ends_the_request_and_max_tokens_cuts_it(live, oai):
    """Complete: finish "stop" even with ignore_eos (the end-of-sequence token is not in
    the text); cut by the caller's max_tokens: "length", and the text is a prefix only."""
    whole = grpc_generate(live, regex="[a-z]{3}", ignore_eos=True)
    assert whole.finish_reason == "stop" and re.fullmatch("[a-z]{3}", whole.text)
    schema = json.dumps(SCHEMAS["everything"])
    full = grpc_generate(live, json_schema=schema)
    cut = grpc_generate(live, json_schema=schema, max_new_tokens=3)
    assert cut.finish_reason == "length" and list(cut.token_ids) == list(full.token_ids[:3])
    answer = oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "everything", "schema": SCHEMAS["everything"]}})
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content.startswith('{"s')


def test_response_format_text_is_no_constraint(live, oai):
    plain = oai.chat.completions.create(model="a0", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
    text = oai.chat.completions.create(model="a0", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, response_format={"type": "text"},
                                       extra_body={"ignore_eos": True})
    assert text.choices[0].message.content == plain.choices[0].message.content


# -- refused --------------------------------------------------------------------------------------------

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer"}}}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": SCHEMA_FORMAT, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_json": {"type": "string"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"$ref": "#/$defs/missing"}}}, "structured_outputs.json"),
    ({"guided_regex": "[z-a]"}, "guided_regex"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"guided_grammar": "root ::= undefined"}, "guided_grammar"),
    ({"guided_grammar": 'root ::= "unclosed'}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
])
def test_invalid_constraints_are_a_400_naming_the_field(live, oai, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                    extra_body=body)
    assert caught.value.body["param"] == param, caught.value.body
    status, answer = live.http("POST", "/v1/completions", {"model": BASE_ID, "prompt": "a", **body})
    assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("fields, name", [
    (dict(json_schema='{"type": "foo"}'), "json_schema"),
    (dict(json_schema="{not json"), "json_schema"),
    (dict(json_schema='"a string"'), "json_schema"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(json_object=True, regex="a"), "regex"),
    (dict(json_schema='{"type": "integer"}', grammar='start: "a"'), "grammar"),
    (dict(regex="a+", min_tokens=1), "min_tokens"),
])
def test_invalid_constraints_are_invalid_argument(live, fields, name):
    with pytest.raises(grpc.RpcError) as caught:
        grpc_generate(live, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{name}:"), caught.value.details()


# -- the engine's part ------------------------------------------------------------------------

def test_masks_are_begun_before_the_forward_and_compiles_are_cached(live):
    engine = live.server.engine
    events: list[str] = []
    start, model = engine.structured.start, engine.runner.model

    def recording_start(matchers):
        events.append("masks")
        return start(matchers)

    class RecordingModel:  # the real model, its calls recorded
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *args):
            events.append("forward")
            return model(*args)

    engine.structured.start, engine.runner.model = recording_start, RecordingModel()
    try:
        cached = engine.structured.cached()
        reply = grpc_generate(live, regex="[0-9]{6}")
        again = grpc_generate(live, regex="[0-9]{6}")
    finally:
        engine.structured.start, engine.runner.model = start, model
    assert reply.text == again.text and re.fullmatch("[0-9]{6}", reply.text)
    assert engine.structured.cached() == cached + 1  # the second request found it compiled
    constrained = [i for i, event in enumerate(events) if event == "masks"]
    assert len(constrained) == 2 * len(reply.token_ids)  # one mask job per sampled token...
    assert all(events[i + 1] == "forward" for i in constrained)  # ...begun before that step's forward


@pytest.mark.parametrize("rows, batch, vocab", [([0], 1, 33), ([1, 3], 5, 400), ([4, 0, 2], 6, 1000)])
def test_apply_masks_against_a_loop_over_tokens(rows, batch, vocab):
    import torch

    from loraquilt.server.structured_output import apply_masks

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(batch, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), (vocab + 31) // 32), dtype=torch.int32,
                            generator=generator)
    expected = logits.clone()
    for mask_row, row in enumerate(rows):
        for token in range(vocab):
            if not (int(bitmask[mask_row, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    apply_masks(logits, rows, bitmask)
    assert torch.equal(logits, expected)  # allowed logits exact, other rows untouched


def test_the_compiled_cache_is_bounded(live):
    from loraquilt.server.structured_output import StructuredOutput

    engine = live.server.engine
    cache = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.eos_ids, cache_size=3)
    for count in range(5):
        cache.compile(Constraint("regex", f"a{{{count + 1}}}"))
    assert cache.cached() == 3
    with pytest.raises(RequestError) as caught:
        cache.compile(Constraint("json_schema", '{"type": "object", "required": 5}', "response_format"))
    assert caught.value.field == "response_format"
