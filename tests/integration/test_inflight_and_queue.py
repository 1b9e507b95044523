"""Flow control toward subscribers: the inflight window (Receive Maximum, --max-inflight)
and the bounded offline queue with its drop policy (--max-queue, --queue-qos0-offline)."""

from __future__ import annotations

import pytest

from support import Prop, Puback, Publish, wait_for

pytestmark = pytest.mark.timeout(40)


def _publisher(node):
    pub = node.raw(5)
    pub.connect("fc-pub")
    return pub


# ---------------------------------------------------------------- inflight window


@pytest.mark.parametrize(
    "version, receive_maximum, flags, window",
    [
        (5, 5, {}, 5),
        (5, None, {}, 32),
        (4, None, {}, 32),
        (5, 10, {"max_inflight": 4}, 4),
    ],
    ids=["v5-receive-maximum-5", "v5-default-32", "v311-default-32", "v5-max-inflight-4"],
)
@pytest.mark.mosquitto_deviates("2.0.11 refills the whole window after a single PUBACK")
def test_unacknowledged_publishes_never_exceed_the_inflight_window(
        start_node, version, receive_maximum, flags, window):
    node = start_node(**flags)
    sub = node.raw(version)
    props = {Prop.RECEIVE_MAXIMUM: receive_maximum} if receive_maximum else {}
    sub.connect("win-sub", properties=props)
    sub.subscribe("win/t", qos=1)
    total = window + 15
    pub = _publisher(node)
    for i in range(total):
        pub.publish("win/t", str(i).encode(), qos=1)  # waits for each PUBACK

    outstanding = [sub.expect(Publish) for _ in range(window)]
    assert sub.recv_nothing_for(0.5) == [], f"more than {window} unacknowledged PUBLISHes"
    assert all(p.qos == 1 and not p.dup for p in outstanding)

    # One acknowledgement frees exactly one slot.
    sub.send(Puback(outstanding[0].packet_id))
    nxt = sub.expect(Publish)
    assert sub.recv_nothing_for(0.3) == []
    received = outstanding + [nxt]

    # Acknowledging as it goes, the rest arrives, in order.
    for p in received[1:]:
        sub.send(Puback(p.packet_id))
    while len(received) < total:
        p = sub.expect(Publish)
        received.append(p)
        sub.send(Puback(p.packet_id))
    assert [int(p.payload) for p in received] == list(range(total))
    assert sub.recv_nothing_for(0.2) == []


# ---------------------------------------------------------------- offline queue


def _offline_subscriber(node, version, client_id="q-sub", topic="q/#"):
    raw = node.raw(version)
    props = {Prop.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else {}
    raw.connect(client_id, clean_start=False, properties=props)
    raw.subscribe(topic, qos=1)
    raw.disconnect()
    return props


def _drain(node, version, props, client_id="q-sub"):
    """Resume the session and take everything it delivers (acknowledging QoS 1)."""
    raw = node.raw(version)
    ack = raw.connect(client_id, clean_start=False, properties=props)
    assert ack.session_present is True
    got = []
    while True:
        more = raw.recv_nothing_for(0.6)
        if not more:
            return got
        for p in more:
            if isinstance(p, Publish):
                got.append(p)
                if p.qos == 1:
                    raw.send(Puback(p.packet_id))


@pytest.mark.shoal_only("drop policy: oldest first (Mosquitto drops the newest)")
def test_full_queue_drops_the_oldest_messages(start_node, version):
    node = start_node(max_queue=10)
    props = _offline_subscriber(node, version)
    pub = _publisher(node)
    for i in range(20):
        pub.publish("q/t", f"m{i}".encode(), qos=1)
    wait_for(lambda: node.stats()["dropped_messages"] == 10, 5,
             message=lambda: f"dropped_messages == 10 (stats {node.stats()})")
    got = _drain(node, version, props)
    assert [p.payload for p in got] == [f"m{i}".encode() for i in range(10, 20)]


@pytest.mark.shoal_only("drop policy: QoS 0 first, oldest first")
def test_full_queue_drops_qos0_messages_first(start_node):
    node = start_node(max_queue=10, queue_qos0_offline=True)
    props = _offline_subscriber(node, 5)
    pub = _publisher(node)
    for i in range(6):
        pub.publish("q/t", f"z{i}".encode(), qos=0)
        pub.publish("q/t", f"a{i}".encode(), qos=1)
    # 12 messages into 10 places: the two oldest QoS 0 messages (z0, z1) go.
    wait_for(lambda: node.stats()["dropped_messages"] == 2, 5,
             message=lambda: f"dropped_messages == 2 (stats {node.stats()})")
    got = _drain(node, 5, props)
    payloads = [p.payload for p in got]
    assert sorted(payloads) == sorted(
        [b"a0", b"a1", b"a2", b"a3", b"a4", b"a5", b"z2", b"z3", b"z4", b"z5"])
    assert [p for p in payloads if p.startswith(b"a")] == [b"a0", b"a1", b"a2", b"a3", b"a4",
                                                           b"a5"]
    assert [p for p in payloads if p.startswith(b"z")] == [b"z2", b"z3", b"z4", b"z5"]
    assert all(p.qos == 0 for p in got if p.payload.startswith(b"z"))


@pytest.mark.shoal_only("drop policy: QoS 0 first, then the oldest")
def test_full_queue_without_qos0_left_drops_the_oldest(start_node):
    node = start_node(max_queue=10, queue_qos0_offline=True)
    props = _offline_subscriber(node, 5)
    pub = _publisher(node)
    pub.publish("q/t", b"z0", qos=0)
    for i in range(11):
        pub.publish("q/t", f"a{i}".encode(), qos=1)
    wait_for(lambda: node.stats()["dropped_messages"] == 2, 5,
             message=lambda: f"dropped_messages == 2 (stats {node.stats()})")
    got = _drain(node, 5, props)
    assert [p.payload for p in got] == [f"a{i}".encode() for i in range(1, 11)]


def test_qos0_messages_are_not_queued_for_offline_sessions_by_default(node, version):
    props = _offline_subscriber(node, version)
    pub = _publisher(node)
    pub.publish("q/t", b"qos0", qos=0)
    pub.publish("q/t", b"qos1", qos=1)
    got = _drain(node, version, props)
    assert [p.payload for p in got] == [b"qos1"]


def test_qos0_messages_are_queued_for_offline_sessions_when_enabled(start_node, version):
    node = start_node(queue_qos0_offline=True)
    props = _offline_subscriber(node, version)
    pub = _publisher(node)
    pub.publish("q/t", b"qos0", qos=0)
    pub.publish("q/t", b"qos1", qos=1)
    got = _drain(node, version, props)
    assert sorted(p.payload for p in got) == [b"qos0", b"qos1"]
