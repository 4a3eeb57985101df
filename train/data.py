"""Training rows: JSON lines -> examples -> token ids with labels on the completion only.

Two row shapes are accepted, one per line:

* ``{"prompt": "...", "completion": "..."}`` - the prompt is tokenized as is, exactly as the
  server tokenizes a plain ``prompt``;
* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}`` -
  the turns before the last (assistant) one go through the model's chat template with the
  generation prompt, exactly as the server renders ``messages`` (or ``prompt`` with
  ``chat=True`` when there is a single user turn); the last turn is the completion.

The completion is tokenized on its own and ends with the eos token, so an adapter learns
where to stop; the loss covers the completion tokens and that eos only (labels -100 on the
prompt and on padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100  # label of a token the loss skips (prompt, padding)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A training or eval file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One row: either a plain prompt or the chat turns before the answer, and the answer."""

    completion: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None  # chat turns before the completion

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("an example has exactly one of prompt or messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def user_text(self) -> str:
        """The text a person typed: the plain prompt, or the last user turn."""
        if self.prompt is not None:
            return self.prompt
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]  # [L] prompt ids + completion ids + eos
    labels: tuple[int, ...]  # [L] IGNORE_INDEX on the prompt, the token ids on the completion
    truncated: bool = False


def parse_row(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two turns")
        for turn in messages:
            if (not isinstance(turn, dict) or turn.get("role") not in ROLES
                    or not isinstance(turn.get("content"), str)):
                raise DataError(f"{where}: every turn needs 'role' ({', '.join(ROLES)}) and 'content' (text)")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last turn must be the assistant's answer to learn")
        if not any(turn["role"] == "user" for turn in messages[:-1]):
            raise DataError(f"{where}: no user turn before the answer")
        if not messages[-1]["content"]:
            raise DataError(f"{where}: the answer is empty")
        turns = tuple({"role": t["role"], "content": t["content"]} for t in messages[:-1])
        return Example(completion=messages[-1]["content"], messages=turns)
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion:
        raise DataError(f"{where}: expected non-empty 'prompt' and 'completion' strings, or 'messages'")
    return Example(completion=completion, prompt=prompt)


def read_examples(path: Path) -> list[Example]:
    """Every non-blank line of a JSON lines file; one row shape per file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not JSON ({error.msg})") from None
            examples.append(parse_row(row, where))
    if not examples:
        raise DataError(f"{path}: no rows")
    if len({example.is_chat for example in examples}) > 1:
        raise DataError(f"{path}: mixes 'prompt'/'completion' rows and 'messages' rows; use one shape")
    return examples


def write_examples(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines (UTF-8, one object per line, keys in the given order)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    Path(path).write_text(text, encoding="utf-8")


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """The prompt's token ids, rendered the way `Engine.encode` renders the same request."""
    if example.messages is not None:
        if not tokenizer.chat_template:
            raise DataError("chat rows need a model whose tokenizer has a chat template")
        text = tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(example.prompt)["input_ids"]


def completion_ids(tokenizer, example: Example, eos_id: int) -> list[int]:
    return tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [eos_id]


def tokenize(tokenizer, example: Example, eos_id: int, max_length: int) -> TokenizedExample:
    """Prompt + completion + eos; over ``max_length`` the prompt loses tokens on the left
    first, then the completion on the right (its eos goes with them)."""
    prompt, answer = prompt_ids(tokenizer, example), completion_ids(tokenizer, example, eos_id)
    truncated = len(prompt) + len(answer) > max_length
    if truncated:
        answer = answer[:max_length - 1]
        prompt = prompt[len(prompt) - (max_length - len(answer)):]
    return TokenizedExample(
        input_ids=tuple(prompt + answer),
        labels=tuple([IGNORE_INDEX] * len(prompt) + answer),
        truncated=truncated,
    )


def invocation_ids(tokenizer, text: str, rows: list[TokenizedExample]) -> list[int]:
    """An activated LoRA's invocation token ids: `text` tokenized alone, which every row's
    prompt must hold (the adapter applies from their last occurrence on; a row without them
    would train nothing). DataError names how many rows lack them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"the invocation {text!r} tokenizes to no tokens")
    width = len(ids)
    missing = 0
    for row in rows:
        prompt = row.input_ids[:sum(1 for label in row.labels if label == IGNORE_INDEX)]
        if not any(list(prompt[start:start + width]) == ids for start in range(len(prompt) - width + 1)):
            missing += 1
    if missing:
        raise DataError(f"{missing} of {len(rows)} prompts do not hold the invocation {text!r} as the tokens {ids} "
                        "(it must end each prompt as those tokens; text that merges with what comes before "
                        "it tokenizes differently: start it with a newline or a special token)")
    return ids


def eos_token_id(tokenizer) -> int:
    """The token a completion ends with: the tokenizer's eos (the server stops on it)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; a completion could not learn to stop")
    return int(tokenizer.eos_token_id)


def collate(examples: list[TokenizedExample], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels, each [B, L_max]."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_held_out(examples: list[Example], seed: int, fraction: float = 0.1,
                   limit: int = 200) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded share of the rows held out when no eval file is given."""
    import random

    if len(examples) < 2:
        raise DataError("need at least two rows to hold some out for evaluation (or pass --eval)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = min(limit, max(1, round(len(examples) * fraction)))
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
