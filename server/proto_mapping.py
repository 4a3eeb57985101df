"""Protobuf messages <-> the generation layer's types, for every gRPC frontend (`serve`'s
service and the Ray Serve replica): request fields in, results, pieces and adapter
records out. No wire I/O, no validation (the request types own it)."""

from __future__ import annotations

import json

from loraquilt.server.adapters.registry import AdapterRecord
from loraquilt.server.request import Constraint, GenerationResult, RequestError
from loraquilt.v1 import loraquilt_pb2 as pb

STRUCTURED_FIELDS = ("json_schema", "json_object", "regex", "grammar", "choice")  # GenerateRequest's, one at most


def grpc_fields(request: pb.GenerateRequest) -> dict:
    """A GenerateRequest as the generation layer's fields (`GenerationLayer.build_request`);
    proto3's zero values mean "unset" where the proto says so (max_new_tokens, top_p).
    RequestError for a field this server does not serve yet."""
    constraint = _constraint(request)
    return dict(
        prompt=request.prompt, chat=request.chat, adapter=request.adapter or None,
        mix=tuple((entry.name, entry.weight) for entry in request.adapters),
        max_new_tokens=request.max_new_tokens or None, temperature=request.temperature,
        top_p=request.top_p if request.top_p != 0 else 1.0, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
        ignore_eos=request.ignore_eos, constraint=constraint,
        logit_bias=tuple(sorted(request.logit_bias.items())), min_tokens=request.min_tokens,
        repetition_penalty=request.repetition_penalty or 1.0, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, min_p=request.min_p,
        stop_token_ids=tuple(request.stop_token_ids),
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        n=request.n or 1, best_of=request.best_of or None, merge=_merge(request),
    )


def _merge(request: pb.GenerateRequest) -> dict | None:
    """The merge options that are set (None: no Merge message)."""
    if not request.HasField("merge"):
        return None
    merge = request.merge
    return dict(method=merge.method or "linear", density=merge.density if merge.HasField("density") else None,
                seed=merge.seed if merge.HasField("seed") else None, rank=merge.rank or None)


def _constraint(request: pb.GenerateRequest) -> Constraint | None:
    """The structured-output field that is set (at most one may be): json_schema (a JSON
    schema as JSON text), json_object, regex, grammar or choice (a list of texts)."""
    given = [name for name in STRUCTURED_FIELDS if getattr(request, name)]
    if len(given) > 1:
        raise RequestError(given[1], f"set at most one of {', '.join(given)} (one constraint per request)")
    if not given:
        return None
    kind = given[0]
    if kind == "choice":
        return Constraint(kind, json.dumps(list(request.choice)), kind)
    return Constraint(kind, "" if kind == "json_object" else getattr(request, kind), kind)


def token_logprobs(entries) -> list[pb.TokenLogprob]:
    """TokenLogprob messages of the engine's (logits_processing.TokenLogprob) entries; a
    prompt's first token, which has no log probability, is left out (the proto's
    prompt_logprobs start at the second prompt token)."""
    return [pb.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob, text=entry.text,
                            top=[pb.TopLogprob(token_id=token, logprob=value, text=text)
                                 for (token, value), text in zip(entry.top, entry.top_texts)])
            for entry in entries if entry.logprob is not None]


def final_response(result: GenerationResult, text: str | None = None, token_ids=None,
                   logprobs=None, prompt_logprobs=None) -> pb.GenerateResponse:
    """The last GenerateResponse: the whole text (unary) or the last piece (stream), with
    counts; the prompt's log probabilities in unary (a stream's come in its first piece);
    unary with several choices: every one of them in `choices`."""
    response = _response(result, text, token_ids, logprobs, prompt_logprobs)
    if text is None and result.choices:
        response.choices.extend(_response(choice, prompt_logprobs=()) for choice in result.choices)
    return response


def _response(result: GenerationResult, text: str | None = None, token_ids=None,
              logprobs=None, prompt_logprobs=None) -> pb.GenerateResponse:
    return pb.GenerateResponse(index=result.index,
        text=result.text if text is None else text,
        token_ids=list(result.token_ids if token_ids is None else token_ids),
        finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        logprobs=token_logprobs(result.logprobs if logprobs is None else logprobs),
        cached_tokens=result.cached_tokens,
        prompt_logprobs=token_logprobs(result.prompt_logprobs if prompt_logprobs is None else prompt_logprobs),
    )


def piece_response(piece) -> pb.GenerateResponse:
    """One streamed piece (`generation.Piece`): text and token ids of its choice (`index`);
    the one ending a choice has its finish_reason, the last one the request's counts."""
    if piece.result is not None:
        response = final_response(piece.result, piece.text, piece.token_ids, piece.logprobs, piece.prompt_logprobs)
        response.index = piece.index
        response.finish_reason = (piece.choice_result or piece.result).finish_reason
        return response
    return pb.GenerateResponse(text=piece.text, token_ids=list(piece.token_ids), index=piece.index,
                               finish_reason=piece.choice_result.finish_reason if piece.choice_result else "",
                               logprobs=token_logprobs(piece.logprobs),
                               prompt_logprobs=token_logprobs(piece.prompt_logprobs))


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=record.name, rank=record.rank, target_modules=list(record.target_modules),
                          size_bytes=record.size_bytes, tier=record.tier, kind=record.kind)
