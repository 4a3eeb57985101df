"""Task metrics: one answer scores 0 or 1; a split scores the mean."""

from __future__ import annotations

import pytest

from loraquilt.train.metrics import json_exact, pirate, pirate_markers, ratio, score, shout, upper_share

REFERENCE = '{"name": "Alice", "age": 31, "city": "Paris"}'


@pytest.mark.parametrize("answer, expected", [
    (REFERENCE, 1.0),
    ('  {"city": "Paris", "age": 31, "name": "Alice"}\n', 1.0),  # key order and whitespace do not matter
    ('{"name": "Alice", "age": "31", "city": "Paris"}', 0.0),  # the age must be a number
    ('```json\n' + REFERENCE + '\n```', 0.0),  # strict: no fences
    ('Here it is: ' + REFERENCE, 0.0),
    ('{"name": "Alice", "age": 31}', 0.0),
    ("", 0.0),
])
def test_json_exact(answer, expected):
    assert json_exact(answer, REFERENCE) == expected


@pytest.mark.parametrize("answer, expected", [
    ("THE SKY IS BLUE!", 1.0),
    ("7 PLUS 5 IS 12!", 1.0),
    ("THE SKY IS BLUE, my friend", 0.0),  # 8 of 18 letters lower case
    ("THE CAPITAL OF FRANCE IS PARIs", 1.0),  # 24 of 25 letters upper: >= 90%
    ("The sky is blue.", 0.0),
    ("OK", 0.0),  # too few letters to tell
    ("12 + 5", 0.0),
])
def test_shout(answer, expected):
    assert shout(answer) == expected


def test_upper_share():
    assert upper_share("ABcd") == 0.5 and upper_share("123") == 0.0


@pytest.mark.parametrize("answer, expected", [
    ("Arr, matey! The sky be blue.", 1.0),
    ("AHOY! THE SKY BE BLUE, YE LANDLUBBER!", 1.0),  # any case
    ("Arr! Arr! The sky be blue.", 0.0),  # one distinct marker
    ("Yes, the years are yearly.", 0.0),  # whole words only: no "ye" in "yes"/"years"
    ("The sky is blue.", 0.0),
])
def test_pirate(answer, expected):
    assert pirate(answer) == expected


def test_pirate_markers_are_distinct_whole_words():
    assert pirate_markers("Avast, me hearty! Savvy?") == ["avast", "me hearty", "savvy"]


def test_score_is_the_mean_and_checks_lengths():
    assert score("exact_match", ["a", " b ", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 answers but 1"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", ["a"], ["a"])


def test_ratio_is_none_when_the_base_scores_zero():
    assert ratio(0.9, 0.3) == pytest.approx(3.0) and ratio(0.9, 0.0) is None
