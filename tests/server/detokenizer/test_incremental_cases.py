"""IncrementalDetokenizer on chosen cases, with every tokenizer kind: characters split
across tokens, stop strings across token boundaries and at the very beginning, the final
flush, empty steps, special tokens, and SentencePiece decoders that drop a leading space or
turn an invalid byte-fallback run into U+FFFDs."""

import pytest
from fixtures_detokenizer import (
    REPLACEMENT, assert_hands_out_as_render, one_by_one, replay_incremental, replay_render, special_ids,
)

from loraquilt.server.detokenizer import IncrementalDetokenizer, render


@pytest.mark.parametrize("text", ["naïve 日本語", "日本語のテキスト", "a🙂b 🎉👍🏽",
                                  "prix: 10 € net 日本 🙂🎉 done"])
def test_incremental_multibyte_characters_split_across_tokens(any_tokenizer, text):
    """Fed one id at a time, a character split over several tokens is held back until it is
    complete, and no U+FFFD is ever handed out."""
    ids = any_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), "expected characters spanning several tokens"
    detokenizer = IncrementalDetokenizer(any_tokenizer)
    outs = [detokenizer.add([i], final=False) for i in ids]
    assert "" in outs[1:], "expected a partial character held back at some step"
    assert all(REPLACEMENT not in out for out in outs)
    assert "".join(outs) == any_tokenizer.decode(ids) == detokenizer.text
    assert detokenizer.add((), final=True) == ""
    assert_hands_out_as_render(any_tokenizer, one_by_one(ids), ())
    assert_hands_out_as_render(any_tokenizer, one_by_one(ids), ("語の", "🎉", "本"))


def test_incremental_partial_character_is_released_when_final(any_tokenizer):
    ids = any_tokenizer.encode("ok 日", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(any_tokenizer)
    held = "".join(detokenizer.add([i], final=False) for i in ids)
    rest = detokenizer.add((), final=True)
    assert rest.endswith(REPLACEMENT) and held + rest == render(any_tokenizer, ids, (), final=True).text


def stop_step(tokenizer, ids: list[int], stop: tuple[str, ...]) -> int:
    """The number of ids after which the decoded text first holds a stop string."""
    return next(n for n in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop))


@pytest.mark.parametrize("stop, expected", [
    (("r op",), "The bake"),
    (("ned h", "zzz"), "The baker ope"),
    (("s shop", "zzz", "d hi"), "The baker opene"),  # the earliest wins, whatever the order
    (("d his s", "ed h"), "The baker open"),
])
def test_incremental_stop_string_across_token_boundaries(any_tokenizer, stop, expected):
    text = "The baker opened his shop before sunrise"
    ids = any_tokenizer.encode(text, add_special_tokens=False)
    pieces = [any_tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
    for s in stop:  # no stop string lies within one token
        start = text.find(s)
        if start >= 0:
            assert not any(len(a) <= start and start + len(s) <= len(b) for a, b in zip(pieces, pieces[1:]))
    detokenizer = IncrementalDetokenizer(any_tokenizer, stop)
    outs = []
    for n, i in enumerate(ids, 1):
        outs.append(detokenizer.add([i], final=False))
        assert detokenizer.stopped == (n >= stop_step(any_tokenizer, ids, stop))
        if detokenizer.stopped:
            break
    assert "".join(outs) == detokenizer.text == expected
    assert detokenizer.add(ids[len(outs):], final=False) == "" and detokenizer.add((), final=True) == ""
    assert detokenizer.text == expected and detokenizer.stopped


@pytest.mark.parametrize("stop", [("The",), ("T",), ("", "x"), ("zz", "The b")])
def test_incremental_stop_string_at_the_very_beginning(any_tokenizer, stop):
    ids = any_tokenizer.encode("The baker opened", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(any_tokenizer, stop)
    outs = []
    for i in ids:
        outs.append(detokenizer.add([i], final=False))
        if detokenizer.stopped:
            break
    assert outs == [""] * len(outs) and detokenizer.stopped and detokenizer.text == ""
    assert len(outs) == stop_step(any_tokenizer, ids, stop)


def test_incremental_empty_stop_string_stops_before_any_token(any_tokenizer):
    detokenizer = IncrementalDetokenizer(any_tokenizer, ("",))
    assert detokenizer.add((), final=False) == "" and detokenizer.stopped and detokenizer.text == ""


@pytest.mark.parametrize("text, stop, held", [
    ("Once upon a ti", ("time",), "ti"),
    ("the end\n", ("\n\n",), "\n"),
    ("by the river ba", ("bank robber", "ba!"), "ba"),
    ("the mill", ("mill.", "l!"), "mill"),
])
def test_incremental_final_flush_hands_out_the_held_back_tail(any_tokenizer, text, stop, held):
    ids = any_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(any_tokenizer, stop)
    before = "".join(detokenizer.add([i], final=False) for i in ids)
    assert before + held == text and not detokenizer.stopped
    assert detokenizer.add((), final=True) == held
    assert detokenizer.add((), final=True) == "" and detokenizer.text == text


def test_incremental_empty_adds_change_nothing(any_tokenizer):
    ids = any_tokenizer.encode("naïve 日本 🙂 the baker", add_special_tokens=False)
    stop = ("baker",)
    plain = one_by_one(ids)
    interleaved = [step for new, final in plain for step in (((), False), (new, final), ((), False))]
    expected = replay_render(any_tokenizer, plain, stop)
    got = assert_hands_out_as_render(any_tokenizer, interleaved, stop)
    assert [out for out, _, _ in got if out] == [out for out, _, _ in expected if out]
    assert all(out == "" for (new, _), (out, _, _) in zip(interleaved, got) if not new)
    assert got[-1][1:] == expected[-1][1:] == ("naïve 日本 🙂 the ", True)


def test_incremental_special_tokens_in_the_middle_are_not_text(any_tokenizer):
    """A special token in the middle is dropped, and the word after it keeps its leading
    space (a SentencePiece decoder would drop it if that word started the decoded window)."""
    specials = special_ids(any_tokenizer)
    hello = any_tokenizer.encode("hello", add_special_tokens=False)
    world = any_tokenizer.encode("hello world", add_special_tokens=False)[len(hello):]
    ids = [specials[-1]] + hello + specials + world + [specials[0]]
    assert any_tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    for steps in (one_by_one(ids), one_by_one(ids, final_alone=True), [(tuple(ids), True)]):
        got = assert_hands_out_as_render(any_tokenizer, steps, ())
        assert "".join(out for out, _, _ in got) == got[-1][1] == "hello world"


def test_sentencepiece_suffix_alone_loses_its_leading_space(sp_tokenizer):
    """Why the window decodes context tokens in front of the new ones."""
    ids = sp_tokenizer.encode("The baker opened his shop", add_special_tokens=False)
    assert sp_tokenizer.decode(ids[1:]) == "baker opened his shop"
    detokenizer = IncrementalDetokenizer(sp_tokenizer)
    assert [detokenizer.add([i], final=False) for i in ids] == ["The", " baker", " opened", " his", " shop"]


def test_invalid_byte_fallback_run_keeps_the_characters_handed_out(sp_tokenizer):
    """<0xE6><0x97><0xA5> is 日; one more <0xE6> makes the run invalid, and a byte-fallback
    decoder then shows all four bytes as U+FFFDs. Rendering everything hands out 日 first and
    ends with a text without it; here `text` keeps 日, and is what was handed out."""
    run = sp_tokenizer.convert_tokens_to_ids(["<0xE6>", "<0x97>", "<0xA5>", "<0xE6>"])
    say = sp_tokenizer.encode("say", add_special_tokens=False)
    ids = say + run + sp_tokenizer.encode("say now", add_special_tokens=False)[len(say):]
    assert render(sp_tokenizer, ids, (), final=True).text == "say" + REPLACEMENT * 4 + " now"
    steps = one_by_one(ids)
    got, expected = replay_incremental(sp_tokenizer, steps, ()), replay_render(sp_tokenizer, steps, ())
    assert [out for out, _, _ in got] == [out for out, _, _ in expected]
    assert "".join(out for out, _, _ in got) == got[-1][1] == "say日" + REPLACEMENT * 3 + " now"
