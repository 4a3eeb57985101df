"""Token ids -> text as it grows: stop strings cut, nothing emitted that may still change."""

from __future__ import annotations

from dataclasses import dataclass


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
    complete = text.rstrip("\ufffd")  # a trailing partial UTF-8 character may still change
    stable = len(complete)
    for s in stop:
        for length in range(min(len(s) - 1, len(complete)), 0, -1):
            if complete.endswith(s[:length]):
                stable = min(stable, len(complete) - length)
                break
    return TextUpdate(text, stable, False)
