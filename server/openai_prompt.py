"""What an OpenAI-compatible response returns of the prompt (beside server/openai_protocol.py):
completions' `prompt` as text or token ids, `echo` (the prompt before the completion, its
tokens' log probabilities in OpenAI's legacy shape when `logprobs` is set) and vLLM's
`prompt_logprobs` extra (completions and chat), from the engine's prompt entries
(GenerationResult.prompt_logprobs: the first token without a log probability, then one
entry per scored prompt token).

The echoed text is the prompt as sent (for token ids: their texts joined); `text_offset`
counts the characters of each token's own text, as for generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraquilt.server.generation import ErrorKind, GenerationError
from loraquilt.server.request import MAX_LOGPROBS


def _bad(param: str, message: str) -> GenerationError:
    return GenerationError(ErrorKind.INVALID_ARGUMENT, f"{param}: {message}", param)


@dataclass(frozen=True)
class PromptReturn:
    """What a response returns of the prompt: completions' `echo` (the prompt's text before
    the completion; `text` None for a prompt of token ids; with `echo_top` set (the body's
    `logprobs`), its tokens' log probabilities before the completion's) and vLLM's
    `prompt_logprobs` (`vllm_top` alternatives per token)."""

    echo: bool = False
    text: str | None = None
    echo_top: int | None = None
    vllm_top: int | None = None

    def echoed(self, text: str, prompt_entries) -> str:
        """A completion's text, after the prompt's when it is echoed (in the piece that
        carries the prompt's entries)."""
        if not self.echo or not prompt_entries:
            return text
        prompt = self.text if self.text is not None else "".join(entry.text for entry in prompt_entries)
        return prompt + text

    def echoed_entries(self, entries, prompt_entries) -> list:
        """The entries of a completions logprobs object: with echo, the prompt's first
        (their alternatives cut to `echo_top`), then the generated ones."""
        if not self.echo or not prompt_entries:
            return list(entries)
        top = self.echo_top or 0
        return [replace(e, top=e.top[:top], top_texts=e.top_texts[:top]) for e in prompt_entries] + list(entries)

    def add_vllm_field(self, choice: dict, prompt_entries) -> dict:
        """vLLM's `prompt_logprobs` in the choice: null for the first token, then per token
        {token id: {logprob, rank, decoded_token}} of its `vllm_top` most likely
        alternatives (ranks 1..k) and the token itself."""
        if self.vllm_top is None or not prompt_entries:
            return choice
        scored: list[dict | None] = []
        for entry in prompt_entries:
            if entry.logprob is None:
                scored.append(None)
                continue
            alternatives = zip(entry.top[:self.vllm_top], entry.top_texts, range(1, self.vllm_top + 1))
            tokens = {str(token): {"logprob": value, "rank": rank, "decoded_token": text}
                      for (token, value), text, rank in alternatives}
            tokens.setdefault(str(entry.token_id), {"logprob": entry.logprob, "rank": entry.rank,
                                                    "decoded_token": entry.text})
            scored.append(tokens)
        choice["prompt_logprobs"] = scored
        return choice


MAX_PROMPTS = 128  # prompts of one completions request


def completion_prompts(prompt) -> list[dict]:
    """Completions' `prompt`: a string or a list of token ids, or a list of several of
    either (answered as one response: choice i·n + j is prompt i's j-th), each as
    build_request's `prompt` or `prompt_token_ids`."""
    if isinstance(prompt, list) and prompt and all(isinstance(one, (str, list)) for one in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        return [_one_prompt(one) for one in prompt]
    return [_one_prompt(prompt)]


def _one_prompt(prompt) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_token_ids": tuple(prompt)}
    raise _bad("prompt", "must be a string or a list of token ids, or a list of several of either")


def vllm_prompt_logprobs(body: dict) -> int | None:
    """vLLM's `prompt_logprobs`: alternatives per prompt token (vLLM's -1, the whole
    vocabulary, is refused)."""
    count = body.get("prompt_logprobs")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LOGPROBS):
        raise _bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] (alternatives per prompt token)")
    return count


def scoring_fields(returned: PromptReturn) -> dict:
    """The engine's prompt_logprobs for what the response returns: the most alternatives
    echo or vLLM's field asks for (echo alone scores too: its tokens' texts); {} when neither."""
    asked = [top for top in (returned.vllm_top, (returned.echo_top or 0) if returned.echo else None) if top is not None]
    return {"prompt_logprobs": max(asked)} if asked else {}
