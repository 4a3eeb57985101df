"""After a step: each sampled token -> finish checks (EOS, length, stop strings), new text
(incremental detokenization), and the step's output; and the results of finished,
failed and cancelled sequences. No torch, no scheduling."""

from __future__ import annotations

import time
from dataclasses import replace

from loraquilt.server.detokenizer import IncrementalDetokenizer
from loraquilt.server.logits_processing import TokenLogprob
from loraquilt.server.request import (
    FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationResult, StepOutput,
)
from loraquilt.server.sequence import Sequence
from loraquilt.server.structured_output import Accepted


class EngineStepError(RuntimeError):
    """A forward step failed; every request in that step fails with it."""


class NonFiniteLogits(EngineStepError):
    """One request's logits overflowed (inf/NaN); only that request fails."""


class Postprocessor:
    def __init__(self, tokenizer, eos_ids: set[int] | frozenset[int], max_seq_len: int):
        self.tokenizer, self.eos_ids, self.max_seq_len = tokenizer, eos_ids, max_seq_len

    def on_token(self, seq: Sequence) -> StepOutput:
        """The sequence's newest token was just appended: decide whether it finished, and
        hand out the text that became stable."""
        params = seq.request.sampling
        token = seq.output_ids[-1]
        text_ids: tuple[int, ...] = (token,)
        accepted = seq.matcher.accept(token) if seq.matcher is not None else None
        if accepted is Accepted.REJECTED:
            return self._constraint_broken(seq, token)
        if accepted is Accepted.COMPLETE:  # a constrained request ends where its constraint does
            seq.finish_reason = FINISH_STOP
            text_ids = () if token in self.eos_ids else text_ids
        elif not params.ignore_eos and token in self.eos_ids:
            seq.finish_reason = FINISH_EOS
            text_ids = ()  # the end-of-sequence token is not part of the text
        elif token in params.stop_token_ids:
            seq.finish_reason = FINISH_STOP
            text_ids = ()  # nor is a stop token
        elif len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = FINISH_LENGTH
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        detokenizer = seq.detokenizer
        new_text = detokenizer.add(text_ids, final=seq.finished)
        if detokenizer.stopped:
            if not seq.finished:
                new_text += detokenizer.add((), final=True)
            seq.finish_reason = FINISH_STOP
        logprobs = (seq.output_logprobs[-1],) if params.logprobs is not None and seq.output_logprobs else ()
        first = len(seq.output_ids) == 1  # the first output carries the prompt's entries
        return self._output(seq, new_text, (token,), logprobs, self.prompt_logprobs(seq) if first else ())

    def prompt_only(self, seq: Sequence) -> StepOutput:
        """A request generating no token (max_new_tokens 0) whose prompt is scored: done."""
        seq.finish_reason = FINISH_LENGTH
        return self._output(seq, "", (), (), self.prompt_logprobs(seq))

    def _output(self, seq: Sequence, text: str, token_ids: tuple[int, ...], logprobs: tuple,
                prompt_logprobs: tuple) -> StepOutput:
        """A step's output of one sequence; once it ended, its result: for one choice of
        several, the choice's result, and the request's too when it was the last to end."""
        result = self.result(seq) if seq.finished else None
        finished = result
        if seq.group is not None and result is not None:
            finished = seq.group.record(seq.index, result, seq.output_logprobs)
        return StepOutput(seq.request_id, text, token_ids, finished, new_logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, index=seq.index, choice_finished=result)

    def cancelled(self, seq: Sequence) -> StepOutput:
        """The request of `seq` was cancelled (the engine set its running sequences'
        finish_reason): its final output; every choice of it that had not ended, running
        or still to fork, ends cancelled with what it generated so far."""
        if seq.group is None:
            result = self.result(seq)
            return StepOutput(seq.request_id, "", (), result, choice_finished=result)
        group, finished = seq.group, None
        for member in group.members:
            if not group.recorded(member.index):
                member.finish_reason = member.finish_reason or FINISH_CANCELLED
                finished = group.record(member.index, self.result(member), member.output_logprobs) or finished
        return StepOutput(seq.request_id, "", (), finished)

    def all_with_texts(self, entries) -> list[TokenLogprob]:
        """The entries with their tokens and alternatives decoded, each on its own, in one
        batch_decode."""
        ids = [[token] for entry in entries for token in (entry.token_id, *(t for t, _ in entry.top))]
        texts = iter(self.tokenizer.batch_decode(ids))
        return [replace(entry, text=next(texts), top_texts=tuple(next(texts) for _ in entry.top))
                for entry in entries]

    def prompt_logprobs(self, seq: Sequence) -> tuple[TokenLogprob, ...]:
        """GenerationResult.prompt_logprobs: the first prompt token (no log probability),
        then the scored ones; () unless the request asked for them."""
        if seq.request.sampling.prompt_logprobs is None:
            return ()
        first = seq.prompt_ids[0]
        return (TokenLogprob(first, None, text=self.tokenizer.decode([first])), *seq.prompt_logprobs)

    def _constraint_broken(self, seq: Sequence, token: int) -> StepOutput:
        """The sampled token breaks the request's constraint: only where the mask left no
        allowed token a finite logit, which the request types rule out (min_tokens)."""
        seq.error = EngineStepError(f"engine step failed for this request: token {token} breaks its "
                                    f"structured-output constraint ({seq.matcher.error})")
        seq.finish_reason = "error"
        return StepOutput(seq.request_id, "", (), error=seq.error)

    def non_finite(self, seq: Sequence) -> StepOutput:
        weights = seq.request.adapter_weights
        source = (f"adapters {', '.join(f'{name}={weight:g}' for name, weight in weights)}"
                  if weights else "the base model")
        seq.error = NonFiniteLogits(f"engine step failed for this request: non-finite logits (inf/NaN) "
                                    f"with {source}; the adapter weights overflow the activations")
        seq.finish_reason, seq.scrub_cache = "error", True
        return StepOutput(seq.request_id, "", (), error=seq.error)

    def result(self, seq: Sequence) -> GenerationResult:
        return GenerationResult(
            request_id=seq.request_id, text=seq.detokenizer.text if seq.detokenizer else "", token_ids=tuple(seq.output_ids),
            finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            queue_seconds=(seq.admitted_time or time.monotonic()) - seq.arrival_time,
            cached_tokens=seq.num_cached_tokens,
            logprobs=tuple(seq.output_logprobs) if seq.request.sampling.logprobs is not None else (),
            prompt_logprobs=self.prompt_logprobs(seq), index=seq.index,
        )
