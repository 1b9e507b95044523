"""Durable sessions (issue 4): persistent sessions, their queued and inflight messages,
incoming QoS 2 state, expiry and will survive kill -9 of their node.

Every test runs a real node process, talks to it over real sockets, kills it with a real
SIGKILL (no shutdown, no flush) and starts it again on the same ports and ``--data-dir``.
Before a kill that must find a state on disk, the test waits until the node says it has
nothing left to write (``GET /api/v1/stats`` -> ``store.pending_records == 0``) or until
an acknowledgement that promises durability (PUBACK/PUBREC of a publisher) came back.
Times spent "down" are measured against the moment the node saw the event, with
``let_time_pass`` only where elapsed time is the behaviour under test.
"""

from __future__ import annotations

import time

import pytest

from support import (
    ConnectionClosed, Prop, Puback, Pubcomp, Publish, Pubrec, Pubrel, let_time_pass, wait_for,
)

pytestmark = [pytest.mark.timeout(40),
              pytest.mark.shoal_only("Mosquitto runs here with persistence off")]

EXPIRY = 3600


# ---------------------------------------------------------------- helpers


def persistent(version: int, expiry: int = EXPIRY) -> dict:
    """CONNECT properties of a session that outlives its connection."""
    return {Prop.SESSION_EXPIRY_INTERVAL: expiry} if version == 5 else {}


def store_stats(node) -> dict:
    stats = node.stats()
    assert "store" in stats, f"GET /api/v1/stats has no 'store' object: {sorted(stats)}"
    return stats["store"]


def wait_store_idle(node, timeout: float = 5.0) -> None:
    """Wait until everything the node decided so far is written and fsynced."""
    wait_for(lambda: store_stats(node).get("pending_records") == 0, timeout,
             message=lambda: f"store.pending_records == 0 (now {store_stats(node)})")


def wait_all_offline(node, timeout: float = 5.0) -> None:
    """Wait until the node has seen every connection end."""
    wait_for(lambda: node.stats()["connections"] == 0
             and node.stats()["sessions_connected"] == 0, timeout,
             message=lambda: f"no connection left (stats {node.stats()})")


def restart(node, old_pid: int) -> None:
    """Start the node again on the same ports and data directory; a new process."""
    node.start()
    assert node.pid != old_pid, "the node was not restarted"


def crash_and_restart(node) -> None:
    restart(node, node.kill())


def take(client, n: int, ack: bool = True, timeout: float = 5.0) -> list:
    """The next ``n`` PUBLISHes to ``client``, acknowledging QoS 1 ones as they come."""
    got = []
    for _ in range(n):
        p = client.await_packet(lambda q: isinstance(q, Publish), f"PUBLISH {len(got) + 1}/{n}",
                                timeout)
        got.append(p)
        if ack and p.qos == 1:
            client.send(Puback(p.packet_id))
    return got


def take_until(client, marker: bytes, timeout: float = 10.0) -> list[bytes]:
    """Payloads of every PUBLISH up to and including ``marker`` (QoS 1 acknowledged)."""
    payloads = []
    deadline = time.monotonic() + timeout
    while marker not in payloads:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout}s; got {len(payloads)}: " \
                         f"{payloads[:5]}...{payloads[-5:]}"
        p = client.await_packet(lambda q: isinstance(q, Publish), f"PUBLISH up to {marker!r}",
                                left)
        payloads.append(p.payload)
        if p.qos == 1:
            client.send(Puback(p.packet_id))
    return payloads


def publisher(node, client_id: str):
    pub = node.raw(5)
    pub.connect(client_id)
    return pub


# ---------------------------------------------------------------- 1. queued messages


def test_queued_messages_of_an_offline_session_survive_kill_9(node, version):
    sub = node.raw(version)
    assert not sub.connect("dq-sub", clean_start=False,
                           properties=persistent(version)).session_present
    sub.subscribe("dq/#", qos=1)
    sub.disconnect()
    wait_all_offline(node)

    pub = publisher(node, "dq-pub")
    sent = [f"msg-{i:03d}".encode() for i in range(200)]
    for payload in sent:
        pub.publish("dq/t", payload, qos=1)  # waits for its PUBACK
    assert node.stats()["queued_messages"] == 200

    crash_and_restart(node)

    again = node.raw(version)
    ack = again.connect("dq-sub", clean_start=False, properties=persistent(version))
    assert ack.session_present, "the persistent session did not survive kill -9"
    got = take(again, 200)
    assert [p.payload for p in got] == sent, "all 200 messages, in order"
    assert all(p.qos == 1 and p.topic == "dq/t" for p in got)
    assert again.recv_nothing_for(0.3) == []


# ---------------------------------------------------------------- 2. kill mid-burst


def test_every_acknowledged_message_of_a_burst_cut_by_kill_9_is_delivered(node):
    sub = node.raw(5)
    sub.connect("burst-sub", clean_start=False, properties=persistent(5))
    sub.subscribe("burst/#", qos=1)
    sub.disconnect()
    wait_all_offline(node)

    kill_after, window = 150, 100
    pub = publisher(node, "burst-pub")
    payload_of = {}  # packet id -> payload
    acked: list[int] = []
    refused: list = []

    def send_next() -> None:
        i = len(payload_of)
        pid = i + 1
        payload_of[pid] = f"burst-{i:04d}".encode()
        pub.send(Publish("burst/t", payload_of[pid], qos=1, packet_id=pid))

    def on_ack(p) -> None:
        assert isinstance(p, Puback), f"expected PUBACK, got {p!r}"
        assert p.packet_id in payload_of and p.packet_id not in acked, p
        if p.reason_code >= 0x80:
            refused.append(p)
        else:
            acked.append(p.packet_id)

    for _ in range(window):
        send_next()
    while len(acked) < kill_after:
        on_ack(pub.recv(5))
        if len(payload_of) < kill_after + window:
            send_next()  # keep the window full
    old_pid = kill_9_keep_clients(node)
    # PUBACKs the node sent before it died may still be in our socket buffer: they count
    while True:
        try:
            on_ack(pub.recv(2))
        except (ConnectionClosed, TimeoutError, OSError):
            break
    pub.close()
    unacked = sorted(set(payload_of) - set(acked))
    assert not refused, f"PUBACKs with an error reason: {refused}"
    assert unacked, ("the kill came after the burst: every publish was acknowledged "
                     f"({len(acked)}), nothing was in flight")
    restart(node, old_pid)

    again = node.raw(5)
    assert again.connect("burst-sub", clean_start=False,
                         properties=persistent(5)).session_present
    late = publisher(node, "burst-late")
    late.publish("burst/t", b"after-restart", qos=1)
    got = take_until(again, b"after-restart")
    assert got[-1] == b"after-restart"
    got = got[:-1]
    missing = [payload_of[pid] for pid in acked if payload_of[pid] not in got]
    assert not missing, f"{len(missing)} acknowledged message(s) lost: {missing[:10]}"
    assert set(got) <= set(payload_of.values()), "a message that was never published"
    firsts = list(dict.fromkeys(got))
    assert firsts == sorted(firsts), "messages out of publish order"
    assert again.recv_nothing_for(0.2) == []


def kill_9_keep_clients(node) -> int:
    """kill -9 without closing the test's sockets (to read what arrived before death)."""
    clients, node.clients = node.clients, []
    try:
        return node.kill()
    finally:
        node.clients = clients


# ---------------------------------------------------------------- 3. inflight messages


def test_inflight_messages_are_resent_with_dup_and_same_ids_after_kill_9(node, version):
    sub = node.raw(version)
    sub.connect("fl-sub", clean_start=False, properties=persistent(version))
    sub.subscribe("fl/#", qos=2)
    pub = publisher(node, "fl-pub")
    plan = [(b"a", 1), (b"b", 1), (b"x", 2), (b"c", 1), (b"y", 2), (b"d", 1)]
    for payload, qos in plan:
        pub.publish("fl/t", payload, qos=qos)
    first = {p.payload: p for p in take(sub, len(plan), ack=False)}
    assert [(first[pl].payload, first[pl].qos) for pl, _ in plan] == plan
    assert not any(p.dup for p in first.values())
    # a and c acknowledged; b and d not; x not even PUBREC'd; y PUBREC'd, PUBCOMP never sent
    sub.send(Puback(first[b"a"].packet_id))
    sub.send(Puback(first[b"c"].packet_id))
    sub.send(Pubrec(first[b"y"].packet_id))
    rel = sub.await_packet(lambda p: isinstance(p, Pubrel), "PUBREL for y")
    assert rel.packet_id == first[b"y"].packet_id
    sub.ping()  # everything we sent was handled
    wait_store_idle(node)

    crash_and_restart(node)

    again = node.raw(version)
    assert again.connect("fl-sub", clean_start=False,
                         properties=persistent(version)).session_present
    resent = [again.recv(5) for _ in range(4)]
    publishes = [p for p in resent if isinstance(p, Publish)]
    rels = [p for p in resent if isinstance(p, Pubrel)]
    assert [p.payload for p in publishes] == [b"b", b"x", b"d"], \
        f"the unacknowledged PUBLISHes, in their original order: {resent}"
    for p in publishes:
        orig = first[p.payload]
        assert (p.packet_id, p.qos, p.dup) == (orig.packet_id, orig.qos, True), \
            f"re-sent {p.payload!r}: {p} (first sent as {orig})"
    assert [r.packet_id for r in rels] == [first[b"y"].packet_id], \
        f"PUBREL (not the PUBLISH again) for the PUBREC'd QoS 2 message: {resent}"

    for p in publishes:
        if p.qos == 1:
            again.send(Puback(p.packet_id))
        else:
            again.send(Pubrec(p.packet_id))
            assert again.await_packet(lambda q: isinstance(q, Pubrel),
                                      "PUBREL for x").packet_id == p.packet_id
            again.send(Pubcomp(p.packet_id))
    again.send(Pubcomp(first[b"y"].packet_id))
    again.ping()
    assert again.recv_nothing_for(0.3) == []
    wait_store_idle(node)

    # the completions were recorded too: after one more crash nothing is re-sent
    crash_and_restart(node)
    third = node.raw(version)
    assert third.connect("fl-sub", clean_start=False,
                         properties=persistent(version)).session_present
    assert third.recv_nothing_for(0.5) == []
    late = publisher(node, "fl-late")
    late.publish("fl/t", b"later", qos=1)
    assert [p.payload for p in take(third, 1)] == [b"later"], "the session goes on"


# ---------------------------------------------------------------- 4. incoming QoS 2


def test_incoming_qos2_state_survives_kill_9_no_second_delivery(node, version):
    watcher = node.raw(5)
    watcher.connect("in2-watch", clean_start=False, properties=persistent(5))
    watcher.subscribe("in2/#", qos=1)
    pub = node.raw(version)
    assert not pub.connect("in2-pub", clean_start=False,
                           properties=persistent(version)).session_present
    msg = Publish("in2/t", b"exactly-once", qos=2, packet_id=7)
    pub.send(msg)
    assert pub.expect(Pubrec).packet_id == 7  # no PUBREL from us
    got = take(watcher, 1)
    assert got[0].payload == b"exactly-once"
    watcher.ping()  # its PUBACK was handled
    wait_store_idle(node)

    crash_and_restart(node)

    watcher = node.raw(5)
    assert watcher.connect("in2-watch", clean_start=False, properties=persistent(5)).session_present
    pub = node.raw(version)
    assert pub.connect("in2-pub", clean_start=False,
                       properties=persistent(version)).session_present
    msg.dup = True
    pub.send(msg)  # allowed before PUBREL; must not be a new message [MQTT-4.3.3]
    assert pub.expect(Pubrec).packet_id == 7
    pub.send(Pubrel(7))
    comp = pub.expect(Pubcomp)
    assert comp.packet_id == 7 and comp.reason_code == 0, comp
    pub.publish("in2/t", b"after", qos=1)
    got = take_until(watcher, b"after")
    assert got == [b"after"], f"the QoS 2 message was delivered a second time: {got}"


# ---------------------------------------------------------------- 5. session expiry


def test_session_expiry_counts_the_time_the_node_was_down(node):
    short = node.raw(5)
    short.connect("exp-short", clean_start=False, properties=persistent(5, expiry=3))
    short.subscribe("exp/short", qos=1)
    long = node.raw(5)
    long.connect("exp-long", clean_start=False, properties=persistent(5, expiry=60))
    long.subscribe("exp/long", qos=1)
    short.disconnect()
    long.disconnect()
    wait_all_offline(node)
    gone_at = time.monotonic()  # the node saw the disconnects no later than this
    wait_store_idle(node)
    old_pid = node.kill()
    assert time.monotonic() - gone_at < 2.5, "the kill came too late to test anything"
    let_time_pass(gone_at + 3.5 - time.monotonic())  # exp-short's 3 s run out while down
    restart(node, old_pid)

    assert node.raw(5).connect("exp-long", clean_start=False,
                               properties=persistent(5, 60)).session_present, \
        "a session whose expiry has not run out was lost"
    assert not node.raw(5).connect("exp-short", clean_start=False,
                                   properties=persistent(5, 60)).session_present, \
        "the session's 3 s expiry ran out while the node was down, yet it was resumed"


# ---------------------------------------------------------------- 6. message expiry


def test_message_expiry_counts_the_time_the_node_was_down(node):
    sub = node.raw(5)
    sub.connect("mexp-sub", clean_start=False, properties=persistent(5))
    sub.subscribe("mexp/#", qos=1)
    sub.disconnect()
    wait_all_offline(node)
    pub = publisher(node, "mexp-pub")
    published_at = time.monotonic()
    pub.publish("mexp/t", b"short-lived", qos=1,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 2})
    pub.publish("mexp/t", b"no-expiry", qos=1)
    pub.publish("mexp/t", b"long-lived", qos=1,
                properties={Prop.MESSAGE_EXPIRY_INTERVAL: 3600})
    old_pid = node.kill()
    assert time.monotonic() - published_at < 1.5, "the kill came too late to test anything"
    let_time_pass(published_at + 2.6 - time.monotonic())
    restart(node, old_pid)

    again = node.raw(5)
    assert again.connect("mexp-sub", clean_start=False, properties=persistent(5)).session_present
    late = publisher(node, "mexp-late")
    late.publish("mexp/t", b"marker", qos=1)
    got = {}
    for p in take(again, 3):
        got[p.payload] = p
    assert list(got) == [b"no-expiry", b"long-lived", b"marker"], \
        f"the message whose 2 s expiry ran out while the node was down was delivered: {list(got)}"
    assert Prop.MESSAGE_EXPIRY_INTERVAL not in got[b"no-expiry"].properties
    remaining = got[b"long-lived"].properties.get(Prop.MESSAGE_EXPIRY_INTERVAL)
    assert remaining is not None and remaining <= 3600 - 2, \
        f"remaining Message Expiry Interval {remaining}: the time down was not counted"


# ---------------------------------------------------------------- 7. will delay


def test_will_whose_delay_ran_out_while_the_node_was_down_is_published(node):
    watcher = node.raw(5)
    watcher.connect("dw-watch", clean_start=False, properties=persistent(5))
    watcher.subscribe("dw/#", qos=1)
    watcher.disconnect()
    wait_all_offline(node)

    willer = node.raw(5)
    willer.connect("dw-willer", clean_start=False, properties=persistent(5, 60),
                   will_topic="dw/will", will_payload=b"it-died", will_qos=1,
                   will_properties={Prop.WILL_DELAY_INTERVAL: 2})
    willer.close()  # network loss: no DISCONNECT
    closed_at = time.monotonic()
    wait_all_offline(node)
    wait_store_idle(node)
    old_pid = node.kill()
    assert time.monotonic() - closed_at < 1.5, "the kill came too late to test anything"
    let_time_pass(closed_at + 2.6 - time.monotonic())  # the Will Delay ran out while down
    restart(node, old_pid)

    again = node.raw(5)
    assert again.connect("dw-watch", clean_start=False, properties=persistent(5)).session_present
    got = take(again, 1, timeout=5)
    assert (got[0].topic, got[0].payload) == ("dw/will", b"it-died")
    assert again.recv_nothing_for(0.3) == [], "the will was published more than once"


# ---------------------------------------------------------------- 8. clean sessions


def test_clean_sessions_are_not_kept_across_kill_9(node, version):
    keep = node.raw(version)
    keep.connect("cl-keep", clean_start=False, properties=persistent(version))
    keep.subscribe("cl/#", qos=1)
    keep.disconnect()
    # clean ones: still connected at the kill, and one that already left
    clean = [node.raw(version), node.raw(version)]
    clean[0].connect("cl-online", clean_start=True)
    clean[1].connect("cl-gone", clean_start=True)
    if version == 5:  # expiry 0 without clean start: not kept either
        clean.append(node.raw(5))
        clean[2].connect("cl-noexpiry", clean_start=False)
    for c in clean:
        c.subscribe("cl/#", qos=1)
    clean[1].disconnect()
    publisher(node, "cl-pub").publish("cl/t", b"queued", qos=1)
    wait_store_idle(node)

    crash_and_restart(node)

    assert node.raw(version).connect("cl-keep", clean_start=False,
                                     properties=persistent(version)).session_present
    for cid in ("cl-online", "cl-gone") + (("cl-noexpiry",) if version == 5 else ()):
        ack = node.raw(version).connect(cid, clean_start=False, properties=persistent(version))
        assert not ack.session_present, f"the clean session {cid} was kept across kill -9"
