"""Where a request should go when several replicas serve it (`loraquilt serve-ray`).
No torch here.

The routing key names the adapters a request needs: the adapter's name, a mix's member
names sorted and joined by '+' (the weights do not matter: the same members serve every
weighting), or '' for the base model. Ray Serve's gRPC proxy reads it from the
`multiplexed_model_id` metadata and prefers a replica that has that key resident. A
single `loraquilt serve` ignores the metadata, so the clients always send it.
"""

from __future__ import annotations

from loraquilt.v1 import loraquilt_pb2 as pb

ROUTING_METADATA_KEY = "multiplexed_model_id"  # the key Ray Serve's gRPC proxy routes on
MIX_SEPARATOR = "+"  # adapter names never contain it
COPY_SEPARATOR = "#"  # "key#1": a second resident copy of a hot key (serve-ray); never in names
MAX_ROUTING_KEY_CHARS = 1024

def key_for(adapter: str | None, mix_names=()) -> str:
    """The routing key of a request on `adapter`, or on a mix of `mix_names`."""
    if adapter:
        return adapter
    return MIX_SEPARATOR.join(sorted(set(mix_names)))


def routing_key(request: pb.GenerateRequest) -> str:
    return key_for(request.adapter, (entry.name for entry in request.adapters))


def key_members(key: str) -> tuple[str, ...]:
    """The adapter names a routing key (or a copy of one, "key#1") stands for; none for
    the base model."""
    key = key.partition(COPY_SEPARATOR)[0]
    return tuple(key.split(MIX_SEPARATOR)) if key else ()


def routing_metadata(request: pb.GenerateRequest, metadata: list[tuple[str, str]] | None
                     ) -> list[tuple[str, str]] | None:
    """`metadata` plus the request's routing key. A key that gRPC metadata cannot carry
    (not printable ASCII, e.g. a malformed name) is left out, so the server, not the
    client library, answers for the bad name."""
    key = routing_key(request)
    if not key or len(key) > MAX_ROUTING_KEY_CHARS or not (key.isascii() and key.isprintable()):
        return metadata
    return [*(metadata or []), (ROUTING_METADATA_KEY, key)]
