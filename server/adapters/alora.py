"""Activated LoRA (aLoRA, PEFT's `alora_invocation_tokens`): where an adapter starts to
apply in a request.

Semantics (PEFT 0.21's ALoraLinearVariant and calculate_alora_offsets): an aLoRA adapter
applies from the start of the LAST occurrence of its invocation token sequence in the
prompt onwards (the invocation tokens included, and every generated token); the
positions before it run on the base model alone, so their KV is the base model's and
can be shared with the base and with every other aLoRA adapter (the prefix cache keys
those blocks as the base model's). A prompt that does not hold the invocation runs on the
base model throughout, as in PEFT.
"""

from __future__ import annotations

NEVER = 2**62  # the activation position of a prompt without the invocation: past any sequence


def activation_start(prompt_ids, invocation: tuple[int, ...]) -> int:
    """The first position the adapter applies to: the start of the invocation's last
    occurrence in the prompt, or NEVER when it does not occur."""
    width = len(invocation)
    for start in range(len(prompt_ids) - width, -1, -1):
        if tuple(prompt_ids[start:start + width]) == invocation:
            return start
    return NEVER
