"""Acknowledgements that wait for the store keep the order of their PUBLISHes
[MQTT-4.6.0-2] (PUBACKs in the order the QoS 1 PUBLISHes were received), also when the
messages in between need no disk write, and the connection keeps reading meanwhile."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish, Pubrec, encode

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.shoal_only("store-dependent acknowledgement path of Shoal")]

N = 400


@pytest.mark.parametrize("durability", ["safe", "fast"])
def test_pubacks_come_in_publish_order_when_only_some_messages_are_stored(start_node,
                                                                          durability):
    node = start_node(durability=durability)
    sub = node.raw(5)
    sub.connect("order-sub", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 60})
    sub.subscribe("order/stored", qos=1)
    sub.disconnect()  # offline: every message for it is queued, so written to the store
    pub = node.raw(5)
    pub.connect("order-pub")
    # one write: every other message goes to the stored session, the others nowhere
    frames = b"".join(
        encode(Publish(topic="order/stored" if i % 2 else "order/none", payload=b"%d" % i,
                       qos=1, packet_id=i), 5)
        for i in range(1, N + 1))
    pub.send_bytes(frames)
    acks = [pub.expect(Puback).packet_id for _ in range(N)]
    assert acks == list(range(1, N + 1))
    assert node.stats()["store"]["messages"] == N // 2


def test_pubrec_of_a_resent_qos2_publish_waits_behind_the_first(start_node):
    node = start_node()
    sub = node.raw(5)
    sub.connect("order2-sub", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 60})
    sub.subscribe("order2/#", qos=2)
    sub.disconnect()
    pub = node.raw(5)
    pub.connect("order2-pub")
    first = Publish(topic="order2/t", payload=b"x", qos=2, packet_id=7)
    again = Publish(topic="order2/t", payload=b"x", qos=2, packet_id=7, dup=True)
    pub.send_bytes(encode(first, 5) + encode(again, 5))
    recs = [pub.expect(Pubrec) for _ in range(2)]
    assert [r.packet_id for r in recs] == [7, 7]
    assert node.stats()["store"]["messages"] == 1  # delivered (queued) once
