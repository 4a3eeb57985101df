"""JSON from outside the server (HTTP bodies, adapter configs, the state file) parsed with
bounds: nesting depth, and every failure of the parser one error type with a message for
the caller (Python's parser raises RecursionError past ~1000 levels and ValueError for an
integer over 4300 digits, besides its own JSONDecodeError)."""

from __future__ import annotations

import json

MAX_JSON_DEPTH = 64  # request bodies and PEFT configs are a few levels deep


class JsonInputError(ValueError):
    """Input that is not JSON, or JSON nested deeper than allowed; the message says which."""


def nesting_depth(value) -> int:
    """Levels of objects and arrays in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH):
    """The parsed value of `data` (UTF-8 when bytes); JsonInputError when it is not valid
    JSON or nests objects and arrays deeper than `max_depth`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except RecursionError:
        raise JsonInputError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, an over-long integer
        raise JsonInputError(f"not valid JSON: {error}") from None
    if nesting_depth(value) > max_depth:
        raise JsonInputError(f"JSON nested deeper than {max_depth} levels")
    return value
