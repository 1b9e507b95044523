"""Subscription options of MQTT 5.0 (No Local, Retain As Published, Retain Handling,
Subscription Identifier) and shared subscriptions ($share/group/filter)."""

from __future__ import annotations

import pytest

from support import (
    Prop, Puback, Publish, Suback, Subscribe, Subscription, holds_for, wait_for,
)

pytestmark = pytest.mark.timeout(30)


def test_no_local_subscriber_does_not_get_its_own_messages(node):
    me = node.paho("nolocal-me", 5)
    me.subscribe("nl/#", qos=1, no_local=True)
    other = node.paho("nolocal-other", 5)
    me.publish("nl/t", b"mine", qos=1)
    other.publish("nl/t", b"theirs", qos=1)
    me.wait_messages(1)
    assert holds_for(lambda: me.payloads() == [b"theirs"], 0.3), me.payloads()


def test_without_no_local_a_subscriber_gets_its_own_messages(node):
    me = node.paho("local-me", 5)
    me.subscribe("lo/#", qos=1)
    me.publish("lo/t", b"mine", qos=1)
    assert me.wait_messages(1)[0].payload == b"mine"


def test_retain_as_published_keeps_the_retain_flag_on_live_messages(node):
    rap = node.paho("rap-yes", 5)
    rap.subscribe("rap/#", qos=1, retain_as_published=True)
    plain = node.paho("rap-no", 5)
    plain.subscribe("rap/#", qos=1)
    pub = node.paho("rap-pub", 5)
    pub.publish("rap/t", b"retained-live", qos=1, retain=True)
    pub.publish("rap/t2", b"not-retained", qos=1)
    got_rap = rap.wait_messages(2)
    got_plain = plain.wait_messages(2)
    assert [(m.payload, m.retain) for m in got_rap] == [(b"retained-live", True),
                                                       (b"not-retained", False)]
    assert [(m.payload, m.retain) for m in got_plain] == [(b"retained-live", False),
                                                         (b"not-retained", False)]


def _subscribe_and_collect(node, raw, topic_filter, retain_handling, probe_pub):
    """Subscribe with ``retain_handling``; return payloads that came before a live probe."""
    raw.subscribe(topic_filter, qos=1, retain_handling=retain_handling)
    marker = f"probe-{raw.next_id()}".encode()
    probe_pub.publish("rh/probe", marker, qos=1)
    before = []
    for _ in range(10):
        p = raw.expect(Publish)
        raw.send(Puback(p.packet_id))
        if p.payload == marker:
            return before
        before.append((p.payload, p.retain))
    raise AssertionError(f"probe never came; got {before}")


@pytest.mark.parametrize("retain_handling, first, again", [
    (0, [(b"kept", True)], [(b"kept", True)]),
    (1, [(b"kept", True)], []),
    (2, [], []),
], ids=["rh0-always", "rh1-new-only", "rh2-never"])
def test_retain_handling_decides_when_retained_messages_are_sent(node, retain_handling,
                                                                   first, again):
    pub = node.paho("rh-pub", 5)
    pub.publish("rh/t", b"kept", qos=1, retain=True)
    raw = node.raw(5)
    raw.connect(f"rh-sub{retain_handling}")
    assert _subscribe_and_collect(node, raw, "rh/#", retain_handling, pub) == first
    # Subscribing again to the same filter replaces the existing subscription.
    assert _subscribe_and_collect(node, raw, "rh/#", retain_handling, pub) == again


@pytest.mark.mosquitto_deviates("2.0.11 sends one copy carrying only one of the identifiers")
def test_overlapping_subscriptions_deliver_once_with_every_subscription_identifier(node):
    raw = node.raw(5)
    ack = raw.connect("subid")
    assert ack.properties.get(Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 1) == 1
    raw.subscribe("si/#", qos=1, sub_id=1)
    raw.subscribe("si/+/x", qos=1, sub_id=2)
    raw.subscribe("si/nosubid/#", qos=1)
    pub = node.paho("subid-pub", 5)

    pub.publish("si/a/x", b"both", qos=1)
    p = raw.expect(Publish)
    raw.send(Puback(p.packet_id))
    assert p.payload == b"both"
    assert sorted(p.properties.get(Prop.SUBSCRIPTION_IDENTIFIER, [])) == [1, 2], p
    assert raw.recv_nothing_for(0.3) == [], "one delivery for overlapping subscriptions"

    pub.publish("si/b", b"one", qos=1)
    p = raw.expect(Publish)
    raw.send(Puback(p.packet_id))
    assert p.properties.get(Prop.SUBSCRIPTION_IDENTIFIER) == [1], p


def test_subscription_identifier_in_several_filters_of_one_subscribe(node):
    raw = node.raw(5)
    raw.connect("subid-multi")
    raw.send(Subscribe(1, [Subscription("sm/a", 1), Subscription("sm/b", 1)],
                       {Prop.SUBSCRIPTION_IDENTIFIER: [77]}))
    assert raw.expect(Suback).reason_codes == [1, 1]
    pub = node.paho("subid-multi-pub", 5)
    pub.publish("sm/b", b"x", qos=1)
    p = raw.expect(Publish)
    assert p.properties.get(Prop.SUBSCRIPTION_IDENTIFIER) == [77]


# ---------------------------------------------------------------- shared subscriptions


def test_shared_subscription_delivers_each_message_to_exactly_one_member(node):
    members = [node.paho(f"share-m{i}", 5) for i in range(2)]
    for m in members:
        m.subscribe("$share/g/sh/#", qos=1)
    plain = node.paho("share-plain", 5)
    plain.subscribe("sh/#", qos=1)
    pub = node.paho("share-pub", 5)
    expected = [str(i).encode() for i in range(20)]
    for payload in expected:
        pub.publish("sh/t", payload, qos=1)

    assert [m.payload for m in plain.wait_messages(20)] == expected
    wait_for(lambda: sum(len(m.payloads()) for m in members) >= 20, 5,
             message=lambda: f"20 messages across the group "
                             f"(have {[len(m.payloads()) for m in members]})")
    assert holds_for(lambda: sum(len(m.payloads()) for m in members) == 20, 0.3), \
        "a message went to more than one group member"
    got = [m.payloads() for m in members]
    assert sorted(got[0] + got[1], key=int) == expected
    assert got[0] and got[1], f"both members should get some messages: {got}"
    assert all(m.topic == "sh/t" for member in members for m in member.messages)
