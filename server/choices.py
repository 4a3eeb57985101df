"""Several choices of one request (n > 1, best_of): which sequences sample them, and the
request's result once every one has ended. No torch, no scheduling.

The request's sequence samples choice 0 and holds the others until they fork from it
(server/sequence.py, server/scheduler.py); each choice then finishes on its own (its own
end of sequence, stop string or length). When the last one has ended, the request's
result is built: every choice with best_of unset, else the n whose generated tokens have
the highest mean log probability (of the model's raw logits; ties to the lower index),
renumbered 0..n-1 best first. The prompt is counted once, the completion tokens of every
sampled sequence (ranked-out ones included: they were generated).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraquilt.server.request import GenerationResult


def mean_logprob(entries) -> float:
    """Mean log probability of a choice's generated tokens (entries: TokenLogprob); -inf
    for one without tokens."""
    values = [entry.logprob for entry in entries]
    return sum(values) / len(values) if values else float("-inf")


@dataclass(eq=False)
class ChoiceGroup:
    """The sequences of one request that samples several choices."""

    members: list = field(default_factory=list)  # Sequence per sampled choice, by index
    failed: bool = False  # one choice failed: the request failed, the others were stopped
    _ended: dict = field(default_factory=dict)  # index -> (score, GenerationResult)

    @property
    def keep(self) -> int:
        """Choices returned (n)."""
        return self.members[0].request.sampling.n

    @property
    def ranked(self) -> bool:
        """best_of > n: the kept ones are picked by mean log probability."""
        return self.members[0].request.sampling.ranks_choices

    def record(self, index: int, result: GenerationResult, logprobs) -> GenerationResult | None:
        """A choice ended with `result` (logprobs: its TokenLogprob per generated token, used
        when ranking). Returns the request's result when it was the last, else None."""
        self._ended[index] = (mean_logprob(logprobs) if self.ranked else 0.0, result)
        return self.combined() if len(self._ended) == len(self.members) else None

    def recorded(self, index: int) -> bool:
        return index in self._ended

    def combined(self) -> GenerationResult:
        ended = sorted(self._ended.items())
        if self.ranked:  # best first; a stable sort keeps ties in index order
            ended = sorted(ended, key=lambda item: -item[1][0])[:self.keep]
        choices = tuple(replace(result, index=number) for number, (_, (_, result)) in enumerate(ended))
        total = sum(result.completion_tokens for _, (_, result) in self._ended.items())
        return replace(choices[0], completion_tokens=total, choices=choices,
                       queue_seconds=min(result.queue_seconds for _, (_, result) in self._ended.items()))
