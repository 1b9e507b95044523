"""Topic aliases (MQTT 5.0 3.3.2.3.4), client to server and server to client."""

from __future__ import annotations

import pytest

from support import Disconnect, Prop, Puback, Publish

pytestmark = pytest.mark.timeout(30)


def test_published_topic_alias_reaches_subscribers_by_the_real_topic(node):
    watcher = node.paho("alias-watch", 5)
    watcher.subscribe("ta/#", qos=1)
    pub = node.raw(5)
    ack = pub.connect("alias-pub")
    assert ack.properties.get(Prop.TOPIC_ALIAS_MAXIMUM, 0) >= 2, ack

    def send(topic, payload, alias, pid):
        pub.send(Publish(topic, payload, qos=1, packet_id=pid,
                         properties={Prop.TOPIC_ALIAS: alias}))
        assert pub.expect(Puback).packet_id == pid

    send("ta/x", b"set", 1, 1)
    send("", b"use", 1, 2)
    send("ta/y", b"remap", 1, 3)  # alias 1 now stands for ta/y
    send("", b"use-remapped", 1, 4)
    send("ta/z", b"second", 2, 5)
    send("", b"use-second", 2, 6)
    send("", b"use-first-again", 1, 7)

    got = watcher.wait_messages(7)
    assert [(m.topic, m.payload) for m in got] == [
        ("ta/x", b"set"), ("ta/x", b"use"), ("ta/y", b"remap"), ("ta/y", b"use-remapped"),
        ("ta/z", b"second"), ("ta/z", b"use-second"), ("ta/y", b"use-first-again")]


@pytest.mark.shoal_only("sending topic aliases to subscribers is optional in MQTT 5.0")
def test_subscriber_with_topic_alias_maximum_receives_aliased_publishes(node):
    sub = node.raw(5)
    sub.connect("alias-sub", properties={Prop.TOPIC_ALIAS_MAXIMUM: 10})
    sub.subscribe("tas/#", qos=1)
    pub = node.paho("alias-src", 5)
    for i in range(4):
        pub.publish("tas/long/topic/name", str(i).encode(), qos=1)
    got = []
    aliases: dict[int, str] = {}
    for _ in range(4):
        p = sub.expect(Publish)
        sub.send(Puback(p.packet_id))
        alias = p.properties.get(Prop.TOPIC_ALIAS)
        if alias is not None:
            assert 1 <= alias <= 10, f"alias {alias} beyond our Topic Alias Maximum"
            if p.topic:
                aliases[alias] = p.topic
            else:
                assert alias in aliases, f"alias {alias} used before it was set"
        got.append((p.topic, aliases.get(alias, p.topic), p.payload))
    assert [g[1:] for g in got] == [("tas/long/topic/name", str(i).encode()) for i in range(4)]
    assert got[0][0] == "tas/long/topic/name"
    assert any(topic == "" for topic, _, _ in got[1:]), \
        f"later PUBLISHes should use the alias with an empty topic: {got}"


def test_subscriber_without_topic_alias_maximum_never_gets_aliases(node):
    sub = node.raw(5)
    sub.connect("noalias-sub")
    sub.subscribe("tan/#", qos=1)
    pub = node.paho("noalias-src", 5)
    for i in range(3):
        pub.publish("tan/t", str(i).encode(), qos=1)
    for _ in range(3):
        p = sub.expect(Publish)
        sub.send(Puback(p.packet_id))
        assert p.topic == "tan/t" and Prop.TOPIC_ALIAS not in p.properties


@pytest.mark.parametrize("which", ["above-maximum", "zero"])
def test_invalid_topic_alias_is_disconnected_with_0x94(node, which):
    pub = node.raw(5)
    ack = pub.connect("bad-alias")
    maximum = ack.properties.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
    alias = maximum + 1 if which == "above-maximum" else 0
    pub.send(Publish("tab/t", b"x", qos=1, packet_id=1, properties={Prop.TOPIC_ALIAS: alias}))
    got = pub.wait_closed(5)
    # Above the maximum is "Topic Alias invalid"; 0 is not a valid value at all.
    allowed = (0x94,) if which == "above-maximum" else (0x81, 0x82, 0x94)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code in allowed, got


def test_unknown_topic_alias_with_empty_topic_is_a_protocol_error(node):
    pub = node.raw(5)
    pub.connect("unknown-alias")
    pub.send(Publish("", b"x", qos=1, packet_id=1, properties={Prop.TOPIC_ALIAS: 1}))
    got = pub.wait_closed(5)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code in (0x82, 0x94), got
