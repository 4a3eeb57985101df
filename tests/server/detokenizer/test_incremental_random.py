"""IncrementalDetokenizer against rendering everything at every step, on random outputs
(random ids, steps and stop strings) of every tokenizer kind, and the cost of a step on a
long output."""

import pytest
from fixtures_detokenizer import (
    REPLACEMENT, SNIPPETS, SP_CORPUS, TOKENIZER_KINDS, assert_hands_out_as_render, byte_fallback, fed_ids,
    random_cases, replay_incremental, replay_render,
)

from loraquilt.server.detokenizer import IncrementalDetokenizer, render


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["bpe", "smollm2"])
def test_incremental_equals_rendering_everything_at_every_step(tokenizer_of, kind, seed):
    """Byte-level BPE, random ids (lone byte tokens included, so also invalid UTF-8), random
    stop strings: the same text handed out at the same step, the same `text` at every step,
    `stopped` at the same step."""
    tokenizer = tokenizer_of(kind)
    for ids, steps, stop in random_cases(tokenizer, seed, 40, lone_bytes=True):
        expected = replay_render(tokenizer, steps, stop)
        assert replay_incremental(tokenizer, steps, stop) == expected, (ids, steps, stop)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_sentencepiece_hands_out_what_rendering_hands_out(sp_tokenizer, seed):
    """SentencePiece-style BPE, random ids with valid byte-fallback runs, random stop strings:
    the same text handed out at the same step, `stopped` at the same step, the same final
    `text`. (While a run is partial, render's text shows the whole run as U+FFFDs.)"""
    for ids, steps, stop in random_cases(sp_tokenizer, 50 + seed, 40, lone_bytes=False):
        assert byte_fallback(sp_tokenizer)
        assert_hands_out_as_render(sp_tokenizer, steps, stop)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_hands_out_a_growing_prefix_of_the_final_text(any_tokenizer, seed):
    """Everything handed out adds up to render(..., final=True).text; before the end, what was
    handed out is a prefix of it and never ends in a tail that could still turn into a stop
    string. (Byte-fallback runs are kept valid here: an invalid one turns into U+FFFDs as a
    whole, also in render, so text handed out earlier would not be a prefix.)"""
    for ids, steps, stop in random_cases(any_tokenizer, 100 + seed, 40, lone_bytes=False):
        detokenizer = IncrementalDetokenizer(any_tokenizer, stop)
        handed_out, so_far = "", []
        for n, (new, final) in enumerate(steps):
            handed_out += detokenizer.add(new, final)
            so_far.append(handed_out)
            fed = fed_ids(steps, n + 1)
            if detokenizer.stopped or final:
                break
            # A byte-fallback run decodes to U+FFFDs while its last character is partial, so the
            # text now may be shorter than what was handed out before; check when it is not.
            complete = render(any_tokenizer, fed, (), final=False).text.rstrip(REPLACEMENT)
            if not complete.startswith(handed_out):
                continue
            for s in stop:  # a started stop string is held back until the text departs from it
                for length in range(1, len(s)):
                    if handed_out.endswith(s[:length]):
                        assert not s.startswith(complete[len(handed_out) - length:]), (s, handed_out)
        final_text = render(any_tokenizer, fed, stop, final=True)
        assert handed_out == final_text.text == detokenizer.text, (ids, steps, stop)
        assert detokenizer.stopped == final_text.stopped
        assert all(final_text.text.startswith(text) for text in so_far)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_incremental_decodes_a_few_tokens_per_step(tokenizer_of, kind, monkeypatch):
    """Over a 500-token output, no decode call sees more than a handful of ids, and a step
    makes at most two calls: the cost of a step does not grow with the output."""
    tokenizer = tokenizer_of(kind)
    paragraph = " ".join(SNIPPETS) + " " + " ".join(SP_CORPUS) + "\n\n"
    ids = (tokenizer.encode(paragraph * 20, add_special_tokens=False))[:500]
    assert len(ids) == 500
    stop = ("never appears!", "\n\n\n", "🙂🙂")
    expected = render(tokenizer, ids, stop, final=True).text

    sizes: list[int] = []
    decode = tokenizer.decode

    def counting_decode(token_ids, *args, **kwargs):
        sizes.append(len(token_ids))
        return decode(token_ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    detokenizer = IncrementalDetokenizer(tokenizer, stop)
    handed_out, calls_per_step = "", []
    for n, i in enumerate(ids):
        before = len(sizes)
        handed_out += detokenizer.add([i], final=n == len(ids) - 1)
        calls_per_step.append(len(sizes) - before)
    monkeypatch.undo()
    assert handed_out == expected == detokenizer.text and not detokenizer.stopped
    assert max(sizes) < 16 and max(calls_per_step) <= 2, (max(sizes), max(calls_per_step))
    assert sum(sizes) < 6 * len(ids)
