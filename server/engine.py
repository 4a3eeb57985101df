"""The engine: add_request / step / abort, on one model, one KV block pool, many adapters.

A step is: schedule (the scheduler admits, preempts and places KV in blocks) -> run (the
runner does one forward over every scheduled sequence and samples) -> postprocess (tokens
appended, filled blocks sealed for prefix reuse, finish checks and new text, finished
sequences released). `generate` drives steps until a list of requests is answered; the
servers drive the same `step` from a background thread.

A request asking for prompt log probabilities gets them from its prefill chunks: their
positions' logits are computed beside the sampled rows (no second pass), scored and kept
on the sequence; the first output carries them (Sequence: how they survive preemption and
the prefix cache). With max_new_tokens 0 it finishes ("length") once its prompt is scored.

A step reads no file: admission pins only adapters in memory, and one that is only on
disk is read by the registry's loader thread while its request waits (running rows keep
stepping; requests behind it whose adapters are in memory may go first). A long prompt
is prefilled in chunks of at most `max_prefill_tokens` per step beside the decodes; only
the step that completes it samples a token.

A constrained request (structured output) gets its matcher in add_request, where its
constraint is compiled (or found in the cache) off the engine lock; an invalid one is a
RequestError before anything is queued. Each step's masks are computed while its forward
runs (server/structured_output.py).

A request for several choices (n > 1, best_of) is one sequence per choice, made here: the
first prefills the prompt, the others fork from it (server/scheduler.py), each gets its
own lease on the same adapter slots; the last to end gives the request's result
(server/choices.py). One choice failing fails the request and stops the others.

A request on an aLoRA adapter runs on the base model up to its invocation tokens
(Sequence.lora_start, server/adapters/alora.py): those rows get no LoRA, and the prefix
cache keys the blocks before it as the base model's.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.adapters.alora import activation_start
from loraquilt.server.adapters.registry import Acquired, AdapterRecord, AdapterRegistry, Lease, RegistryEvents
from loraquilt.server.adapters.slots import LoraSlots, SlotConfig
from loraquilt.server.block_manager import BlockManager
from loraquilt.server.choices import ChoiceGroup
from loraquilt.server.cpu_contention import EngineThreads
from loraquilt.server.engine_config import EngineConfig
from loraquilt.server.model.kv_cache import KVCache, kv_bytes_per_position, plan_kv_cache
from loraquilt.server.model.sources import resolve_model
from loraquilt.server.model.weights import load_causal_lm
from loraquilt.server.postprocess import EngineStepError, NonFiniteLogits, Postprocessor
from loraquilt.server.request import FINISH_CANCELLED, GenerationResult, Request, RequestError, StepOutput
from loraquilt.server.runner import ModelRunner, StepResult
from loraquilt.server.scheduler import Admission, Scheduler, SchedulerConfig
from loraquilt.server.sequence import Sequence
from loraquilt.server.structured_output import StructuredOutput
from loraquilt.server.tokenizer import load_tokenizer, stop_token_ids

__all__ = ["Engine", "EngineConfig", "EngineStats", "EngineStepError", "NonFiniteLogits", "adapter_identity"]


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    last_batch_size: int
    preemptions: int = 0  # sequences whose blocks were taken back (recomputed later)
    prefix_queries_tokens: int = 0  # prompt positions looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found
    kv_usage: float = 0.0  # fraction of the KV block pool held by running sequences


def adapter_identity(lease: Lease | None, weights: tuple[tuple[str, float], ...]) -> str:
    """What a sequence's KV depends on besides its tokens: "" for the base model, else the
    sorted (content hash, weight) pairs of its adapters (never their names)."""
    if lease is None:
        return ""
    return "|".join(sorted(f"{record.content_hash}*{weight!r}"
                           for record, (_, weight) in zip(lease.records, weights)))


class Engine:
    IDLE_WAIT_SECONDS = 0.5  # longest a step with nothing to run waits for progress

    def __init__(self, config: EngineConfig = EngineConfig(), *, events: RegistryEvents | None = None):
        self.config = config
        log = (lambda line: print(line, file=sys.stderr)) if config.progress else (lambda line: None)
        source = resolve_model(config.model, log=log)
        self.model_name = source.name
        started = time.perf_counter()
        self.model = load_causal_lm(source.folder, config.device, progress=config.progress)
        self.tokenizer = load_tokenizer(source.folder)
        eos_ids = stop_token_ids(source.folder, self.tokenizer)
        model_config = self.model.config
        self.max_seq_len = min(config.max_seq_len, model_config.max_position_embeddings)
        shape = dict(num_layers=model_config.num_layers, num_kv_heads=model_config.num_kv_heads,
                     head_dim=model_config.head_dim)
        cache_config = plan_kv_cache(
            budget_mb=config.kv_cache_mb, default_positions=config.max_batch_size * self.max_seq_len,
            bytes_per_position=kv_bytes_per_position(**shape, dtype=self.model.dtype),
            block_size=config.kv_block_size, max_seq_len=self.max_seq_len)
        self.cache = KVCache(cache_config, **shape, dtype=self.model.dtype, device=self.model.device)
        self.slots = LoraSlots(
            model_config, SlotConfig.from_engine(config), self.model.dtype, self.model.device,
        )
        # Set when a step may find something new to admit (a request, an abort, a read from
        # disk done); a step with nothing to run waits on it outside the lock.
        self._progress = threading.Event()
        self.adapters = AdapterRegistry(model_config, self.slots, max_cpu_adapters=config.max_cpu_adapters,
                                        max_adapters=config.max_adapters,
                                        events=events, on_loaded=self._progress.set)
        self.blocks = BlockManager(cache_config.num_blocks, cache_config.block_size, config.prefix_cache)
        self.scheduler = Scheduler(SchedulerConfig.from_engine(config), self.blocks)
        self.structured = StructuredOutput(self.tokenizer, model_config.vocab_size, eos_ids,
                                           max_rows=config.max_batch_size)
        self.runner = ModelRunner(self.model, self.cache, self.slots, end_ids=frozenset(eos_ids),
                                  structured=self.structured)
        self.postprocessor = Postprocessor(self.tokenizer, eos_ids, self.max_seq_len)
        self._lock = threading.RLock()
        self._aborted: set[str] = set()
        self.last_batch_size = 0
        self.threads = EngineThreads(config.threads, log)  # applied on whichever thread steps
        log(f"model {self.model_name} ready in {time.perf_counter() - started:.1f}s on "
            f"{self.model.device} ({str(self.model.dtype).removeprefix('torch.')}; {self.model.dtype_reason}): "
            f"{self.model.quantized_bytes() / 2**20:.1f} MiB NF4 weights, KV cache {self.cache.num_bytes / 2**20:.1f} "
            f"MiB ({cache_config.num_blocks} blocks of {cache_config.block_size} positions, prefix cache "
            f"{'on' if config.prefix_cache else 'off'}), adapter slots {self.slots.num_bytes / 2**20:.1f} MiB")
        if self.model.nf4_paths:
            log(f"NF4 plan: {self.model.nf4_paths}")

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a generation (unless a request ignores them)."""
        return self.postprocessor.eos_ids

    # -- adapters -------------------------------------------------------------------------

    def register_adapter(self, name: str, path: Path | str) -> AdapterRecord:
        return self.adapters.register(name, path)

    def unregister_adapter(self, name: str) -> None:
        self.adapters.unregister(name)
        self._progress.set()  # requests waiting on it fail at the next step

    # -- requests -------------------------------------------------------------------------

    def encode(self, request: Request) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError("prompt_token_ids", f"ids out of the vocabulary: {bad[:4]}")
            return ids
        if request.messages is not None or request.chat:
            messages = list(request.messages or ({"role": "user", "content": request.prompt},))
            if not self.tokenizer.chat_template:
                raise RequestError("chat", "this model's tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.prompt)["input_ids"]

    def add_request(self, request: Request) -> Sequence:
        """Validate, tokenize and queue; raises RequestError, UnknownAdapter or QueueFull."""
        prompt_ids = self.encode(request)
        if not prompt_ids:
            raise RequestError("prompt", "encodes to no tokens")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                "prompt", f"{len(prompt_ids)} tokens; the context holds {self.max_seq_len} tokens "
                "including at least one generated token")
        vocab = self.model.config.vocab_size
        sampling = request.sampling
        for field_name, ids in (("logit_bias", [token for token, _ in sampling.logit_bias]),
                                ("stop_token_ids", sampling.stop_token_ids)):
            if any(token >= vocab for token in ids):
                raise RequestError(field_name, f"token ids must be below the vocabulary size {vocab}")
        adapters, lora_start = request.adapter_weights, 0
        if request.derives:  # a non-linear merge runs on its derived adapter (built at first use)
            adapters = ((self.adapters.derive(adapters, request.merge).name, 1.0),)
        else:  # UnknownAdapter (or a DoRA or aLoRA mix) now rather than at admission
            records = self.adapters.check_mix(adapters)
            if records and records[0].alora:  # an aLoRA adapter (alone): the base until its invocation
                lora_start = activation_start(prompt_ids, records[0].alora)
        sequence = Sequence(request=request, prompt_ids=prompt_ids, adapters=adapters, lora_start=lora_start)
        members = [sequence]
        if sampling.num_sequences > 1:
            if sampling.num_sequences > self.config.max_batch_size:
                raise RequestError("best_of" if sampling.best_of else "n",
                                   f"{sampling.num_sequences} choices; a batch holds {self.config.max_batch_size} "
                                   "sequences (--max-batch-size)")
            sequence.forks = [Sequence(request=request, prompt_ids=prompt_ids, adapters=adapters,
                                       lora_start=lora_start, index=index)
                              for index in range(1, sampling.num_sequences)]
            members += sequence.forks
            group = ChoiceGroup(members=members)
            for member in members:
                member.group = group
        if sampling.constraint is not None:  # compiled (or cached) here, off the lock; RequestError if invalid
            for member in members:
                member.matcher = self.structured.matcher(sampling.constraint)
        with self._lock:
            self.scheduler.add(sequence)
        self._progress.set()
        return sequence

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)
        self._progress.set()

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One scheduling round and one forward. New requests and aborts may arrive from
        other threads meanwhile; the forward itself runs outside the lock."""
        self.threads.tune()  # between steps: the thread count for this one (cpu_contention.py)
        with self._lock:
            self._progress.clear()  # whatever happens from here on is seen by the next step
            outputs = self._apply_aborts()
            plan = self.scheduler.schedule(self._try_admit)
            outputs += [StepOutput(seq.request_id, "", (), error=seq.error) for seq in plan.rejected]
            self._fail_groups(plan.rejected)
            for child in plan.forked:  # a lease of its own on the slots the choice it forked from holds
                parent = child.group.members[0]
                if parent.adapter_lease is not None:
                    child.adapter_lease = self.adapters.share(parent.adapter_lease)
                    child.adapter_slots = list(parent.adapter_slots)
            waiting = bool(self.scheduler.waiting)
        if not plan:
            if waiting and not outputs:  # only requests whose adapters are being read: no busy loop
                self._progress.wait(self.IDLE_WAIT_SECONDS)
            return outputs
        self.last_batch_size = len(plan.sequences)
        try:
            self.cache.copy_blocks(plan.kv_copies)  # forked choices' own copies of a partly written block
            result = self.runner.execute(plan.decodes, plan.prefills)
        except Exception as error:  # fail this step's requests only; the engine goes on
            failure = EngineStepError(f"engine step failed: {type(error).__name__}: {error}")
            with self._lock:
                for seq in plan.sequences:
                    seq.finish_reason, seq.error, seq.scrub_cache = "error", failure, True
                    outputs.append(StepOutput(seq.request_id, "", (), error=failure))
                self._fail_groups(plan.sequences)
                self._release_finished()
            return outputs
        with self._lock:
            outputs += self._postprocess(plan.sequences, result)
        return outputs

    def _postprocess(self, sequences: tuple[Sequence, ...], result: StepResult) -> list[StepOutput]:
        """The step's tokens (and scored prompt tokens) into the sequences; filled blocks
        sealed; finished ones released."""
        outputs = []
        asked = [token.logprob for token in result.tokens if token is not None and token.logprob is not None]
        decoded = dict(zip(map(id, asked), self.postprocessor.all_with_texts(asked))) if asked else {}  # one decode
        for seq, token, scored in zip(sequences, result.tokens, result.scored):
            if scored is not None and scored.entries is not None:
                if scored.start != len(seq.prompt_logprobs):
                    raise AssertionError(f"{seq.request_id}: scored prompt tokens from position {scored.start}, "
                                         f"{len(seq.prompt_logprobs)} scored before")
                seq.prompt_logprobs.extend(self.postprocessor.all_with_texts(scored.entries))
            completed = seq.finish_chunk()
            if scored is not None and scored.entries is None:
                token = None  # its prompt rows' logits are not finite: it fails below
            elif not completed:
                continue  # a chunk that does not reach the last token: no token yet
            elif seq.request.sampling.max_new_tokens == 0:  # the prompt scored, nothing to generate
                if not seq.finished:
                    outputs.append(self.postprocessor.prompt_only(seq))
                continue
            if token is None:
                seq.scrub_cache = True
                if not seq.finished:
                    outputs.append(self.postprocessor.non_finite(seq))
                continue
            seq.append_token(token.token_id)
            if token.logprob is not None:
                seq.output_logprobs.append(decoded[id(token.logprob)])
            if not seq.finished:  # an abort may have landed during the forward
                outputs.append(self.postprocessor.on_token(seq))
        self.scheduler.after_step(seq for seq in sequences if not seq.scrub_cache)
        self._fail_groups([seq for seq in sequences if seq.error is not None])
        self._release_finished()
        return outputs

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                               last_batch_size=self.last_batch_size, preemptions=self.scheduler.num_preemptions,
                               prefix_queries_tokens=self.blocks.queries_tokens,
                               prefix_hit_tokens=self.blocks.hit_tokens, kv_usage=self.blocks.usage())

    def adapters_in_flight(self) -> tuple[set[str], set[str]]:
        """The adapter names of the running sequences, and of the waiting ones."""
        with self._lock:
            return ({name for seq in self.scheduler.running for name, _ in seq.request.adapter_weights},
                    {name for seq in self.scheduler.waiting for name, _ in seq.request.adapter_weights})

    def generate(self, requests: list[Request]) -> list[GenerationResult]:
        """Answer every request (batched together); results in request order."""
        sequences = [self.add_request(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(sequences):
            for output in self.step():
                if output.error is not None:
                    raise output.error
                if output.finished is not None:
                    results[output.request_id] = output.finished
        return [results[s.request_id] for s in sequences]

    # -- internals ------------------------------------------------------------------------

    def _try_admit(self, seq: Sequence) -> Admission:
        """Adapter slots for a sequence the scheduler would admit (it places the KV blocks).
        A preempted sequence kept its slots."""
        if seq.adapter_lease is not None:
            return Admission.ADMIT
        names = [name for name, _ in seq.adapters]
        if names:
            try:
                got = self.adapters.acquire(names, seq.adapter_hold)
            except Exception as error:  # unregistered meanwhile, or its files are gone or broken
                seq.error, seq.adapter_hold = error, None
                return Admission.REJECT
            if got.status == Acquired.READING:  # an adapter is being read from disk
                seq.adapter_hold = got.hold
                return Admission.DEFER
            if got.status == Acquired.NO_ROOM:  # its slots are pinned by running requests
                return Admission.WAIT
            seq.adapter_lease, seq.adapter_hold = got.lease, None
            seq.adapter_slots = [(slot, w) for slot, (_, w) in zip(got.lease.slots, seq.adapters)]
        seq.adapter_key = adapter_identity(seq.adapter_lease, seq.adapters)
        if seq.adapter_lease is not None and seq.adapter_lease.records[0].alora:  # where it applies depends on them
            seq.adapter_key += f"@alora:{','.join(map(str, seq.adapter_lease.records[0].alora))}"
        seq.admitted_time = seq.admitted_time or time.monotonic()
        return Admission.ADMIT

    def _apply_aborts(self) -> list[StepOutput]:
        outputs = []
        for request_id in self._aborted:
            sequences = self._remove_waiting(request_id) + self.scheduler.find_running(request_id)
            live = [seq for seq in sequences if not seq.finished]
            if live:  # every choice of it: the request's one final output
                for seq in live:
                    seq.finish_reason = FINISH_CANCELLED
                outputs.append(self.postprocessor.cancelled(live[0]))
        self._aborted.clear()
        self._release_finished()
        return outputs

    def _remove_waiting(self, request_id: str) -> list[Sequence]:
        """Take a request's sequences out of the queue, with what they hold."""
        sequences = self.scheduler.remove_waiting(request_id)
        for seq in sequences:
            self._release_adapters(seq)  # a preempted sequence keeps its slots while it waits
            if seq.adapter_hold is not None:  # it waited for a read from disk
                self.adapters.release_hold(seq.adapter_hold)
                seq.adapter_hold = None
        return sequences

    def _fail_groups(self, failed) -> None:
        """A choice failed: so did its request; its other choices stop (no output: the
        request's failure was reported)."""
        for seq in failed:
            group = seq.group
            if group is None or group.failed:
                continue
            group.failed = True
            self._remove_waiting(seq.request_id)
            for member in group.members:
                if not member.finished:
                    member.finish_reason, member.error = "error", seq.error

    def _release_finished(self) -> None:
        for seq in self.scheduler.remove_finished():
            self.cache.clear(self.scheduler.free_blocks(seq))
            self._release_adapters(seq)

    def _release_adapters(self, seq: Sequence) -> None:
        if seq.adapter_lease is not None:
            self.adapters.release(seq.adapter_lease)
            seq.adapter_lease = None
            seq.adapter_slots = []
