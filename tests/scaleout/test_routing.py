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


def test_a_copy_of_a_key_stands_for_the_same_adapters():
    assert key_members("pirate+shout#1") == ("pirate", "shout")
    assert key_members("sql#3") == ("sql",)


def test_hot_keys_are_spread_over_replicas_and_cold_ones_are_not():
    from loraquilt.scaleout.hot_keys import HotKeys

    hot = HotKeys(replicas=2, window=100)
    routed = [hot.route("hot" if i % 4 == 0 else f"cold-{i}") for i in range(400)]  # "hot": 25% of traffic
    hot_ids = [key for key in routed if key.startswith("hot")]
    assert set(hot_ids) == {"hot", "hot#1"} and abs(hot_ids.count("hot") - hot_ids.count("hot#1")) <= 2
    assert all("#" not in key for key in routed if key.startswith("cold"))

    single = HotKeys(replicas=1)
    assert {single.route("hot") for _ in range(50)} == {"hot"}  # one replica: nothing to spread over

    cooled = HotKeys(replicas=3, window=40)
    for _ in range(40):
        cooled.route("burst")
    assert {cooled.route("burst") for _ in range(6)} == {"burst", "burst#1", "burst#2"}
    for i in range(40):  # the window forgets the burst
        cooled.route(f"other-{i}")
    assert cooled.route("burst") == "burst"
