"""Several prompts in one completions request (OpenAI's `prompt: [...]`): one generation per
prompt, all submitted at once (so they share the engine's batches), seen by the HTTP API as
one generation whose choice i·n + j is prompt i's j-th.

Pieces arrive in the order the engine makes them, renumbered; a prompt's last piece ends
its choices; after every prompt has ended, one last piece carries the result of them all
(every choice, and the usage summed over the prompts). A failure of any prompt fails the
request and stops the others; cancelling it cancels them all.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from loraquilt.server.generation import Piece
from loraquilt.server.request import GenerationResult

_ENDED = object()


def combined(results: list[GenerationResult], per_prompt: int) -> GenerationResult:
    """The result of every prompt's result: their choices renumbered, the usage summed."""
    choices = tuple(replace(choice, index=number * per_prompt + choice.index)
                    for number, result in enumerate(results) for choice in result.all_choices)
    return replace(choices[0], choices=choices, prompt_tokens=sum(r.prompt_tokens for r in results),
                   completion_tokens=sum(r.completion_tokens for r in results),
                   cached_tokens=sum(r.cached_tokens for r in results))


class PromptBatch:
    """Async-iterable pieces of several generations (one per prompt) as one; `cancel()`."""

    def __init__(self, generations: list, per_prompt: int):
        self.generations, self.per_prompt = generations, per_prompt

    def cancel(self) -> None:
        for generation in self.generations:
            generation.cancel()

    async def __aiter__(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(number: int, generation) -> None:
            try:
                async for piece in generation:
                    queue.put_nowait((number, piece))
            except BaseException as error:  # noqa: BLE001 - delivered to the reader
                queue.put_nowait((number, error))
            finally:
                queue.put_nowait((number, _ENDED))

        tasks = [asyncio.ensure_future(pump(number, generation)) for number, generation in enumerate(self.generations)]
        results: list[GenerationResult | None] = [None] * len(self.generations)
        running = len(tasks)
        try:
            while running:
                number, item = await queue.get()
                if item is _ENDED:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                offset = number * self.per_prompt
                if item.result is not None:
                    results[number] = item.result
                ended = item.choice_result
                yield replace(item, index=item.index + offset, result=None,
                              choice_result=None if ended is None else replace(ended, index=ended.index + offset))
            yield Piece("", (), combined(results, self.per_prompt))
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()
