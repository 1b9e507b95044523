"""Session lifetime: Clean Session (3.1.1), Clean Start and Session Expiry (5.0),
assigned ClientIDs and session takeover."""

from __future__ import annotations

import time

import pytest

from support import (
    Disconnect, Prop, Puback, Publish, holds_for, let_time_pass, wait_for,
)

pytestmark = pytest.mark.timeout(30)


def _persistent(node, client_id, version, expiry=300, **kw):
    """A paho client whose session outlives the connection."""
    if version == 5:
        return node.paho(client_id, 5, clean=False, session_expiry=expiry, **kw)
    return node.paho(client_id, 4, clean=False, **kw)


# ---------------------------------------------------------------- 3.1.1 Clean Session


def test_clean_session_1_discards_the_session_at_disconnect(node):
    sub = node.paho("cs1-sub", 4, clean=True)
    sub.subscribe("cs1/t", qos=1)
    sub.disconnect()
    if node.has_admin:
        wait_for(lambda: node.stats()["connections"] == 0, 5,
                 message="the subscriber's connection to close")
    pub = node.paho("cs1-pub", 4)
    pub.publish("cs1/t", b"lost", qos=1)

    again = node.paho("cs1-sub", 4, clean=False)
    assert again.session_present is False
    # A fresh subscription as a marker: a kept session would have delivered first.
    again.subscribe("cs1/probe", qos=1)
    pub.publish("cs1/probe", b"probe", qos=1)
    again.wait_messages(1, topic="cs1/probe")
    assert again.payloads("cs1/t") == []


def test_clean_session_0_keeps_subscriptions_and_queued_messages(node):
    sub = node.paho("cs0-sub", 4, clean=False)
    assert sub.session_present is False
    sub.subscribe("cs0/#", qos=2)
    sub.disconnect()
    if node.has_admin:  # the node has seen the DISCONNECT: what follows is queued or not
        wait_for(lambda: node.stats()["connections"] == 0, 5,
                 message="the subscriber's connection to close")

    pub = node.paho("cs0-pub", 4)
    for i, qos in enumerate([1, 2, 1, 2]):
        pub.publish("cs0/t", f"m{i}".encode(), qos=qos)
    pub.publish("cs0/qos0", b"not-queued", qos=0)  # QoS 0 is not queued by default
    # One connection's packets are handled in order: once this PUBACK is back, the QoS 0
    # PUBLISH above was handled too (while the subscriber was still away).
    pub.publish("cs0-sync/x", b"sync", qos=1)

    sub.messages.clear()
    assert sub.connect() is True, "session present must be 1 for a kept session"
    got = sub.wait_messages(4, topic="cs0/t")
    # Ordering is only promised among messages of the same QoS (MQTT 4.6).
    assert [(m.payload, m.qos) for m in got if m.qos == 1] == [(b"m0", 1), (b"m2", 1)]
    assert [(m.payload, m.qos) for m in got if m.qos == 2] == [(b"m1", 2), (b"m3", 2)]
    assert len(got) == 4
    # The subscription itself is still there: a new message arrives without SUBSCRIBE.
    pub.publish("cs0/live", b"live", qos=1)
    sub.wait_messages(1, topic="cs0/live")
    assert b"not-queued" not in sub.payloads()


@pytest.mark.shoal_only("--session-expiry-311 in seconds")
def test_clean_session_0_session_expires_after_the_configured_expiry(start_node):
    node = start_node(session_expiry_311=2)
    pub = node.paho("exp311-pub", 4)
    sub = node.paho("exp311", 4, clean=False)
    sub.subscribe("exp311/t", qos=1)
    base_sessions = node.stats()["sessions"]
    sub.disconnect()
    gone_at = time.monotonic()
    pub.publish("exp311/t", b"queued", qos=1)

    # The session is still there just after the disconnect ...
    assert node.stats()["sessions"] >= base_sessions
    # ... and goes away after about two seconds.
    wait_for(lambda: node.stats()["sessions"] < base_sessions, timeout=6,
             message="the 3.1.1 persistent session to expire")
    assert time.monotonic() - gone_at >= 1.5, "session expired before --session-expiry-311"

    again = node.paho("exp311", 4, clean=False)
    assert again.session_present is False
    again.subscribe("exp311/probe", qos=1)
    pub.publish("exp311/probe", b"probe", qos=1)
    again.wait_messages(1, topic="exp311/probe")
    assert again.payloads("exp311/t") == []


@pytest.mark.shoal_only("--session-expiry-311 in seconds")
def test_clean_session_0_reconnect_before_expiry_keeps_session(start_node):
    node = start_node(session_expiry_311=2)
    sub = node.paho("keep311", 4, clean=False)
    sub.subscribe("keep311/t", qos=1)
    sub.disconnect()
    assert sub.connect() is True


# ---------------------------------------------------------------- 5.0 Clean Start / expiry


def test_v5_session_expiry_zero_ends_session_with_connection(node):
    sub = node.paho("sei0", 5, clean=False, session_expiry=0)
    sub.subscribe("sei0/t", qos=1)
    sub.disconnect()
    pub = node.paho("sei0-pub", 5)
    pub.publish("sei0/t", b"x", qos=1)
    again = node.paho("sei0", 5, clean=False, session_expiry=0)
    assert again.session_present is False
    again.subscribe("sei0/probe", qos=1)
    pub.publish("sei0/probe", b"probe", qos=1)
    again.wait_messages(1, topic="sei0/probe")
    assert again.payloads("sei0/t") == []


def test_v5_clean_start_1_discards_an_existing_session(node):
    sub = node.paho("cst1", 5, clean=False, session_expiry=300)
    sub.subscribe("cst1/t", qos=1)
    sub.disconnect()
    pub = node.paho("cst1-pub", 5)
    pub.publish("cst1/t", b"x", qos=1)
    again = node.paho("cst1", 5, clean=True, session_expiry=300)
    assert again.session_present is False
    again.subscribe("cst1/probe", qos=1)
    pub.publish("cst1/probe", b"probe", qos=1)
    again.wait_messages(1, topic="cst1/probe")
    assert again.payloads("cst1/t") == []


def test_v5_session_with_expiry_is_kept_then_gone_after_it(node):
    sub = node.paho("sei2", 5, clean=False, session_expiry=2)
    sub.subscribe("sei2/t", qos=1)
    sub.disconnect()
    pub = node.paho("sei2-pub", 5)
    pub.publish("sei2/t", b"kept", qos=1)

    assert sub.connect(clean=False) is True
    assert sub.wait_messages(1, topic="sei2/t")[0].payload == b"kept"

    sub.disconnect()
    gone_at = time.monotonic()
    pub.publish("sei2/t", b"expires-with-session", qos=1)
    if node.has_admin:
        wait_for(lambda: node.stats()["sessions"] <= 1, timeout=6,  # only the publisher's
                 message="the v5 session to expire")
        assert time.monotonic() - gone_at >= 1.5
    else:
        let_time_pass(3.0)
    again = node.paho("sei2", 5, clean=False, session_expiry=2)
    assert again.session_present is False


def test_v5_disconnect_shortens_session_expiry(node):
    sub = node.paho("dshort", 5, clean=False, session_expiry=300)
    sub.subscribe("dshort/t", qos=1)
    sub.disconnect(properties={"SessionExpiryInterval": 1})
    if node.has_admin:
        wait_for(lambda: node.stats()["sessions"] == 0, timeout=5,
                 message="the session to expire after the DISCONNECT's 1 s")
    else:
        let_time_pass(2.5)
    again = node.paho("dshort", 5, clean=False, session_expiry=300)
    assert again.session_present is False


def test_v5_disconnect_lengthens_session_expiry(node):
    sub = node.paho("dlong", 5, clean=False, session_expiry=1)
    sub.subscribe("dlong/t", qos=1)
    sub.disconnect(properties={"SessionExpiryInterval": 60})
    let_time_pass(2.0)  # longer than the CONNECT's 1 s
    assert sub.connect(clean=False) is True


def test_v5_disconnect_setting_expiry_after_zero_is_protocol_error(node):
    raw = node.raw(5)
    raw.connect("dzero", clean_start=False)  # no Session Expiry Interval = 0
    raw.send(Disconnect(0, {Prop.SESSION_EXPIRY_INTERVAL: 60}))
    got = raw.wait_closed(5)
    disconnects = [p for p in got if isinstance(p, Disconnect)]
    assert disconnects and disconnects[0].reason_code == 0x82, got
    # The session ended with the connection: it was not given the 60 s.
    again = node.raw(5)
    assert again.connect("dzero", clean_start=False,
                         properties={Prop.SESSION_EXPIRY_INTERVAL: 60}).session_present is False


# ---------------------------------------------------------------- ClientIDs


def test_v5_empty_client_id_gets_an_assigned_client_identifier(node):
    raw = node.raw(5)
    ack = raw.connect("")
    assigned = ack.properties.get(Prop.ASSIGNED_CLIENT_IDENTIFIER)
    assert isinstance(assigned, str) and assigned, ack
    other = node.raw(5).connect("")
    assert other.properties[Prop.ASSIGNED_CLIENT_IDENTIFIER] != assigned


def test_311_empty_client_id_with_clean_session_is_accepted(node):
    raw = node.raw(4)
    ack = raw.connect("", clean_start=True)
    assert ack.reason_code == 0 and ack.session_present is False
    assert raw.ping() < 2


def test_311_empty_client_id_without_clean_session_is_rejected_with_code_2(node):
    raw = node.raw(4)
    ack = raw.connect("", clean_start=False, expect_success=False)
    assert ack.reason_code == 2
    assert ack.session_present is False
    raw.wait_closed(5)


# ---------------------------------------------------------------- takeover


@pytest.mark.mosquitto_deviates("2.0.11 closes the old v5 connection without DISCONNECT 0x8E",
                                only="v5")
def test_second_connect_with_same_client_id_takes_the_session_over(node, version):
    old = node.raw(version)
    old.connect("taker", clean_start=False,
                properties={Prop.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None)
    old.subscribe("take/#", qos=1)
    pub = node.paho("take-pub", 5)
    pub.publish("take/1", b"inflight", qos=1)
    first = old.expect(Publish)  # not acknowledged: stays inflight in the session

    new = node.raw(version)
    ack = new.connect("taker", clean_start=False,
                      properties={Prop.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None)
    assert ack.session_present is True

    got = old.wait_closed(5)
    if version == 5:
        assert [(type(p), p.reason_code) for p in got] == [(Disconnect, 0x8E)], got
    else:
        assert got == [], f"3.1.1 connection must just be closed, got {got!r}"

    again = new.expect(Publish)
    assert (again.payload, again.packet_id, again.dup) == (b"inflight", first.packet_id, True)
    new.send(Puback(again.packet_id))
    pub.publish("take/2", b"after", qos=1)
    after = new.expect(Publish)
    assert after.payload == b"after" and after.topic == "take/2"


@pytest.mark.mosquitto_deviates("2.0.11 closes the old v5 connection without DISCONNECT 0x8E",
                                only="v5")
def test_takeover_with_clean_start_still_disconnects_the_old_connection(node, version):
    old = node.paho("taker2", version)
    old.subscribe("take2/#", qos=1)
    new = node.raw(version)
    new.connect("taker2", clean_start=True)
    wait_for(lambda: old.disconnects, 5, message="old connection closed")
    if version == 5:
        assert old.disconnects[0] == 0x8E
    new.subscribe("take2/#", qos=1)
    pub = node.paho("take2-pub", 4)
    pub.publish("take2/x", b"to-new", qos=1)
    assert new.expect(Publish).payload == b"to-new"
    assert holds_for(lambda: not old.messages, 0.3)


def test_takeover_moves_inflight_and_queued_messages_to_the_new_connection(node):
    session = {Prop.SESSION_EXPIRY_INTERVAL: 300}
    old = node.raw(5)
    old.connect("taker3", clean_start=False,
                properties={**session, Prop.RECEIVE_MAXIMUM: 1})
    old.subscribe("take3/#", qos=1)
    pub = node.paho("take3-pub", 5)
    for i in range(4):
        pub.publish("take3/t", f"m{i}".encode(), qos=1)
    first = old.expect(Publish)  # window of 1: m1..m3 wait in the session's queue
    assert first.payload == b"m0"
    assert old.recv_nothing_for(0.3) == []

    new = node.raw(5)
    assert new.connect("taker3", clean_start=False, properties=session).session_present
    got = []
    for _ in range(4):
        p = new.expect(Publish)
        got.append((p.payload, p.dup))
        new.send(Puback(p.packet_id))
    assert got == [(b"m0", True), (b"m1", False), (b"m2", False), (b"m3", False)]
    assert new.recv_nothing_for(0.3) == []


@pytest.mark.shoal_only("Shoal's default session expiry cap")
def test_a_session_that_asks_to_never_expire_gets_seven_days(node):
    """max_session_expiry defaults to 7 days: a v5 client asking for 0xFFFFFFFF (never) is
    told 604800 in its CONNACK, so abandoned sessions do not pile up for good."""
    from support import Prop
    raw = node.raw(5)
    ack = raw.connect("forever", clean_start=False,
                      properties={Prop.SESSION_EXPIRY_INTERVAL: 0xFFFFFFFF})
    assert ack.properties.get(Prop.SESSION_EXPIRY_INTERVAL) == 604800, ack
