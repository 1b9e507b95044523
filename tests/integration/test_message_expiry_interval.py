"""Message Expiry Interval (MQTT 5.0 3.3.2.3.3): expired messages are never delivered,
and what is forwarded carries the remaining interval."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish, let_time_pass

pytestmark = pytest.mark.timeout(30)


def _offline_subscriber(node, client_id, topic):
    raw = node.raw(5)
    raw.connect(client_id, clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    raw.subscribe(topic, qos=1)
    raw.disconnect()


def _resume(node, client_id):
    raw = node.raw(5)
    ack = raw.connect(client_id, clean_start=False,
                      properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    assert ack.session_present is True
    return raw


def test_queued_message_that_expires_while_offline_is_never_delivered(node):
    _offline_subscriber(node, "mei-sub", "mei/#")
    pub = node.raw(5)
    pub.connect("mei-pub")
    pub.publish("mei/a", b"short-lived", qos=1,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 1})
    pub.publish("mei/b", b"long-lived", qos=1,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 60})
    pub.publish("mei/c", b"immortal", qos=1)
    let_time_pass(2.0)

    sub = _resume(node, "mei-sub")
    got = []
    for _ in range(2):
        p = sub.expect(Publish)
        got.append(p.payload)
        sub.send(Puback(p.packet_id))
    assert got == [b"long-lived", b"immortal"]
    assert sub.recv_nothing_for(0.3) == []


def test_delivered_message_carries_the_remaining_expiry_interval(node):
    _offline_subscriber(node, "mrem-sub", "mrem/#")
    pub = node.raw(5)
    pub.connect("mrem-pub")
    pub.publish("mrem/a", b"ten", qos=1, properties={Prop.MESSAGE_EXPIRY_INTERVAL: 10})
    pub.publish("mrem/b", b"none", qos=1)
    let_time_pass(2.1)

    sub = _resume(node, "mrem-sub")
    first = sub.expect(Publish)
    assert first.payload == b"ten"
    remaining = first.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL)
    assert remaining is not None, "the expiry interval must be forwarded"
    assert 1 <= remaining <= 8, f"remaining expiry {remaining}, published 10 s ago 2 s"
    second = sub.expect(Publish)
    assert second.payload == b"none"
    assert Prop.MESSAGE_EXPIRY_INTERVAL not in second.properties


def test_live_delivery_forwards_the_expiry_interval(node):
    sub = node.raw(5)
    sub.connect("mlive-sub")
    sub.subscribe("mlive/t", qos=1)
    pub = node.raw(5)
    pub.connect("mlive-pub")
    pub.publish("mlive/t", b"x", qos=1, properties={Prop.MESSAGE_EXPIRY_INTERVAL: 30})
    p = sub.expect(Publish)
    assert 29 <= p.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL, -1) <= 30
