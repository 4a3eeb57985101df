"""Token ids -> text as it grows: stop strings cut, nothing emitted that may still change."""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a partial (or invalid) UTF-8 sequence decodes to


@dataclass
class TextUpdate:
    text: str  # the full generated text so far (cut at a stop string)
    stable_chars: int  # how much of it can be handed out now
    stopped: bool  # a stop string was found


def render(tokenizer, token_ids: list[int], stop: tuple[str, ...], final: bool) -> TextUpdate:
    """Decode the generated ids; find the first stop string; hold back a trailing partial
    UTF-8 character and any tail that could still become a stop string."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        return TextUpdate(text[:cut], cut, True)
    if final:
        return TextUpdate(text, len(text), False)
    complete = text.rstrip(REPLACEMENT)  # a trailing partial UTF-8 character may still change
    stable = _held_back_end(complete, stop)
    return TextUpdate(text, stable, False)


def _held_back_end(complete: str, stop: tuple[str, ...]) -> int:
    """len(complete) less the longest tail that is a proper prefix of some stop string."""
    stable = len(complete)
    for s in stop:
        for length in range(min(len(s) - 1, len(complete)), 0, -1):
            if complete.endswith(s[:length]):
                stable = min(stable, len(complete) - length)
                break
    return stable


class IncrementalDetokenizer:
    """One sequence's output text as tokens arrive.

    What it hands out at each step is what the engine handed out when it re-rendered all
    ids so far with `render` at every step (text[emitted:stable], everything left when
    `final`), and `stopped` flips at the same step; but a step decodes only a few tokens:

    - the ids before read_offset are decoded for good (the committed text). The text of
      the ids after them, `pending`, is decode(ids[prefix_offset:]) less
      decode(ids[prefix_offset:read_offset]): with context tokens in front, whatever a
      decoder does at the start of its input (SentencePiece-style decoders drop a leading
      space) happens to the context, not to the new tokens.
    - pending is committed once it is non-empty and does not end in U+FFFD (it ends on a
      character boundary): prefix_offset moves to read_offset, read_offset to the end, and
      the ids before prefix_offset are dropped.
    - stop strings are searched for in pending and the len(longest stop) - 1 committed
      characters before it: an occurrence that ends earlier was looked for already.

    With a byte-level BPE `text` equals render's at every step. A byte-fallback decoder
    shows a whole run of <0xNN> tokens as one U+FFFD per byte while a character of the run
    is partial or invalid: there render's text (and its stable part) shrinks meanwhile,
    whereas here characters completed earlier stay; the text handed out is the same, and
    so is `text` at the end, whenever every run ends up valid UTF-8. (With an invalid run,
    rendering hands out characters its own final text no longer has; here `text` keeps
    them.) Tokenizers that clean up spaces across tokens (WordPiece with
    clean_up_tokenization_spaces) can differ from render at window edges.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stopped = False
        self._tail_len = max(max((len(s) for s in self.stop), default=0) - 1, 0)
        self._ids: list[int] = []  # the ids from prefix_offset on
        self._read_offset = 0  # into _ids
        self._prefix_text: str | None = ""  # decode(_ids[:read_offset]); None: not decoded yet
        self._chunks: list[str] = []  # the committed text
        self._committed_len = 0
        self._tail = ""  # the last _tail_len committed characters
        self._pending = ""
        self._emitted = 0  # characters handed out

    @property
    def text(self) -> str:
        """The full text so far (cut at a stop string once stopped); joined when read."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return (self._chunks[0] if self._chunks else "") + self._pending

    def add(self, token_ids: list[int] | tuple[int, ...], final: bool) -> str:
        """Append new generated ids (usually one; may be empty when only `final` changes);
        return the newly stable text to hand out (may be ""). When `final` is True,
        everything left is handed out. Once a stop string is found, `stopped` becomes True,
        `text` is cut before it, and nothing more is ever emitted."""
        if self.stopped:
            return ""
        if token_ids:
            self._ids.extend(token_ids)
            self._decode_pending()
        base = self._committed_len - len(self._tail)  # where `window` starts in the text
        window = self._tail + self._pending
        start = self._emitted - base  # >= 0: the tail is never ahead of what was handed out

        cut = min((i for i in (window.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._chunks = [self.text[:base] + window[:cut]]
            self._committed_len = self._emitted = base + cut
            self._pending = self._tail = ""
            self._ids.clear()
            return window[start:cut]

        stable = len(window) if final else _held_back_end(window.rstrip(REPLACEMENT), self.stop)
        out = window[start:stable]
        self._emitted = max(self._emitted, base + stable)
        self._maybe_commit()
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _decode_pending(self) -> None:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read_offset])
        self._pending = self._decode(self._ids)[len(self._prefix_text):]

    def _maybe_commit(self) -> None:
        pending = self._pending
        if not pending or pending.endswith(REPLACEMENT):
            return
        self._chunks.append(pending)
        self._committed_len += len(pending)
        if self._tail_len:
            self._tail = (self._tail + pending)[-self._tail_len:]
        del self._ids[: self._read_offset]  # the new context: the ids just committed
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._pending = ""
