"""What a caller asks for and what it gets back (no torch, no protobuf)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MIX_WEIGHT = 1000.0  # |weight| of one adapter in a mix; far past any useful composition
MAX_MIX = 8  # adapters in one mix
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's bound)
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (OpenAI's bound)
MAX_STOP_TOKEN_IDS = 64
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_CONSTRAINT_CHARS = 65536  # a schema's, regex's or grammar's text
MAX_CHOICES = 256
MAX_N = 16  # choices (n, best_of) of one request
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def shown(text: str, limit: int = 40) -> str:
    """`text` cut short for an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def check_adapter_name(name: str, field_name: str = "name") -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):  # fullmatch: no trailing newline
        raise RequestError(field_name, f"adapter names are 1-128 characters of [A-Za-z0-9._:-] "
                                       f"starting with a letter or digit; got {shown(str(name))!r}")


def check_text(field_name: str, text: str) -> None:
    """Text must be encodable as UTF-8 (the tokenizer's input): a JSON string may carry a
    lone surrogate ("\\ud800"), which no encoding of Unicode text can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(field_name, f"holds a lone surrogate (U+{ord(text[error.start]):04X}) at "
                                       f"character {error.start}; send valid Unicode text") from None


class RequestError(ValueError):
    """A request the engine refuses; `field` names the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the whole generated text must match (compiled and enforced
    per row by server/structured_output.py). kind: "json_schema" (value: the schema, a JSON
    object as text), "json_object" (any JSON object; value ""), "regex" (value: a regular
    expression the whole output matches), "grammar" (value: a Lark or GBNF grammar),
    "choice" (value: a JSON list of strings; the output is one of them). field: the request
    field it came from, which errors name (default: kind)."""

    kind: str
    value: str = ""
    field: str = ""

    def __post_init__(self) -> None:
        name = self.field or (self.kind if self.kind in CONSTRAINT_KINDS else "constraint")
        object.__setattr__(self, "field", name)
        if self.kind not in CONSTRAINT_KINDS:
            raise RequestError(name, f"unknown constraint kind {shown(str(self.kind))!r}; "
                                     f"one of {', '.join(CONSTRAINT_KINDS)}")
        if not isinstance(self.value, str):
            raise RequestError(name, f"must be text, got {type(self.value).__name__}")
        if (self.kind == "json_object") != (not self.value):
            raise RequestError(name, "json_object takes no value" if self.value else "must not be empty")
        if len(self.value) > MAX_CONSTRAINT_CHARS:
            raise RequestError(name, f"at most {MAX_CONSTRAINT_CHARS} characters, got {len(self.value)}")
        check_text(name, self.value)
        if self.kind in ("json_schema", "choice"):
            self._check_json()

    def _check_json(self) -> None:
        try:
            value = json.loads(self.value)
        except (ValueError, RecursionError) as error:
            raise RequestError(self.field, f"is not valid JSON: {shown(str(error), 80)}") from None
        if self.kind == "json_schema" and not isinstance(value, dict):
            raise RequestError(self.field, f"a JSON schema is a JSON object, got {type(value).__name__}")
        if self.kind == "choice" and not (isinstance(value, list) and 0 < len(value) <= MAX_CHOICES and all(
                isinstance(choice, str) and choice for choice in value)):
            raise RequestError(self.field, f"must be a list of 1..{MAX_CHOICES} non-empty strings")

    @property
    def key(self) -> str:
        """What its compiled form depends on (not the field it came from)."""
        return hashlib.sha256(f"{self.kind}\0{self.value}".encode()).hexdigest()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh randomness; same seed -> same output
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # -- logits processing (server/logits_processing.py), applied in this order per row
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), each in [-100, 100]
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are masked until this many were generated
    repetition_penalty: float = 1.0  # > 0; 1 = off: logits of prompt and output tokens divided (>0) / multiplied
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per time a token was generated
    min_p: float = 0.0  # [0, 1]: sampling drops tokens below min_p x the top probability
    stop_token_ids: tuple[int, ...] = ()  # a generated one ends the request (finish "stop")
    # -- structured output (server/structured_output.py): after the processing above, tokens
    # the constraint does not allow next are masked; a complete constraint ends the request
    # (finish "stop", whatever ignore_eos says); max_new_tokens may cut it short ("length")
    constraint: Constraint | None = None
    # -- log probabilities, of the model's raw logits (before the processing above)
    logprobs: int | None = None  # None: none; k: each generated token's and its top-k alternatives'
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (from the prefill)
    # -- several choices from one prompt (server/choices.py): best_of sequences share the
    # prompt's prefill, each samples with its own random stream (seed + its index); the n
    # with the highest mean token log probability are returned (all of them when best_of is unset)
    n: int = 1
    best_of: int | None = None

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_processing()
        self._check_choices()

    def _check_sampling(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise RequestError("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:  # 0: score the prompt, generate nothing
            raise RequestError("max_new_tokens", "must be an integer >= 1 (0 only with prompt_logprobs), got 0")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if not _is_number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise RequestError("seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, (tuple, list)):
            raise RequestError("stop", f"must be a list of strings, got {type(self.stop).__name__}")
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for text in self.stop:
            if not isinstance(text, str) or not text or len(text) > MAX_STOP_CHARS:
                raise RequestError("stop", f"stop strings must be 1..{MAX_STOP_CHARS} characters")
            check_text("stop", text)

    def _check_processing(self) -> None:
        for name, low, high in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                                ("min_p", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
                raise RequestError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
        if not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or not 0 < self.repetition_penalty <= 100:
            raise RequestError("repetition_penalty", f"must be in (0, 100], got {self.repetition_penalty!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise RequestError("min_tokens", f"must be an integer in [0, max_new_tokens], got {self.min_tokens!r}")
        object.__setattr__(self, "logit_bias", tuple(self.logit_bias))
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for entry in self.logit_bias:
            token, bias = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
            if not _is_token_id(token) or not _is_number(bias) or not -100 <= bias <= 100:
                raise RequestError("logit_bias", f"entries map a token id (>= 0) to a bias in [-100, 100], "
                                                 f"got {entry!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(map(_is_token_id, self.stop_token_ids)):
            raise RequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(name, f"must be an integer in [0, {MAX_LOGPROBS}] or unset, got {value!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise RequestError("constraint", f"must be a Constraint, got {type(self.constraint).__name__}")
        if self.constraint is not None and self.min_tokens:
            raise RequestError("min_tokens", "cannot be combined with structured output (the constraint "
                                             "decides where the output ends)")

    def _check_choices(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise RequestError("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (isinstance(self.best_of, bool) or not isinstance(self.best_of, int)
                                         or not self.n <= self.best_of <= MAX_N):
            raise RequestError("best_of", f"must be an integer in [n, {MAX_N}] (n = {self.n}), got {self.best_of!r}")
        if self.num_sequences > 1 and self.max_new_tokens == 0:
            raise RequestError("n", "several choices need max_new_tokens >= 1 (a prompt-only request has one)")

    @property
    def num_sequences(self) -> int:
        """Sequences sampled for the request: best_of, else n."""
        return self.best_of or self.n

    @property
    def ranks_choices(self) -> bool:
        """Whether the returned choices are picked among more sampled ones (best_of > n)."""
        return self.num_sequences > self.n

    @property
    def token_logprobs_top(self) -> int | None:
        """Alternatives to score per generated token (None: none): the request's logprobs,
        or 0 when its choices are ranked by their tokens' log probabilities."""
        if self.logprobs is not None:
            return self.logprobs
        return 0 if self.ranks_choices else None

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processing applies to this request's rows."""
        return bool(self.logit_bias or self.min_tokens or self.repetition_penalty != 1.0
                    or self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """prompt (optionally wrapped in the chat template), chat messages, or token ids;
    on the base model (adapter None), one adapter, or a weighted mix of adapters (merged
    as `merge` says: a server.adapters.merge.MergeSpec; None: the exact sum)."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    chat: bool = False
    adapter: str | None = None
    mix: tuple[tuple[str, float], ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    merge: object = None  # a MergeSpec for the mix (None: linear, the exact in-kernel sum)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)]
        if sum(given) != 1:
            raise RequestError("prompt", "give exactly one of prompt, messages or prompt_token_ids")
        if self.prompt is not None:
            if not isinstance(self.prompt, str):
                raise RequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
            if not self.prompt:
                raise RequestError("prompt", "must not be empty")
            check_text("prompt", self.prompt)
        if self.messages is not None and not self.messages:
            raise RequestError("messages", "must not be empty")
        for index, message in enumerate(self.messages or ()):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise RequestError(f"messages[{index}]", "must be a {role, content} object with text content")
            check_text(f"messages[{index}].content", message["content"])
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise RequestError("prompt_token_ids", "must not be empty")
        if self.adapter is not None and self.mix:
            raise RequestError("adapters", "set either adapter or adapters (a weighted mix), not both")
        if self.adapter is not None:
            check_adapter_name(self.adapter, "adapter")
        if len(self.mix) > MAX_MIX:
            raise RequestError("adapters", f"at most {MAX_MIX} adapters in a mix, got {len(self.mix)}")
        for name, weight in self.mix:
            check_adapter_name(name, "adapters.name")
            if not _is_number(weight) or not math.isfinite(weight):
                raise RequestError("adapters.weight", f"weight of {name!r} must be finite, got {weight!r}")
            if abs(weight) > MAX_MIX_WEIGHT:
                raise RequestError("adapters.weight", f"weight of {name!r} must lie within ±{MAX_MIX_WEIGHT:g}, "
                                                      f"got {weight!r}")
        names = [name for name, _ in self.mix]
        if len(set(names)) != len(names):
            raise RequestError("adapters", "an adapter appears twice in the mix")
        if self.mix and not sum(weight for _, weight in self.mix) > 0:
            raise RequestError("adapters", "mix weights must sum to a positive number")
        if self.derives and not self.mix:
            raise RequestError("merge", f"merging ({self.merge.method}) needs a mix: name the adapters in adapters")

    @property
    def derives(self) -> bool:
        """Whether its mix runs as a derived adapter (a non-linear merge)."""
        return self.merge is not None and self.merge.derives

    @property
    def adapter_weights(self) -> tuple[tuple[str, float], ...]:
        """(name, weight) pairs the request applies; empty for the base model."""
        if self.adapter:
            return ((self.adapter, 1.0),)
        return tuple((name, float(weight)) for name, weight in self.mix)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0  # arrival to admission into the running batch
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (at the last admission)
    logprobs: tuple = ()  # TokenLogprob per generated token, when the request asked for them
    # TokenLogprob per prompt token when the request asked for prompt_logprobs: the first
    # one's logprob is None (nothing predicts it), the others' are scored by the prefill
    prompt_logprobs: tuple = ()
    index: int = 0  # which choice of its request this is (n > 1)
    # n > 1: every returned choice (each a GenerationResult with its index; the fields above
    # are then the first choice's, completion_tokens counts every sampled sequence's tokens
    # and prompt_tokens the prompt once); () for a single choice
    choices: tuple = ()

    @property
    def all_choices(self) -> tuple:
        """The returned choices: `choices`, or this result alone."""
        return self.choices or (self,)


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request: new text, and the result when done."""

    request_id: str
    new_text: str
    new_token_ids: tuple[int, ...]
    finished: GenerationResult | None = None
    new_logprobs: tuple = ()  # TokenLogprob of each new token, when the request asked for them
    prompt_logprobs: tuple = ()  # the request's first output: GenerationResult.prompt_logprobs
    error: Exception | None = None  # the request failed; no result follows
    index: int = 0  # the choice these tokens belong to (n > 1)
    choice_finished: GenerationResult | None = None  # that choice ended (with n = 1: `finished`)
