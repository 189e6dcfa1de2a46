"""peering.outranked: when a replica's own resync must stand by (kopf's rule for its watches)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meddistill.operator.peering import outranked

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def entry(priority: int, seen_s_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_s_ago)).isoformat()}


def test_a_live_higher_priority_peer_outranks_a_dead_or_lower_one_does_not():
    assert outranked({"a": entry(200, 10), "me": entry(100, 1)}, 100, NOW)
    assert not outranked({"a": entry(200, 61), "me": entry(100, 1)}, 100, NOW)  # dead: its lifetime passed
    assert not outranked({"a": entry(50, 1), "me": entry(100, 1)}, 100, NOW)
    assert not outranked({"me": entry(100, 1)}, 100, NOW) and not outranked({}, 100, NOW)
    assert outranked({"a": entry(200, 4, lifetime=5)}, 100, NOW) and not outranked({"a": entry(200, 6, lifetime=5)}, 100, NOW)
