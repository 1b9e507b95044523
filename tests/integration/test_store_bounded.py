"""Issue 4, build 5: what is delivered or expired leaves the store, and its disk use stays
bounded by what is live (compaction), shown by the store size metric in
``GET /api/v1/stats`` (``store.bytes_on_disk``)."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish, let_time_pass, wait_for

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.shoal_only("the store and its metric are Shoal's")]

COMPACT_BYTES = 64 * 1024
PAYLOAD = b"x" * 400
ROUNDS, PER_ROUND = 20, 100  # 2,000 messages of 400 bytes: ~1 MB through the log


def store(node) -> dict:
    return node.stats()["store"]


def test_disk_use_stays_bounded_while_messages_flow_through_a_persistent_session(start_node):
    node = start_node(store_compact_bytes=COMPACT_BYTES)
    sub = node.raw(5)
    sub.connect("bounded-sub", clean_start=False,
                properties={Prop.SESSION_EXPIRY_INTERVAL: 600})
    sub.subscribe("bounded/#", qos=1)
    pub = node.raw(5)
    pub.connect("bounded-pub")
    peak = 0
    for r in range(ROUNDS):
        for i in range(PER_ROUND):
            pub.publish("bounded/t", PAYLOAD + f"{r}-{i}".encode(), qos=1)
        for i in range(PER_ROUND):
            p = sub.expect(Publish)
            assert p.payload.endswith(f"{r}-{i}".encode())
            sub.send(Puback(p.packet_id))
        peak = max(peak, store(node)["bytes_on_disk"])
    # everything acknowledged: nothing of it is live in the store any more
    wait_for(lambda: store(node)["messages"] == 0 and store(node)["bodies"] == 0, 5,
             message=lambda: f"delivered messages removed from the store: {store(node)}")
    st = store(node)
    assert st["compactions"] >= 1, st
    assert st["bytes_written"] > 10 * COMPACT_BYTES, st  # the log saw far more than it keeps
    # bounded by the threshold (and twice what is live), not by the traffic
    assert peak < 4 * COMPACT_BYTES, (peak, st)


def test_an_expired_session_leaves_the_store(start_node):
    node = start_node()
    c = node.raw(5)
    c.connect("short-lived", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 1})
    c.subscribe("short/#", qos=1)
    c.disconnect()
    pub = node.raw(5)
    pub.connect("short-pub")
    pub.publish("short/t", b"queued", qos=1)
    wait_for(lambda: store(node)["sessions"] == 1 and store(node)["messages"] == 1, 5,
             message=lambda: f"session and its message stored: {store(node)}")
    let_time_pass(1.0)  # the session's expiry interval
    wait_for(lambda: store(node)["sessions"] == 0 and store(node)["messages"] == 0
             and store(node)["bodies"] == 0, 5,
             message=lambda: f"expired session deleted from the store: {store(node)}")
