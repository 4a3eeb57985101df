"""Task metrics: each scores one generated answer against its reference as 0 or 1, and a
metric over a split is the mean, a rate in [0, 1]. No torch here.

* ``exact_match`` - the answer equals the reference (surrounding whitespace ignored);
* ``json_exact`` - the whole answer parses as JSON and equals the reference parsed as JSON
  (strict output format: no code fences, no prose around it);
* ``shout`` - at least 90% of the answer's letters are upper case (and it has >= 3 letters);
* ``pirate`` - the answer holds at least two distinct pirate markers ("arr", "matey", "ye", ...).
"""

from __future__ import annotations

import json
import re
from typing import Callable, Sequence

PIRATE_MARKERS = ("arr", "ahoy", "avast", "matey", "ye", "aye", "me hearty", "landlubber", "yo ho",
                  "savvy", "shiver me timbers", "scallywag", "booty", "grog", "seven seas", "buccaneer")
_PIRATE_PATTERNS = tuple(re.compile(rf"\b{re.escape(marker)}\b", re.IGNORECASE) for marker in PIRATE_MARKERS)
SHOUT_MIN_UPPER = 0.9
SHOUT_MIN_LETTERS = 3
PIRATE_MIN_MARKERS = 2


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def json_exact(answer: str, reference: str) -> float:
    try:
        return float(json.loads(answer.strip()) == json.loads(reference))
    except (json.JSONDecodeError, ValueError):
        return 0.0


def upper_share(text: str) -> float:
    """Share of the letters of ``text`` that are upper case (0 without letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def shout(answer: str, reference: str = "") -> float:
    letters = sum(c.isalpha() for c in answer)
    return float(letters >= SHOUT_MIN_LETTERS and upper_share(answer) >= SHOUT_MIN_UPPER)


def pirate_markers(text: str) -> list[str]:
    """The distinct pirate markers found in ``text`` (whole words, any case)."""
    return [marker for marker, pattern in zip(PIRATE_MARKERS, _PIRATE_PATTERNS) if pattern.search(text)]


def pirate(answer: str, reference: str = "") -> float:
    return float(len(pirate_markers(answer)) >= PIRATE_MIN_MARKERS)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_exact": json_exact,
    "shout": shout,
    "pirate": pirate,
}


def metric_function(name: str) -> Callable[[str, str], float]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


def score(name: str, answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean of the per-answer scores: a rate in [0, 1]."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("no answers to score")
    function = metric_function(name)
    return sum(function(a, r) for a, r in zip(answers, references)) / len(answers)


def ratio(adapter: float, base: float) -> float | None:
    """adapter / base; None when the base scores 0 (any gain is then unbounded)."""
    return adapter / base if base > 0 else None
