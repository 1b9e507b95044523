"""QoS 1 and 2 in both directions, re-delivery on session resume (MQTT 4.4) and the
exactly-once receive of QoS 2 (4.3.3)."""

from __future__ import annotations

import pytest

from support import (
    Prop, Puback, Pubcomp, Publish, Pubrec, Pubrel, barrier, wait_for,
)

pytestmark = pytest.mark.timeout(30)


def _props(version, expiry=300):
    return {Prop.SESSION_EXPIRY_INTERVAL: expiry} if version == 5 else {}


def test_every_qos_combination_is_delivered_at_the_lower_qos(node, version):
    pub = node.paho("qos-pub", version)
    for sub_qos in (0, 1, 2):
        sub = node.paho(f"qos-sub{sub_qos}", version)
        granted = sub.subscribe(f"qos/{sub_qos}/#", qos=sub_qos)
        assert granted == [sub_qos]
        for pub_qos in (0, 1, 2):
            pub.publish(f"qos/{sub_qos}/{pub_qos}", f"p{pub_qos}".encode(), qos=pub_qos)
        got = sub.wait_messages(3)
        by_payload = {m.payload: m.qos for m in got}
        assert by_payload == {f"p{q}".encode(): min(q, sub_qos) for q in (0, 1, 2)}
        assert len(got) == 3


def test_unacknowledged_publishes_are_resent_with_dup_and_same_ids_on_resume(node, version):
    sub = node.raw(version)
    sub.connect("resend", clean_start=False, properties=_props(version))
    sub.subscribe("resend/#", qos=2)
    pub = node.paho("resend-pub", 5)
    for payload, qos in ((b"one", 1), (b"two", 2), (b"three", 1), (b"four", 2)):
        pub.publish("resend/t", payload, qos=qos)
    first = [sub.expect(Publish) for _ in range(4)]
    assert sorted(p.payload for p in first) == [b"four", b"one", b"three", b"two"]
    assert not any(p.dup for p in first)
    sub.close()  # no acknowledgement at all, no DISCONNECT

    again = node.raw(version)
    ack = again.connect("resend", clean_start=False, properties=_props(version))
    assert ack.session_present is True
    resent = [again.expect(Publish) for _ in range(4)]
    assert [(p.payload, p.packet_id, p.qos) for p in resent] == \
        [(p.payload, p.packet_id, p.qos) for p in first], "same messages, ids and order"
    assert all(p.dup for p in resent), "re-sent PUBLISHes carry DUP=1"

    # Completing the flows now ends them: nothing is sent a third time.
    for p in resent:
        if p.qos == 1:
            again.send(Puback(p.packet_id))
        else:
            again.send(Pubrec(p.packet_id))
            rel = again.expect(Pubrel)
            assert rel.packet_id == p.packet_id
            again.send(Pubcomp(p.packet_id))
    assert again.recv_nothing_for(0.3) == []
    again.disconnect()
    third = node.raw(version)
    assert third.connect("resend", clean_start=False,
                         properties=_props(version)).session_present is True
    assert third.recv_nothing_for(0.5) == []


def test_pubrec_before_disconnect_is_followed_by_pubrel_on_resume(node, version):
    sub = node.raw(version)
    sub.connect("relsend", clean_start=False, properties=_props(version))
    sub.subscribe("relsend/#", qos=2)
    pub = node.paho("relsend-pub", 5)
    pub.publish("relsend/t", b"exactly-once", qos=2)
    msg = sub.expect(Publish)
    assert msg.qos == 2
    sub.send(Pubrec(msg.packet_id))
    assert sub.expect(Pubrel).packet_id == msg.packet_id  # the broker has our PUBREC
    sub.close()  # PUBREL never answered

    again = node.raw(version)
    assert again.connect("relsend", clean_start=False,
                         properties=_props(version)).session_present is True
    rel = again.recv(5)
    assert isinstance(rel, Pubrel), f"expected PUBREL, not the PUBLISH again: {rel!r}"
    assert rel.packet_id == msg.packet_id
    again.send(Pubcomp(rel.packet_id))
    assert again.recv_nothing_for(0.4) == []


def test_qos2_publish_sent_twice_before_pubrel_is_delivered_once(node, version):
    watcher = node.paho("once-watch", version)
    watcher.subscribe("once/#", qos=2)
    pub = node.raw(version)
    pub.connect("once-pub")
    msg = Publish("once/t", b"only-once", qos=2, packet_id=7)
    pub.send(msg)
    assert pub.expect(Pubrec).packet_id == 7
    msg.dup = True
    pub.send(msg)
    assert pub.expect(Pubrec).packet_id == 7
    pub.send(Pubrel(7))
    comp = pub.expect(Pubcomp)
    assert comp.packet_id == 7 and comp.reason_code == 0
    # A later message on the same topic proves the watcher has seen everything before.
    pub.publish("once/t", b"after", qos=2)
    wait_for(lambda: b"after" in watcher.payloads(), 5, message="the later message")
    assert watcher.payloads().count(b"only-once") == 1


def test_packet_id_is_reusable_after_pubcomp(node, version):
    watcher = node.paho("reuse-watch", version)
    watcher.subscribe("reuse/#", qos=2)
    pub = node.raw(version)
    pub.connect("reuse-pub")
    for payload in (b"first", b"second"):
        pub.send(Publish("reuse/t", payload, qos=2, packet_id=9))
        assert pub.expect(Pubrec).packet_id == 9
        pub.send(Pubrel(9))
        assert pub.expect(Pubcomp).packet_id == 9
    wait_for(lambda: watcher.payloads() == [b"first", b"second"], 5,
             message=lambda: f"both messages (have {watcher.payloads()})")


@pytest.mark.mosquitto_deviates("2.0.11 answers PUBCOMP 0x00", only="v5")
def test_pubrel_for_unknown_packet_id_is_answered_with_pubcomp(node, version):
    raw = node.raw(version)
    raw.connect("unknown-rel")
    raw.send(Pubrel(999))
    comp = raw.expect(Pubcomp)
    assert comp.packet_id == 999
    if version == 5:
        assert comp.reason_code == 0x92, "Packet Identifier not found"
    assert raw.ping() < 2, "the connection stays up"


def test_qos1_publish_is_acknowledged_with_puback(node, version):
    raw = node.raw(version)
    raw.connect("puback")
    raw.send(Publish("puback/t", b"x", qos=1, packet_id=42))
    ack = raw.expect(Puback)
    assert ack.packet_id == 42
    if version == 5:
        assert ack.reason_code in (0x00, 0x10)  # success / no matching subscribers


def test_messages_on_one_topic_arrive_in_publish_order(node, version):
    sub = node.paho("order-sub", version)
    sub.subscribe("order/#", qos=1)
    pub = node.paho("order-pub", version)
    for i in range(50):
        pub.publish("order/t", str(i).encode(), qos=1, wait=False)
    barrier(sub, pub, "order/t")
    assert sub.payloads()[:50] == [str(i).encode() for i in range(50)]
