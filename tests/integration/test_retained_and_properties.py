"""Retained messages (MQTT 3.3.1.3) and pass-through of PUBLISH properties (5.0 3.3.2.3)."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish, let_time_pass, wait_for

pytestmark = pytest.mark.timeout(30)


def _retained_for(node, version, topic_filter, client_id="ret-late"):
    """Subscribe a fresh client to ``topic_filter`` and return (payload, retain) of what
    it received before a live marker published afterwards on ``ret/probe``."""
    sub = node.raw(version)
    sub.connect(client_id)
    sub.subscribe(topic_filter, qos=1)
    sub.subscribe("ret/probe", qos=1)
    probe = node.raw(5)
    probe.connect(client_id + "-probe")
    probe.publish("ret/probe", b"probe", qos=1)
    got = []
    for _ in range(20):
        p = sub.expect(Publish)
        if p.qos:
            sub.send(Puback(p.packet_id))
        if p.topic == "ret/probe":
            sub.close()
            probe.close()
            return got
        got.append((p.topic, p.payload, p.retain))
    raise AssertionError(f"no probe; got {got}")


@pytest.mark.parametrize("topic_filter", ["ret/a", "ret/+", "ret/#", "+/a", "#"])
def test_retained_message_is_delivered_to_new_subscribers(node, version, topic_filter):
    pub = node.paho("ret-pub", version)
    pub.publish("ret/a", b"stored", qos=1, retain=True)
    assert _retained_for(node, version, topic_filter) == [("ret/a", b"stored", True)]


def test_retained_message_is_replaced_by_the_next_one(node, version):
    pub = node.paho("ret-pub", version)
    pub.publish("ret/a", b"old", qos=1, retain=True)
    pub.publish("ret/a", b"new", qos=1, retain=True)
    assert _retained_for(node, version, "ret/#") == [("ret/a", b"new", True)]


def test_empty_retained_payload_clears_the_retained_message(node, version):
    pub = node.paho("ret-pub", version)
    pub.publish("ret/a", b"doomed", qos=1, retain=True)
    pub.publish("ret/b", b"survivor", qos=1, retain=True)
    if node.has_admin:
        wait_for(lambda: node.stats()["retained"] == 2, 5, message="2 retained messages")
    live = node.paho("ret-live", version)
    live.subscribe("ret/a", qos=1)
    pub.publish("ret/a", b"", qos=1, retain=True)
    # Current subscribers still get the empty message (as a normal publish).
    live.wait_messages(2)
    assert [m.payload for m in live.messages] == [b"doomed", b""]
    assert _retained_for(node, version, "ret/#") == [("ret/b", b"survivor", True)]
    if node.has_admin:
        assert node.stats()["retained"] == 1


def test_live_message_to_existing_subscriber_has_retain_0(node, version):
    sub = node.paho("ret-existing", version)
    sub.subscribe("ret/#", qos=1)
    pub = node.paho("ret-pub", version)
    pub.publish("ret/a", b"live", qos=1, retain=True)
    m = sub.wait_messages(1)[0]
    assert m.payload == b"live" and m.retain is False


def test_retained_message_is_not_delivered_after_its_expiry(node):
    pub = node.raw(5)
    pub.connect("ret-exp-pub")
    pub.publish("ret/a", b"short", qos=1, retain=True,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 1})
    pub.publish("ret/b", b"long", qos=1, retain=True,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 100})
    assert sorted(_retained_for(node, 5, "ret/#", "ret-early")) == [
        ("ret/a", b"short", True), ("ret/b", b"long", True)]
    let_time_pass(2.0)
    assert _retained_for(node, 5, "ret/#", "ret-late") == [("ret/b", b"long", True)]


def test_retained_message_carries_its_remaining_expiry(node):
    pub = node.raw(5)
    pub.connect("ret-rem-pub")
    pub.publish("ret/a", b"x", qos=1, retain=True,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 10})
    let_time_pass(2.1)
    sub = node.raw(5)
    sub.connect("ret-rem-sub")
    sub.subscribe("ret/a", qos=0)
    p = sub.expect(Publish)
    assert p.retain and 1 <= p.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL, -1) <= 8, p


# ---------------------------------------------------------------- properties


PASS_THROUGH = {
    Prop.PAYLOAD_FORMAT_INDICATOR: 1,
    Prop.CONTENT_TYPE: "application/json; charset=utf-8",
    Prop.RESPONSE_TOPIC: "reply/\u00fcber",
    Prop.CORRELATION_DATA: b"\x00\xff\x10corr",
    Prop.USER_PROPERTY: [("k", "v1"), ("k", "v2"), ("\u00fc", "\u2713"), ("empty", "")],
}


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_properties_arrive_unchanged(node, qos):
    sub = node.raw(5)
    sub.connect("props-sub")
    sub.subscribe("props/#", qos=2)
    pub = node.raw(5)
    pub.connect("props-pub")
    pub.publish("props/t", b'{"a": 1}', qos=qos, properties=PASS_THROUGH)
    p = sub.expect(Publish)
    assert p.payload == b'{"a": 1}'
    assert p.properties == PASS_THROUGH, "properties (and the order of user properties)"


def test_publish_properties_reach_a_paho_subscriber(node):
    sub = node.paho("props-paho", 5)
    sub.subscribe("props/#", qos=1)
    pub = node.paho("props-paho-pub", 5)
    pub.publish("props/t", b"x", qos=1, properties={
        "UserProperty": [("a", "1"), ("b", "2")], "ResponseTopic": "r/t",
        "CorrelationData": b"\x01\x02", "ContentType": "text/plain",
        "PayloadFormatIndicator": 1})
    props = sub.wait_messages(1)[0].properties
    assert props.UserProperty == [("a", "1"), ("b", "2")]
    assert props.ResponseTopic == "r/t" and props.CorrelationData == b"\x01\x02"
    assert props.ContentType == "text/plain" and props.PayloadFormatIndicator == 1


def test_will_properties_arrive_with_the_will(node):
    sub = node.raw(5)
    sub.connect("willprops-sub")
    sub.subscribe("willprops/#", qos=1)
    raw = node.raw(5)
    raw.connect("willprops", will_topic="willprops/t", will_payload=b"bye", will_qos=1,
                will_properties=dict(PASS_THROUGH))
    raw.close()
    p = sub.expect(Publish)
    assert p.payload == b"bye"
    assert p.properties == PASS_THROUGH


def test_messages_to_311_subscribers_carry_no_properties(node):
    sub = node.raw(4)
    sub.connect("props-311")
    sub.subscribe("props/#", qos=1)
    pub = node.raw(5)
    pub.connect("props-311-pub")
    pub.publish("props/t", b"plain", qos=1, properties=PASS_THROUGH)
    p = sub.expect(Publish)  # decoded as 3.1.1: a property block would corrupt the payload
    assert p.payload == b"plain" and p.topic == "props/t"
