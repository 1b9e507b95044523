"""The admin HTTP API: /healthz and /api/v1/stats reflect what the node is doing."""

from __future__ import annotations

import pytest

from support import wait_for

pytestmark = [pytest.mark.timeout(30), pytest.mark.shoal_only("Shoal's admin API")]


def test_healthz_reports_ok_with_node_id_and_counts(node):
    health = node.healthz()
    assert health["status"] == "ok"
    assert health["node_id"] == "t1"
    assert isinstance(health["connections"], int) and isinstance(health["sessions"], int)


def test_stats_count_connections_sessions_messages_and_retained(node):
    stats = node.stats()
    for key in ("node_id", "connections", "sessions", "messages_in", "messages_out",
                "dropped_messages", "retained"):
        assert key in stats, f"/api/v1/stats lacks {key}: {stats}"
    assert stats["connections"] == 0 and stats["retained"] == 0

    sub = node.paho("stats-sub", 5)
    sub.subscribe("stats/#", qos=1)
    pub = node.paho("stats-pub", 4)
    wait_for(lambda: node.stats()["connections"] == 2, 5, message="2 connections")
    assert node.stats()["sessions"] >= 2

    for i in range(5):
        pub.publish("stats/t", str(i).encode(), qos=1)
    pub.publish("stats/r", b"r", qos=1, retain=True)
    sub.wait_messages(6)
    wait_for(lambda: node.stats()["messages_in"] - stats["messages_in"] >= 6, 5,
             message="messages_in to count 6 publishes")
    wait_for(lambda: node.stats()["messages_out"] - stats["messages_out"] >= 6, 5,
             message="messages_out to count 6 deliveries")
    assert node.stats()["retained"] == 1

    pub.disconnect()
    sub.disconnect()
    wait_for(lambda: node.stats()["connections"] == 0, 5, message="0 connections")
    health = node.healthz()
    assert health["connections"] == 0


def test_sigterm_stops_the_node_cleanly(node):
    client = node.paho("sigterm", 5)
    assert client.is_connected()
    assert node.stop() == 0, node.log_tail()
    wait_for(lambda: client.disconnects, 5, message="the client to see the node go")
