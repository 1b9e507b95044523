"""Will messages (MQTT 3.1.2.5, 5.0 3.1.3.2 Will Delay Interval) and keep-alive (3.1.2.10)."""

from __future__ import annotations

import time

import pytest

from support import Disconnect, Prop, holds_for, let_time_pass, wait_for

pytestmark = pytest.mark.timeout(30)


def _watcher(node, topic="will/#"):
    w = node.paho("will-watch", 5)
    w.subscribe(topic, qos=1)
    return w


def _will(topic="will/t", payload=b"gone", qos=1, retain=False, **props):
    return dict(will_topic=topic, will_payload=payload, will_qos=qos, will_retain=retain,
                will_properties={getattr(Prop, name): value for name, value in props.items()})


def _no_will_after_close(node, watcher, connections_before, timeout=1.0):
    """Wait until the node has seen the close, then give a will time to show up."""
    if node.has_admin:
        wait_for(lambda: node.stats()["connections"] < connections_before, 5,
                 message="the node to see the connection close")
    return holds_for(lambda: not watcher.payloads("will/t"), timeout)


def test_will_is_published_when_the_connection_drops(node, version):
    watcher = _watcher(node)
    raw = node.raw(version)
    raw.connect("willer", **_will())
    raw.close()  # network close, no DISCONNECT
    got = watcher.wait_messages(1, topic="will/t")
    assert got[0].payload == b"gone" and got[0].qos == 1


def test_will_is_not_published_after_a_normal_disconnect(node, version):
    watcher = _watcher(node)
    raw = node.raw(version)
    raw.connect("polite", **_will())
    before = node.stats()["connections"] if node.has_admin else 0
    raw.disconnect()
    assert _no_will_after_close(node, watcher, before), watcher.payloads()


def test_v5_disconnect_with_will_message_publishes_the_will(node):
    watcher = _watcher(node)
    raw = node.raw(5)
    raw.connect("will04", **_will(payload=b"asked-for"))
    raw.disconnect(0x04)
    assert watcher.wait_messages(1, topic="will/t")[0].payload == b"asked-for"


def test_retained_will_is_kept_as_retained_message(node, version):
    raw = node.raw(version)
    raw.connect("willret", **_will(topic="will/ret", payload=b"last-words", retain=True))
    raw.close()
    watcher = node.paho("will-late", version)

    def delivered():
        watcher.subscribe("will/ret", qos=1)  # Retain Handling 0: retained sent each time
        return watcher.payloads("will/ret")

    wait_for(delivered, 5, interval=0.2, message="the retained will")
    m = watcher.messages[0]
    assert m.payload == b"last-words" and m.retain


def test_will_delay_is_cancelled_by_a_reconnect_within_the_delay(node):
    watcher = _watcher(node)
    raw = node.raw(5)
    session = {Prop.SESSION_EXPIRY_INTERVAL: 60}
    raw.connect("delayed", clean_start=False, properties=session,
                **_will(WILL_DELAY_INTERVAL=3))
    raw.close()
    closed_at = time.monotonic()
    let_time_pass(1.0)
    again = node.raw(5)
    assert again.connect("delayed", clean_start=False, properties=session).session_present
    remaining = closed_at + 4.5 - time.monotonic()
    assert holds_for(lambda: not watcher.payloads("will/t"), remaining), \
        "the will was sent although the client came back within the Will Delay Interval"


def test_will_is_published_after_the_will_delay(node):
    watcher = _watcher(node)
    raw = node.raw(5)
    raw.connect("delayed2", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 60},
                **_will(payload=b"late", WILL_DELAY_INTERVAL=3))
    raw.close()
    closed_at = time.monotonic()
    watcher.wait_messages(1, topic="will/t", timeout=8)
    elapsed = time.monotonic() - closed_at
    assert 2.5 <= elapsed <= 4.5, f"will after {elapsed:.2f}s, Will Delay Interval 3 s"


def test_will_is_published_when_the_session_ends_before_the_will_delay(node):
    watcher = _watcher(node)
    raw = node.raw(5)
    raw.connect("delayed3", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 1},
                **_will(payload=b"session-over", WILL_DELAY_INTERVAL=10))
    raw.close()
    closed_at = time.monotonic()
    watcher.wait_messages(1, topic="will/t", timeout=6)
    elapsed = time.monotonic() - closed_at
    assert 0.5 <= elapsed <= 3.0, f"will after {elapsed:.2f}s; session expiry was 1 s"


# ---------------------------------------------------------------- keep-alive


@pytest.mark.mosquitto_deviates("2.0.11 checks keep-alives about every 5 s")
def test_silent_client_is_disconnected_after_one_and_a_half_keep_alives(node, version):
    watcher = _watcher(node)
    raw = node.raw(version)
    raw.connect("silent", keep_alive=1, **_will(payload=b"timed-out"))
    start = time.monotonic()
    got = raw.wait_closed(5)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed <= 3.0, f"closed after {elapsed:.2f}s with keep-alive 1 s"
    if version == 5:  # a DISCONNECT 0x8D (Keep Alive timeout) before the close is allowed
        assert len(got) <= 1 and all(
            isinstance(p, Disconnect) and p.reason_code == 0x8D for p in got), got
    else:
        assert got == []
    assert watcher.wait_messages(1, topic="will/t")[0].payload == b"timed-out"


def test_client_that_pings_within_keep_alive_stays_connected(node, version):
    raw = node.raw(version)
    raw.connect("pinger", keep_alive=1)
    deadline = time.monotonic() + 2.5
    for _ in range(20):
        if time.monotonic() >= deadline:
            break
        assert raw.ping(timeout=2) < 1
        let_time_pass(0.4)
    assert raw.recv_nothing_for(0.1) == [] and not raw.closed
    assert raw.ping() < 1


@pytest.mark.parametrize("client_keep_alive", [60, 0])
def test_server_keep_alive_caps_the_client_keep_alive(start_node, client_keep_alive):
    node = start_node(max_keep_alive=10)
    raw = node.raw(5)
    ack = raw.connect("capped", keep_alive=client_keep_alive)
    assert ack.properties.get(Prop.SERVER_KEEP_ALIVE) == 10, ack


def test_server_keep_alive_not_imposed_below_the_cap(start_node):
    node = start_node(max_keep_alive=10)
    raw = node.raw(5)
    ack = raw.connect("under-cap", keep_alive=5)
    assert ack.properties.get(Prop.SERVER_KEEP_ALIVE, 5) == 5, ack
    assert raw.ping() < 1


@pytest.mark.shoal_only("Shoal's default keep-alive cap")
def test_a_client_without_keep_alive_gets_the_default_cap(node):
    """max_keep_alive defaults to 600 s: a keep-alive of 0 (never time out) is not granted,
    so a silent connection cannot be held forever."""
    raw = node.raw(5)
    ack = raw.connect("no-keepalive", keep_alive=0)
    assert ack.properties.get(Prop.SERVER_KEEP_ALIVE) == 600, ack
