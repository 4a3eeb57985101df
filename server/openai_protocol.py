"""The OpenAI wire format, without a web framework: request bodies of `/v1/completions`
and `/v1/chat/completions` into the generation layer's fields, and results into OpenAI's
response, chunk, model-card and error objects.

`model` names the base model (its served id) or a registered adapter; a weighted mix is
the extra field `adapters: [{"name", "weight"}]` with `model` = the base id, merged as the
extra `merge: {"method", "density", "seed", "rank"}` says (default: the exact sum). Completions'
`echo` returns the prompt before the completion, with (given `logprobs`) its tokens' log
probabilities in OpenAI's legacy shape (null for the first token), `max_tokens: 0` then
scoring the prompt only; vLLM's extra `prompt_logprobs: k` (completions and chat) returns
a `prompt_logprobs` list in the choice: null, then per prompt token {token id: {logprob,
rank, decoded_token}} for the token and its k most likely alternatives. Fields the
API has and loraquilt does not implement are refused (400, naming them) when set; fields
nobody knows are ignored, as OpenAI's clients send some.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.generation import ErrorKind, GenerationError
from loraquilt.server.openai_prompt import PromptReturn, completion_prompts, scoring_fields, vllm_prompt_logprobs
from loraquilt.server.openai_structured import structured_fields
from loraquilt.server.request import FINISH_CANCELLED, FINISH_LENGTH, MAX_LOGPROBS, GenerationResult

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions API
OPENAI_DEFAULT_TEMPERATURE = 1.0
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# the engine's field names -> the body's, for the `param` of an error
ENGINE_TO_BODY = {"adapter": "model", "max_new_tokens": "max_tokens", "adapters.name": "adapters", "adapters.weight": "adapters",
                  "chat": "messages", "prompt_token_ids": "prompt"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


def bad(param: str, message: str) -> GenerationError:
    return GenerationError(ErrorKind.INVALID_ARGUMENT, f"{param}: {message}", param)


@dataclass(frozen=True)
class ParsedBody:
    """A completions or chat body, ready for `GenerationLayer.build_request(**fields)`."""

    model: str
    fields: dict  # build_request keyword arguments (completions: of the first prompt)
    stream: bool
    include_usage: bool
    prompt_returns: tuple[PromptReturn, ...] = (PromptReturn(),)  # what the response returns of each prompt
    prompts: tuple[dict, ...] = ()  # completions: every prompt's own fields (prompt or prompt_token_ids)

    def fields_of(self, prompt: dict) -> dict:
        """build_request's fields for one of the prompts."""
        common = {key: value for key, value in self.fields.items() if key not in ("prompt", "prompt_token_ids")}
        return {**common, **prompt}


def _typed(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(name, f"must be {what}, got {type(value).__name__}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    """A JSON number field as a float; an integer past float's range is refused here (float()
    would overflow), NaN and infinities are left to the engine's range checks."""
    value = _typed(body, name, (int, float), default, "a number")
    return _as_float(value, name)


def _as_float(value: int | float, param: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise bad(param, f"must be within ±1.8e308, got an integer of {value.bit_length()} bits") from None


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(text, str) for text in stop):
        return tuple(stop)
    raise bad("stop", "must be a string or a list of strings")


def _mix(body: dict) -> tuple[tuple[str, float], ...]:
    entries = body.get("adapters")
    if entries is None:
        return ()
    if not isinstance(entries, list) or not entries:
        raise bad("adapters", 'must be a non-empty list of {"name": ..., "weight": ...}')
    mix = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad("adapters", 'each entry must be an object with a string "name" and a number "weight"')
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise bad("adapters", f'weight of {entry["name"]!r} must be a number')
        mix.append((entry["name"], _as_float(weight, "adapters")))
    return tuple(mix)


def _common(body: dict, base_model: str, max_tokens: int | None) -> tuple[str, dict]:
    """model and the sampling fields both endpoints share."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "must name the base model or a registered adapter")
    if body.get("suffix"):
        raise bad("suffix", "suffix is not supported")
    mix = _mix(body)
    if mix and model != base_model:
        raise bad("adapters", f"a mix goes with model={base_model!r} (the base); model {model!r} names an adapter")
    seed = _typed(body, "seed", (int,), None, "an integer")
    fields = dict(
        adapter=None if model == base_model else model, mix=mix, max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", OPENAI_DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0),
        top_k=_typed(body, "top_k", (int,), 0, "an integer"),
        seed=None if seed is None else seed % 2**64,  # OpenAI seeds may be negative
        stop=_stop(body), ignore_eos=_typed(body, "ignore_eos", (bool,), False, "a boolean"),
        n=_typed(body, "n", (int,), 1, "an integer"), best_of=_typed(body, "best_of", (int,), None, "an integer"),
        merge=body.get("merge"),  # checked by the generation layer (merge_spec)
    )
    if fields["top_k"] == -1:  # vLLM's "off"
        fields["top_k"] = 0
    return model, {**fields, **_processing(body), **structured_fields(body)}


def _processing(body: dict) -> dict:
    """The logits-processing fields (OpenAI's penalties and logit_bias, vLLM's extras);
    their ranges are the engine's checks (SamplingParams)."""
    fields = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if body.get(name) is not None:
            fields[name] = _number(body, name, 0.0)
    if body.get("min_tokens") is not None:
        fields["min_tokens"] = _typed(body, "min_tokens", (int,), 0, "an integer")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers)")
        fields["stop_token_ids"] = tuple(ids)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("logit_bias", 'must be an object mapping token ids to biases, e.g. {"50256": -100}')
        entries = []
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
                raise bad("logit_bias", f"keys must be token ids written as decimal strings, got {key[:20]!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad("logit_bias", f"the bias of token {key} must be a number")
            entries.append((int(key), _as_float(value, "logit_bias")))
        fields["logit_bias"] = tuple(entries)
    return fields


def _completion_logprobs(body: dict) -> int | None:
    """completions' `logprobs`: the number of alternatives per token (0 = the token's own only)."""
    count = body.get("logprobs")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int):
        raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token)")
    return count


def _chat_logprobs(body: dict) -> int | None:
    """chat's `logprobs: true` with `top_logprobs: k`."""
    wanted = _typed(body, "logprobs", (bool,), False, "a boolean")
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise bad("top_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
    if top and not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _typed(body, "stream", (bool,), False, "a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    include_usage = _typed(options, "include_usage", (bool,), False, "a boolean")
    return stream, bool(stream and include_usage)


def parse_completion(body: dict, base_model: str) -> ParsedBody:
    prompts = completion_prompts(body.get("prompt"))
    max_tokens = _typed(body, "max_tokens", (int,), COMPLETIONS_DEFAULT_MAX_TOKENS, "an integer")
    model, fields = _common(body, base_model, max_tokens)
    stream, include_usage = _stream_flags(body)
    logprobs = _completion_logprobs(body)
    echo = _typed(body, "echo", (bool,), False, "a boolean")
    returns = tuple(PromptReturn(echo, prompt.get("prompt"), logprobs if echo else None, vllm_prompt_logprobs(body))
                    for prompt in prompts)
    return ParsedBody(model, {**fields, **prompts[0], **scoring_fields(returns[0]), "logprobs": logprobs}, stream,
                      include_usage, returns, tuple(prompts))


def _message_text(content, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(param, 'parts must be text parts ({"type": "text", "text": ...}); '
                                 "other kinds are not supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(param, "must be a string or a list of text parts")


def parse_chat(body: dict, base_model: str) -> ParsedBody:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{index}]", "must be an object with a role and a content")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"messages[{index}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        parsed.append({"role": CHAT_ROLES[role], "content": _message_text(message.get("content"), index)})
    max_tokens = _typed(body, "max_completion_tokens", (int,), None, "an integer")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", (int,), None, "an integer")  # None: the server's default
    model, fields = _common(body, base_model, max_tokens)
    if body.get("echo"):
        raise bad("echo", "echo is supported on completions only")
    stream, include_usage = _stream_flags(body)
    returned = PromptReturn(vllm_top=vllm_prompt_logprobs(body))
    return ParsedBody(model, {**fields, **scoring_fields(returned), "messages": tuple(parsed),
                              "logprobs": _chat_logprobs(body)}, stream, include_usage, (returned,))


def body_param(error: GenerationError, chat: bool) -> str | None:
    """The body field an error concerns, in the body's own names."""
    if error.kind is ErrorKind.NOT_FOUND:
        return "model"
    if error.param is None:
        return None
    param = ENGINE_TO_BODY.get(error.param, error.param)
    if chat and param == "prompt":
        return "messages"
    return param


def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason in (FINISH_LENGTH, FINISH_CANCELLED) else "stop"


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


class ResponseShape:
    """The objects of one response (completion or chat), sharing an id and a timestamp."""

    def __init__(self, chat: bool, model: str, logprobs: bool = False,
                 prompts: tuple[PromptReturn, ...] = (PromptReturn(),), choices_per_prompt: int = 1):
        """logprobs: the request asked for log probabilities (else the field is null);
        prompts: what it returns of each prompt (echo, vLLM's prompt_logprobs); choice
        i·choices_per_prompt + j is prompt i's."""
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.prompts, self.per_prompt = prompts, choices_per_prompt
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self._text_offset: dict[int, int] = {}  # completions: characters of the tokens already sent, per choice

    def returned(self, index: int) -> PromptReturn:
        """What the response returns of the prompt of choice `index`."""
        return self.prompts[min(index // self.per_prompt, len(self.prompts) - 1)]

    def _logprobs(self, entries, prompt_entries=(), index: int = 0) -> dict | None:
        """OpenAI's logprobs object for these tokens (chat: `content` entries with bytes;
        completions: parallel lists with text offsets; with echo, the prompt's tokens first,
        the first of them with null log probabilities)."""
        if not self.logprobs:
            return None
        entries = self.returned(index).echoed_entries(entries, prompt_entries)
        if self.chat:
            return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode()),
                                 "top_logprobs": [{"token": text, "logprob": value, "bytes": list(text.encode())}
                                                  for (_, value), text in zip(e.top, e.top_texts)]}
                                for e in entries]}
        offsets, offset = [], self._text_offset.get(index, 0)
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.text)
        self._text_offset[index] = offset
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{text: value for (_, value), text in zip(e.top, e.top_texts)}, e.text: e.logprob}
                                 if e.logprob is not None else None for e in entries],
                "text_offset": offsets}

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, result: GenerationResult) -> dict:
        """The whole response: one choice per returned choice (n), the usage of them all."""
        choices = []
        for each in result.all_choices:
            prompt = each.prompt_logprobs
            choice = {"index": each.index, "finish_reason": finish_reason(each),
                      "logprobs": self._logprobs(each.logprobs, prompt, each.index)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": each.text}
            else:
                choice["text"] = self.returned(each.index).echoed(each.text, prompt)
            choices.append(self.returned(each.index).add_vllm_field(choice, prompt))
        return self._envelope("chat.completion" if self.chat else "text_completion", choices, usage=usage(result))

    def chunk(self, text: str, result: GenerationResult | None = None, first: bool = False,
              logprobs=(), prompt_logprobs=(), index: int = 0) -> dict:
        """One streamed piece of choice `index`: its text and the log probabilities of its
        tokens (when asked); the choice's first piece also the prompt's (echo, vLLM's
        prompt_logprobs); `result`: the choice ended."""
        reason = None if result is None else finish_reason(result)
        entries = self._logprobs(logprobs, prompt_logprobs, index)
        returned = self.returned(index)
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": entries}
            return self._envelope("chat.completion.chunk", [returned.add_vllm_field(choice, prompt_logprobs)])
        choice = {"index": index, "text": returned.echoed(text, prompt_logprobs), "finish_reason": reason,
                  "logprobs": entries}
        return self._envelope("text_completion", [returned.add_vllm_field(choice, prompt_logprobs)])

    def usage_chunk(self, result: GenerationResult) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(result))


def model_id(model_name: str) -> str:
    """The default id of the base model: the name without "(embedded)", a local folder's
    own name, or the hub id as given."""
    name = model_name.removesuffix(" (embedded)").strip()
    path = Path(name).expanduser()
    return path.name if (name.startswith((".", "/", "~")) or path.exists()) and path.name else name


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object. Text the caller sent (a field's value, a path) may hold lone
    surrogates, which UTF-8 cannot encode: they are written as escapes."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def model_card(model_id: str, created: int, *, parent: str | None, root: str, max_model_len: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraquilt", "root": root,
            "parent": parent, "max_model_len": max_model_len}

