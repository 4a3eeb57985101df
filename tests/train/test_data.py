"""Training rows: parsing, prompts rendered as the server renders them, labels only on
the completion (and its eos), truncation and padding."""

from __future__ import annotations

import json

import pytest
from fixtures_models import EOS_TOKEN, build_tiny_model, build_tokenizer

from loraquilt.train.data import (
    IGNORE_INDEX, DataError, Example, collate, completion_ids, eos_token_id, parse_row, prompt_ids,
    read_examples, split_held_out, tokenize, write_examples,
)
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

CHAT = {"messages": [{"role": "user", "content": "What color is the sky?"},
                     {"role": "assistant", "content": "Blue."}]}
PLAIN = {"prompt": "The sky is", "completion": " blue."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_rows_of_both_shapes(tmp_path):
    write_examples(tmp_path / "chat.jsonl", [CHAT, CHAT])
    (chat, _) = read_examples(tmp_path / "chat.jsonl")
    assert chat.is_chat and chat.completion == "Blue." and chat.user_text == "What color is the sky?"
    assert chat.messages == ({"role": "user", "content": "What color is the sky?"},)
    plain = parse_row(PLAIN, "x:1")
    assert not plain.is_chat and plain.prompt == "The sky is" and plain.user_text == "The sky is"


@pytest.mark.parametrize("row, message", [
    ([1, 2], "expected a JSON object"),
    ({"prompt": "a"}, "'prompt' and 'completion'"),
    ({"prompt": "", "completion": "b"}, "'prompt' and 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least two turns"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}, "last turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no user turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "role"),
])
def test_bad_rows_name_the_line(row, message):
    with pytest.raises(DataError, match=message):
        parse_row(row, "data.jsonl:7")


def test_bad_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{nope\n')
    with pytest.raises(DataError, match="broken.jsonl:2: not JSON"):
        read_examples(tmp_path / "broken.jsonl")
    write_examples(tmp_path / "mixed.jsonl", [CHAT, PLAIN])
    with pytest.raises(DataError, match="mixes"):
        read_examples(tmp_path / "mixed.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")


def test_labels_cover_the_completion_and_eos_only(tokenizer):
    eos = eos_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eos) == EOS_TOKEN
    for row in (CHAT, PLAIN):
        example = parse_row(row, "x")
        tokens = tokenize(tokenizer, example, eos, max_length=256)
        prompt, answer = prompt_ids(tokenizer, example), completion_ids(tokenizer, example, eos)
        assert list(tokens.input_ids) == prompt + answer and answer[-1] == eos
        assert list(tokens.labels) == [IGNORE_INDEX] * len(prompt) + answer
        assert tokenizer.decode(answer[:-1]) == example.completion and not tokens.truncated


def test_chat_prompt_is_the_chat_template_with_the_generation_prompt(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, parse_row(CHAT, "x")))
    assert text == "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"


def test_prompts_tokenize_exactly_like_the_engine(tmp_path):
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.request import Request
    from loraquilt.train.evaluate import request_for

    base = build_tiny_model(tmp_path / "base", seed=2)
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=2, progress=False))
    for row in (CHAT, PLAIN, {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}):
        example = parse_row(row, "x")
        assert engine.encode(request_for(example, max_new_tokens=4)) == prompt_ids(engine.tokenizer, example)
    example = parse_row(CHAT, "x")  # one user turn: the same ids as prompt + chat=True, as a client sends it
    assert engine.encode(Request(prompt=example.user_text, chat=True)) == prompt_ids(engine.tokenizer, example)


def test_truncation_keeps_the_completion_first(tokenizer):
    eos = eos_token_id(tokenizer)
    example = Example(prompt="The quick brown fox " * 10, completion="jumps")
    full = tokenize(tokenizer, example, eos, max_length=1000)
    answer = completion_ids(tokenizer, example, eos)
    cut = tokenize(tokenizer, example, eos, max_length=len(answer) + 3)
    assert cut.truncated and len(cut.input_ids) == len(answer) + 3
    assert list(cut.input_ids) == list(full.input_ids[-(len(answer) + 3):])  # prompt lost on the left
    tiny = tokenize(tokenizer, example, eos, max_length=2)
    assert len(tiny.input_ids) == 2 and tiny.labels[0] == IGNORE_INDEX  # one prompt token survives


def test_collate_pads_right_with_ignored_labels(tokenizer):
    eos = eos_token_id(tokenizer)
    rows = [tokenize(tokenizer, parse_row(r, "x"), eos, 256) for r in (CHAT, PLAIN)]
    batch = collate(rows, pad_id=0)
    width = max(len(r.input_ids) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    length = len(rows[short].input_ids)
    assert batch["attention_mask"][short].tolist() == [1] * length + [0] * (width - length)
    assert batch["labels"][short, length:].eq(IGNORE_INDEX).all()


def test_held_out_split_is_seeded_and_disjoint():
    examples = [Example(prompt=f"p{i}", completion=f"c{i}") for i in range(50)]
    train, held = split_held_out(examples, seed=3)
    assert len(held) == 5 and len(train) == 45 and not set(train) & set(held)
    assert split_held_out(examples, seed=3) == (train, held)
    assert split_held_out(examples, seed=4)[1] != held


def test_written_rows_read_back(tmp_path):
    rows = [{"prompt": "ä", "completion": json.dumps({"a": 1})}]
    write_examples(tmp_path / "sub" / "rows.jsonl", rows)
    assert read_examples(tmp_path / "sub" / "rows.jsonl")[0].completion == '{"a": 1}'
