"""A restarted node still has its persistent sessions, their queued messages and the
retained messages (DESIGN: the owner keeps sessions in node/store on disk)."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish

pytestmark = [
    pytest.mark.timeout(40),
    pytest.mark.shoal_only("Mosquitto runs here with persistence off"),
]


def test_restarted_node_keeps_persistent_sessions_queues_and_retained(node, version):
    props = {Prop.SESSION_EXPIRY_INTERVAL: 3600} if version == 5 else {}
    sub = node.raw(version)
    sub.connect("durable", clean_start=False, properties=props)
    sub.subscribe("dur/#", qos=1)
    sub.disconnect()
    pub = node.raw(5)
    pub.connect("durable-pub")
    for i in range(3):
        pub.publish("dur/t", f"m{i}".encode(), qos=1)
    pub.publish("dur/state", b"kept", qos=1, retain=True)
    pub.disconnect()

    node.restart()

    again = node.raw(version)
    assert again.connect("durable", clean_start=False, properties=props).session_present
    got = []
    for _ in range(3):
        p = again.expect(Publish)
        got.append(p.payload)
        again.send(Puback(p.packet_id))
    assert got == [b"m0", b"m1", b"m2"]
    fresh = node.raw(version)
    fresh.connect("durable-fresh")
    fresh.subscribe("dur/state", qos=1)
    p = fresh.expect(Publish)
    assert (p.payload, p.retain) == (b"kept", True)
