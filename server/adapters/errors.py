"""The adapter layer's refusal: one error type for every folder the engine will not serve."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter folder the engine refuses; the message says what and why."""
