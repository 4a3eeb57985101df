"""Turns a step plan into tensors, runs the model once, and picks each sequence's next token.

Makes no policy decisions: which sequences run and which KV blocks they use is the
scheduler's call, which adapter slots they use is the registry's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraquilt.server.adapters.slots import LoraSlots, LoraSpan
from loraquilt.server.logits_processing import RowHistory, TokenLogprob, process_logits, raw_logprobs, token_logprobs
from loraquilt.server.model.batch import build_forward_batch
from loraquilt.server.model.kv_cache import KVCache
from loraquilt.server.model.llama import CausalLM
from loraquilt.server.sampler import new_generator, sample_next_tokens
from loraquilt.server.sequence import Sequence
from loraquilt.server.structured_output import MaskJob, StructuredOutput, apply_masks


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None  # when the request asked for log probabilities


@dataclass(frozen=True)
class ScoredPrompt:
    """The prompt tokens one chunk scored: `entries[i]` is prompt token start + 1 + i (the
    logits of position start + i); None when those logits are not finite."""

    start: int
    entries: tuple[TokenLogprob, ...] | None


@dataclass(frozen=True)
class StepResult:
    """Per sequence of the step, decodes first: its next token (None: its chunk does not
    reach the last token, it generates nothing, or its logits are not finite) and the
    prompt tokens its chunk scored (None: it scores none this step)."""

    tokens: list[SampledToken | None]
    scored: list[ScoredPrompt | None]


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, slots: LoraSlots,
                 end_ids: frozenset[int] = frozenset(), structured: StructuredOutput | None = None):
        """end_ids: the model's end-of-sequence ids (masked while a request's min_tokens
        are not reached); structured: the masks of constrained rows (None: no row is)."""
        self.model, self.cache, self.slots = model, cache, slots
        slots.attach_base(model)  # DoRA adapters' norms read the base weights the slots' deltas add to
        self.end_ids = end_ids
        self.structured = structured

    def execute(self, decodes: tuple[Sequence, ...], prefills: tuple[Sequence, ...]) -> StepResult:
        """One forward over every sequence; returns the next token of each, decodes first.
        None for a sequence that gets no token this step: a chunk that does not reach its
        last token (no logits are computed for it and its random stream is not touched), or
        one whose logits are not finite (rows never mix, so one request's overflow leaves
        the others' tokens intact). A chunk of a request asking for prompt log probabilities
        also gets the logits of its positions not scored yet, and their entries."""
        # decode rows grouped by adapter slot: the LoRA kernels then read each slot's rows
        # as one contiguous slice (no gather of x, no scatter into y)
        order = sorted(range(len(decodes)), key=lambda i: decodes[i].adapter_slots)
        spans = [seq.scored_positions() for seq in prefills]
        tokens, scored_logits = self._execute(tuple(decodes[i] for i in order), prefills, spans)
        result: list[SampledToken | None] = [None] * len(decodes)
        for position, index in enumerate(order):
            result[index] = tokens[position]
        scored = [None] * len(decodes) + self._score_prompts(prefills, spans, scored_logits)
        return StepResult(result + tokens[len(decodes):], scored)

    @staticmethod
    def _score_prompts(prefills: tuple[Sequence, ...], spans: list[range],
                       logits: torch.Tensor) -> list[ScoredPrompt | None]:
        """logits: [M, vocab], the rows of `spans` in order -> each chunk's scored tokens (all M
        rows at once: log probability, rank and the most alternatives any asks for)."""
        wanted = [(seq, span) for seq, span in zip(prefills, spans) if span]
        if not wanted:
            return [None] * len(prefills)
        targets = [seq.prompt_ids[p + 1] for seq, span in wanted for p in span]
        tops = [seq.request.sampling.prompt_logprobs for seq, span in wanted for _ in span]
        entries = iter(token_logprobs(logits, targets, tops))
        result: list[ScoredPrompt | None] = []
        for span in spans:
            scored = tuple(next(entries) for _ in span)
            # a NaN or +inf logit makes the row's log probabilities non-finite
            ok = all(math.isfinite(entry.logprob) for entry in scored)
            result.append(ScoredPrompt(span.start, scored if ok else None) if span else None)
        return result

    def _execute(self, decodes: tuple[Sequence, ...], prefills: tuple[Sequence, ...],
                 spans: list[range]) -> tuple[list[SampledToken | None], torch.Tensor]:
        """`execute` on decodes in the order given: the tokens, and the logits [M, vocab] of
        the positions in `spans` (per prefill, the positions it scores)."""
        sequences = decodes + prefills
        prefill_tokens = [seq.next_input() for seq in prefills]
        sampling = [seq.samples_this_step for seq in sequences]
        batch = build_forward_batch(
            prefill_tokens=prefill_tokens,
            prefill_tables=[seq.block_table.block_ids for seq in prefills],
            prefill_starts=[seq.next_position() for seq in prefills],
            decode_tokens=[seq.token_ids[-1] for seq in decodes],
            decode_tables=[seq.block_table.block_ids for seq in decodes],
            decode_positions=[seq.next_position() for seq in decodes],
            block_size=self.cache.block_size,
            prefill_logits=sampling[len(decodes):],
            prefill_scored=spans,
            device=self.model.device,
        )
        lora = self._begin_lora(decodes, prefills, prefill_tokens)
        masks = None
        try:
            masks = self._start_masks([seq for seq, wanted in zip(sequences, sampling) if wanted])  # during the forward
            logits = self.model(batch, self.cache, lora)  # [N + M, vocab], N = sequences that sample
        finally:
            self.slots.end_step()
            bitmask = masks.join() if masks is not None else None  # [C, W] int32, C = constrained rows
        scored_logits = logits[logits.shape[0] - batch.scored_rows:]  # [M, vocab]: prompt rows
        logits = logits[:logits.shape[0] - batch.scored_rows]  # [N, vocab]
        sampled = [seq for seq, wanted in zip(sequences, sampling) if wanted]
        # a row is finite iff its sum is (NaN and +-inf propagate into it; finite logits are
        # far too small to overflow it): one pass, 15-30x faster on CPU than aminmax or
        # isfinite(...).all(), which also makes [N, vocab] temporaries
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # [N]
        for seq in sampled:
            if seq.generator is None and not seq.request.sampling.greedy:
                seq.generator = new_generator(seq.seed)
        params = [seq.request.sampling for seq in sampled]
        tops = [param.token_logprobs_top for param in params]
        raw = logits  # log probabilities are of the model's own logits
        if any(param.processes_logits for param in params):  # on a copy (the forward's output is read-only)
            logits = process_logits(logits.clone(), [RowHistory(seq.request.sampling, seq.prompt_ids, seq.output_ids)
                                                     for seq in sampled], self.end_ids)
        if bitmask is not None:  # the constraints' masks, after the processing, on a copy too
            logits = logits.clone() if logits is raw else logits
            apply_masks(logits, [row for row, seq in enumerate(sampled) if seq.matcher is not None], bitmask)
        chosen = sample_next_tokens(logits, params, [seq.generator if ok else None for seq, ok in zip(sampled, finite)])
        logprobs = iter(raw_logprobs(raw, chosen, [top if ok else None for top, ok in zip(tops, finite)]))
        tokens, ok_rows = iter(chosen), iter(finite)
        result: list[SampledToken | None] = []
        for wanted in sampling:
            if not wanted:
                result.append(None)
                continue
            token, ok, logprob = next(tokens), next(ok_rows), next(logprobs)
            result.append(SampledToken(token, logprob) if ok else None)
        return result, scored_logits

    def _start_masks(self, sampled: list[Sequence]) -> MaskJob | None:
        """The masks of the constrained rows among `sampled` (the sequences that sample, in
        logits order), begun on the structured-output worker: each depends only on the
        tokens its matcher has accepted, so it overlaps the forward."""
        matchers = [seq.matcher for seq in sampled if seq.matcher is not None]
        return self.structured.start(matchers) if matchers else None

    def _begin_lora(self, decodes, prefills, prefill_tokens: list[list[int]]) -> LoraSlots | None:
        """The step's LoRA tables, one span per sequence (decodes: 1 row, prefills: their
        chunk), split where an aLoRA sequence's rows before its invocation run on the base."""
        if not any(seq.adapter_slots for seq in decodes + prefills):
            return None
        spans = [LoraSpan(1, () if seq.base_rows(seq.next_position(), 1) else tuple(seq.adapter_slots))
                 for seq in decodes]
        for seq, tokens in zip(prefills, prefill_tokens):
            base = seq.base_rows(seq.next_position(), len(tokens))
            if base:
                spans.append(LoraSpan(base, ()))
            if base < len(tokens):
                spans.append(LoraSpan(len(tokens) - base, tuple(seq.adapter_slots)))
        self.slots.begin_step(spans)
        return self.slots
