"""Limits the server announces in CONNACK and enforces (MQTT 5.0 3.2.2.3): Receive
Maximum, Maximum QoS, Retain Available; and plain subscription management."""

from __future__ import annotations

import pytest

from support import (
    ConnectionClosed, Disconnect, Prop, Publish, Pubrec, Suback, Subscribe, Subscription,
)

pytestmark = pytest.mark.timeout(30)


def test_client_exceeding_the_server_receive_maximum_is_disconnected_with_0x93(start_node):
    node = start_node(receive_maximum=2)
    raw = node.raw(5)
    ack = raw.connect("greedy")
    assert ack.properties.get(Prop.RECEIVE_MAXIMUM) == 2, ack
    for pid in (1, 2, 3):  # QoS 2 stays unacknowledged until PUBREL, which never comes
        raw.send(Publish("rm/t", b"x", qos=2, packet_id=pid))
    got = raw.wait_closed(5)
    assert [p.packet_id for p in got if isinstance(p, Pubrec)] == [1, 2], got
    assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x93, got


def test_max_qos_is_announced_and_subscriptions_are_granted_at_most_that(start_node, version):
    node = start_node(max_qos=1)
    raw = node.raw(version)
    ack = raw.connect("maxqos")
    if version == 5:
        assert ack.properties.get(Prop.MAXIMUM_QOS) == 1, ack
    raw.send(Subscribe(1, [Subscription("mq/#", 2)]))
    assert raw.expect(Suback).reason_codes == [1]


def test_v5_publish_above_max_qos_is_disconnected_with_0x9b(start_node):
    node = start_node(max_qos=1)
    raw = node.raw(5)
    raw.connect("toohigh")
    raw.send(Publish("mq/t", b"x", qos=2, packet_id=1))
    got = raw.wait_closed(5)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x9B, got


def test_retain_not_available_is_announced_and_retained_publish_refused(start_node):
    node = start_node(retain_available=False)
    raw = node.raw(5)
    ack = raw.connect("noretain")
    assert ack.properties.get(Prop.RETAIN_AVAILABLE) == 0, ack
    raw.send(Publish("nr/t", b"x", qos=1, packet_id=1, retain=True))
    got = raw.wait_closed(5)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x9A, got


def test_invalid_topic_filter_is_refused(node, version):
    """Either a failure code in SUBACK for the bad filters, or the connection closed as
    for a protocol violation (both are within the spec); never a granted subscription."""
    raw = node.raw(version)
    raw.connect("badfilter")
    raw.send(Subscribe(1, [Subscription("ok/#", 1), Subscription("bad/#/x", 1),
                           Subscription("bad+", 0)]))
    try:
        answer = raw.recv(5)
    except ConnectionClosed:
        return
    if isinstance(answer, Disconnect):
        assert version == 5 and answer.reason_code >= 0x80, answer
        raw.wait_closed(5)
        return
    assert isinstance(answer, Suback), answer
    assert answer.reason_codes[0] == 1
    failure = 0x8F if version == 5 else 0x80
    assert answer.reason_codes[1:] == [failure, failure], answer


def test_unsubscribe_stops_delivery(node, version):
    sub = node.paho("unsub", version)
    sub.subscribe("us/#", qos=1)
    sub.subscribe("us/keep", qos=1)
    pub = node.paho("unsub-pub", version)
    pub.publish("us/a", b"1", qos=1)
    sub.wait_messages(1)
    sub.unsubscribe("us/#")
    pub.publish("us/a", b"2", qos=1)
    pub.publish("us/keep", b"marker", qos=1)
    sub.wait_messages(1, topic="us/keep")
    assert sub.payloads("us/a") == [b"1"]
