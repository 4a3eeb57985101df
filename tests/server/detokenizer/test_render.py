"""render(): the text of generated ids with a real (offline-built) byte-level BPE
tokenizer: stop strings, held-back tails and multibyte characters split across tokens, and
streams of renders that never take text back."""

import pytest
from fixtures_detokenizer import REPLACEMENT
from fixtures_tokenizer import EOS_TOKEN

from loraquilt.server.detokenizer import TextUpdate, render


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    return ids


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


def stream(tokenizer, text: str, stop: tuple[str, ...]) -> list[TextUpdate]:
    """Render after every generated token as the engine does, the last render final, until a
    stop string is found."""
    ids = encode(tokenizer, text)
    updates = []
    for end in range(1, len(ids) + 1):
        update = render(tokenizer, ids[:end], stop, final=end == len(ids))
        updates.append(update)
        if update.stopped:
            break
    return updates


# -- stop strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("text", ["The baker opened his shop.", "Numbers: 1, 2, 3,", "x"])
def test_without_stop_strings_everything_is_stable(tokenizer, text, final):
    update = render(tokenizer, encode(tokenizer, text), (), final=final)
    assert update == TextUpdate(text, len(text), False)


def test_empty_output(tokenizer):
    assert render(tokenizer, [], ("stop",), final=False) == TextUpdate("", 0, False)


@pytest.mark.parametrize("final", [False, True])
def test_stop_string_in_the_middle_cuts_the_text(tokenizer, final):
    ids = encode(tokenizer, "The baker opened his shop before sunrise")
    update = render(tokenizer, ids, ("opened",), final=final)
    assert update == TextUpdate("The baker ", len("The baker "), True)


def test_first_occurrence_of_a_stop_string_cuts(tokenizer):
    ids = encode(tokenizer, "one. two. three.")
    assert render(tokenizer, ids, (".",), final=False) == TextUpdate("one", 3, True)


def test_stop_string_at_the_start_leaves_nothing(tokenizer):
    ids = encode(tokenizer, "Stop here please")
    assert render(tokenizer, ids, ("Stop",), final=False) == TextUpdate("", 0, True)


def test_stop_string_at_the_very_end(tokenizer):
    ids = encode(tokenizer, "the river ran low")
    assert render(tokenizer, ids, ("low",), final=False) == TextUpdate("the river ran ", 14, True)


@pytest.mark.parametrize(
    "stop",
    [("shop", "baker"), ("baker", "shop"), ("zzz", "shop", "opened", "baker")],
    ids=["later-listed-first", "earlier-listed-first", "among-several"],
)
def test_earliest_stop_string_wins_whatever_the_listing_order(tokenizer, stop):
    ids = encode(tokenizer, "Every morning the baker opened his shop")
    update = render(tokenizer, ids, stop, final=False)
    assert update == TextUpdate("Every morning the ", len("Every morning the "), True)


def test_overlapping_stop_strings_cut_at_the_earliest_start(tokenizer):
    ids = encode(tokenizer, "the bread was warm")
    update = render(tokenizer, ids, ("was warm", "bread was"), final=False)
    assert update.text == "the " and update.stopped


def test_special_tokens_are_not_part_of_the_text(tokenizer):
    ids = encode(tokenizer, "hello there") + [tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    assert render(tokenizer, ids, (), final=True) == TextUpdate("hello there", 11, False)


# -- held-back tails --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stop, held",
    [
        ("Once upon a ti", ("time",), 2),
        ("Once upon a t", ("time",), 1),
        ("the end\n", ("\n\n",), 1),
        ("xaba", ("abab",), 3),  # the longest matching prefix counts, not the first found
        ("by the river ba", ("bank robber", "ba!"), 2),
        ("by the river bank", ("bank robber", "nk!"), 4),  # the longest hold over all stops
        ("the mill", ("mill.", "l!"), 4),
    ],
)
def test_tail_that_may_become_a_stop_string_is_held_back(tokenizer, text, stop, held):
    ids = encode(tokenizer, text)
    update = render(tokenizer, ids, stop, final=False)
    assert update == TextUpdate(text, len(text) - held, False)
    assert render(tokenizer, ids, stop, final=True) == TextUpdate(text, len(text), False)


@pytest.mark.parametrize(
    "text, stop",
    [("Once upon a tim", ("time!",)), ("the river", ("rivers",)), ("warm bread", ("x", "read!"))],
)
def test_tail_held_back_until_it_can_no_longer_match(tokenizer, text, stop):
    """Holding back stops as soon as the tail diverges from every stop string."""
    held = render(tokenizer, encode(tokenizer, text), stop, final=False)
    assert held.stable_chars < len(held.text)
    diverged = text + " and then"
    update = render(tokenizer, encode(tokenizer, diverged), stop, final=False)
    assert update == TextUpdate(diverged, len(diverged), False)


def test_tail_not_a_prefix_of_any_stop_string_is_stable(tokenizer):
    text = "the river ran low"
    update = render(tokenizer, encode(tokenizer, text), ("fox", "ran!", "xyz"), final=False)
    assert update == TextUpdate(text, len(text), False)


# -- multibyte characters ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["café", "日本", "a🙂b", "naïve résumé 日本語 🙂🎉 done"])
def test_partial_characters_are_never_stable(tokenizer, text):
    """Characters split over several tokens decode to U+FFFD until complete; that part is
    held back, and the stable text only ever grows as a prefix of the final text."""
    ids = encode(tokenizer, text)
    assert len(ids) > len(text), "expected some characters to span several tokens"
    seen_partial = False
    previous = 0
    for end in range(1, len(ids) + 1):
        update = render(tokenizer, ids[:end], (), final=False)
        seen_partial |= REPLACEMENT in update.text
        stable = update.text[: update.stable_chars]
        assert REPLACEMENT not in stable
        assert text.startswith(stable)
        assert update.stable_chars >= previous
        previous = update.stable_chars
    assert seen_partial
    assert render(tokenizer, ids, (), final=False) == TextUpdate(text, len(text), False)


def test_partial_character_is_released_when_final(tokenizer):
    ids = encode(tokenizer, "café")
    partial = ids[:-1]
    held = render(tokenizer, partial, (), final=False)
    assert held.text.endswith(REPLACEMENT)
    assert held.stable_chars == len(held.text.rstrip(REPLACEMENT))
    final = render(tokenizer, partial, (), final=True)
    assert final.stable_chars == len(final.text)


# -- streaming --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, stop",
    [
        ("The baker opened his shop", ()),
        ("The baker opened his shop", ("opened",)),
        ("Once upon a time there was", ("time", "was")),
        ("a b a b a b c", ("b c",)),
        ("the end\n\nNext", ("\n\n",)),
        ("café au lait", ("au",)),
        ("naïve 日本語 🙂🎉 done", ()),
        ("prix: 10 € net", ("€ net",)),
        ("say 日本 now", ("本",)),
        pytest.param("say 日本 now", ("日本",), id="cjk-stop"),
        pytest.param("café!", ("fé",), id="latin-accent-stop"),
        pytest.param("xa日", ("a日",), id="ascii-then-cjk-stop"),
    ],
)
def test_streamed_text_is_never_taken_back(tokenizer, text, stop):
    """Rendering token by token: the stable part only grows, is free of partial characters,
    and is always a prefix of the text finally returned."""
    updates = stream(tokenizer, text, stop)
    expected = cut_at_stop(text, stop)
    last = updates[-1]
    assert last.text == expected
    assert last.stopped == (expected != text)
    assert last.stable_chars == len(expected)
    previous = 0
    for update in updates:
        stable = update.text[: update.stable_chars]
        assert REPLACEMENT not in stable
        assert expected.startswith(stable), (update, expected)
        assert update.stable_chars >= previous, (update, previous)
        previous = update.stable_chars
