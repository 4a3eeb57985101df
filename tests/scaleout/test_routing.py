"""Routing keys (no Ray needed)."""

from __future__ import annotations

import pytest

from loraquilt.client import build_request
from loraquilt.client.routing import ROUTING_METADATA_KEY, key_members, routing_key, routing_metadata


@pytest.mark.parametrize(("options", "key"), [
    (dict(), ""),
    (dict(adapter="sql"), "sql"),
    (dict(mix={"pirate": 0.5, "shout": 0.5}), "pirate+shout"),
    (dict(mix={"shout": 0.9, "pirate": 0.1}), "pirate+shout"),  # weights and order do not matter
    (dict(mix=[("b", 1.0)]), "b"),
    (dict(mix=[("c", 0.2), ("a", 0.3), ("b", 0.5)]), "a+b+c"),
])
def test_routing_key_names_the_adapters_a_request_needs(options, key):
    request = build_request("hi", **options)
    assert routing_key(request) == key
    assert key_members(key) == tuple(sorted({name for name in key.split("+") if name}))


def test_routing_metadata_is_added_only_when_it_can_travel():
    base = [("x-trace", "1")]
    assert routing_metadata(build_request("hi"), base) == base
    assert routing_metadata(build_request("hi", adapter="a.b:c-1"), base) == [*base, (ROUTING_METADATA_KEY, "a.b:c-1")]
    assert routing_metadata(build_request("hi", adapter="a.b:c-1"), None) == [(ROUTING_METADATA_KEY, "a.b:c-1")]
    for bad in ("caf\u00e9", "new\nline", "x" * 2000):  # the server, not the client library, refuses these
        assert routing_metadata(build_request("hi", adapter=bad), None) is None
