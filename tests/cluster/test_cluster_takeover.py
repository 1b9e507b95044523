"""Issue 3, acceptance 3: session takeover between nodes.

* A persistent subscriber on node 1 stops acknowledging mid-stream and disconnects; 1,000
  messages are published on node 2; it reconnects on node 3 with clean start 0. It gets
  session present = 1, its unacknowledged inflight messages again (PUBLISH with DUP and the
  original packet id, or PUBREL), then every queued message, in order per topic: QoS 2
  exactly once, QoS 1 at least once with duplicates only of those re-sent inflight ones.
  Every node's ``GET /api/v1/sessions/<id>`` then names node 3 as owner and holder, and
  node 1 holds no copy.
* A publisher's QoS 2 PUBLISH got PUBREC on node 1; it reconnects to node 2 and sends the
  PUBREL there: PUBCOMP (reason 0), and the subscriber gets the message exactly once.

The subscriber uses tests/support.py's RawClient: it acknowledges exactly what the test
says, nothing by itself."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from support import (Connack, Disconnect, NumberedPublisher, PahoClient, Prop, Publish, Puback,
                     Pubcomp, Pubrec, Pubrel, probe_until_seen, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N_BEFORE = 60       # published while the subscriber is connected (it stops acking midway)
N_OFFLINE = 1000    # published on node 2 while it is away
ACK_FULL = 20       # the first messages it acknowledges completely
ACK_PUBREC_ONLY = 10  # QoS 2: then it sends PUBREC but never PUBCOMP for these
EXPIRY = 300


def uid() -> str:
    return uuid.uuid4().hex[:8]


def topic_of(t: str, k: int) -> str:
    return f"tk/{t}/{'ab'[k % 2]}"


def connect_props(version: int) -> dict:
    return {Prop.SESSION_EXPIRY_INTERVAL: EXPIRY} if version == 5 else {}


def raw_probe_seen(raw):
    """A ``seen`` for probe_until_seen on a RawClient: pump one packet, true on a probe."""
    def seen(_marker):
        try:
            p = raw.recv(0.05)
        except TimeoutError:
            return False
        return isinstance(p, Publish) and p.topic.endswith("/probe")
    return seen


def session_views(cluster, client_id: str) -> dict:
    return {n.node_id: n.session_view(client_id) for n in cluster.running()}


def wait_owned_by(cluster, client_id: str, owner: str, timeout: float = 10.0) -> dict:
    """Every running node names ``owner`` as owner and holder of ``client_id``; only the
    owner reports a copy (here=true)."""
    last = {}

    def agreed():
        last.update(session_views(cluster, client_id))
        return all(v is not None and v["owner"] == owner and v["holder"] == owner
                   and v["here"] == (node_id == owner) for node_id, v in last.items())
    wait_for(agreed, timeout, interval=0.1,
             message=lambda: f"every node to name {owner} owner/holder of {client_id}, "
                             f"only {owner} here: {last}")
    epochs = {v["epoch"] for v in last.values()}
    assert len(epochs) == 1, f"nodes disagree on the epoch: {last}"
    return dict(last)


@pytest.mark.parametrize("version", [5, 4], ids=["v5", "v311"])
@pytest.mark.parametrize("qos", [1, 2], ids=["qos1", "qos2"])
def test_takeover_of_a_persistent_subscriber(cluster_factory, qos, version):
    total = N_BEFORE + N_OFFLINE
    # the default queue (1000) would legitimately drop part of 1,060 messages
    cluster = cluster_factory(3, max_queue=5000)
    n1, n2, n3 = cluster.node(1), cluster.node(2), cluster.node(3)
    t = uid()
    cid = f"tk-{t}"

    # -- the subscriber on node 1 (3.1.1: clean session 0 from the start)
    s1 = n1.raw(version)
    ack = s1.connect(cid, clean_start=(version == 5), properties=connect_props(version))
    assert not ack.session_present
    s1.subscribe(f"tk/{t}/#", qos)
    pub = n2.paho(f"tkpub-{t}", 5)
    probe_until_seen(lambda m: pub.publish(f"tk/{t}/probe", m, qos=0), raw_probe_seen(s1),
                     what="the subscriber's route on n2")

    # -- phase 1: it acknowledges the first messages, then stops, then disconnects
    infos = [pub.publish(topic_of(t, k), str(k).encode(), qos=qos, wait=False)
             for k in range(N_BEFORE)]
    completed: list[int] = []        # fully acknowledged (PUBACK / PUBREC+PUBCOMP)
    rec_only: dict[int, int] = {}    # QoS 2: k -> packet id, PUBREC sent, no PUBCOMP
    unacked: dict[int, int] = {}     # received, never acknowledged: k -> packet id
    pubrel_pending: dict[int, int] = {}  # pid -> k of QoS 2 messages we will complete
    received_1: list[Publish] = []
    deadline = time.monotonic() + 20.0
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            p = s1.recv(0.1)
        except TimeoutError:
            # the window is full once nothing arrives for a while after we stopped acking
            if len(received_1) > ACK_FULL + ACK_PUBREC_ONLY and \
                    time.monotonic() - quiet_since > 0.7 and not pubrel_pending:
                break
            continue
        quiet_since = time.monotonic()
        if isinstance(p, Publish):
            if p.topic.endswith("/probe"):
                continue
            received_1.append(p)
            k = int(p.payload)
            n = len(received_1)
            if n <= ACK_FULL:
                if qos == 1:
                    s1.send(Puback(p.packet_id))
                    completed.append(k)
                else:
                    s1.send(Pubrec(p.packet_id))
                    pubrel_pending[p.packet_id] = k
            elif qos == 2 and n <= ACK_FULL + ACK_PUBREC_ONLY:
                s1.send(Pubrec(p.packet_id))
                rec_only[k] = p.packet_id
            else:
                unacked[k] = p.packet_id
        elif isinstance(p, Pubrel):
            if p.packet_id in pubrel_pending:
                s1.send(Pubcomp(p.packet_id))
                completed.append(pubrel_pending.pop(p.packet_id))
            # PUBRELs of the rec_only messages are left unanswered on purpose
    else:
        raise AssertionError(f"phase 1 did not settle: received {len(received_1)}")
    assert unacked, (f"the broker sent only {len(received_1)} of {N_BEFORE} messages: no "
                     "unacknowledged inflight message to re-send (inflight window?)")
    for info in infos:
        info.wait_for_publish(10.0)
        assert info.is_published()
    s1.disconnect()
    wait_for(lambda: (n1.session_view(cid) or {}).get("connected") is False, 5.0,
             message=lambda: f"n1 to see {cid} offline: {n1.session_view(cid)}")

    # -- phase 2: 1,000 messages on node 2 while it is away
    infos = [pub.publish(topic_of(t, k), str(k).encode(), qos=qos, wait=False)
             for k in range(N_BEFORE, total)]
    for info in infos:
        info.wait_for_publish(30.0)
        assert info.is_published(), "publisher not acknowledged"
    outstanding = total - len(completed)
    view = {}

    def all_reached_n1():
        view.update(n1.session_view(cid) or {})
        return view.get("queued", 0) + view.get("inflight", 0) >= outstanding
    wait_for(all_reached_n1, 20.0, interval=0.1,
             message=lambda: f"n1 to hold {outstanding} messages for {cid}: {view}")

    # -- it reconnects on node 3
    s3 = n3.raw(version, timeout=30.0)
    started = time.monotonic()
    ack = s3.connect(cid, clean_start=False, properties=connect_props(version))
    takeover_s = time.monotonic() - started
    assert ack.session_present, f"session present = 0 after the takeover: {ack!r}"

    publishes: list[Publish] = []
    pubrels: list[int] = []
    completed_2: set[int] = set()  # pids of QoS 2 flows completed on the new connection
    rec_sent_2: set[int] = set()

    def delivered_keys():
        return {int(p.payload) for p in publishes}

    need = set(range(total)) - set(completed) - set(rec_only)
    deadline = time.monotonic() + 60.0
    while True:
        done = need <= delivered_keys() and (qos == 1 or (
            set(rec_only.values()) <= set(pubrels) and rec_sent_2 <= completed_2))
        if done:
            break
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"after the takeover: {len(need - delivered_keys())} messages missing "
                f"(first {sorted(need - delivered_keys())[:10]}), PUBRELs {len(pubrels)} of "
                f"{len(rec_only)} re-sent; got {len(publishes)} PUBLISH")
        try:
            p = s3.recv(max(0.01, min(1.0, deadline - time.monotonic())))
        except TimeoutError:
            continue
        if isinstance(p, Publish):
            if p.topic.endswith("/probe"):
                continue
            publishes.append(p)
            if qos == 1 or p.qos == 1:
                s3.send(Puback(p.packet_id))
            else:
                s3.send(Pubrec(p.packet_id))
                rec_sent_2.add(p.packet_id)
        elif isinstance(p, Pubrel):
            pubrels.append(p.packet_id)
            s3.send(Pubcomp(p.packet_id))
            completed_2.add(p.packet_id)
        elif isinstance(p, Disconnect):
            raise AssertionError(f"node 3 disconnected the subscriber: {p!r}")
    drain_s = time.monotonic() - started
    extra = [p for p in s3.recv_nothing_for(0.5)
             if not (isinstance(p, Publish) and p.topic.endswith("/probe"))]
    assert not extra, f"more than expected after everything arrived: {extra[:5]}"
    print(f"\ntakeover qos{qos} v{version}: CONNECT->CONNACK {takeover_s * 1000:.0f} ms with "
          f"{outstanding} messages outstanding ({len(unacked)} unacked inflight, "
          f"{len(rec_only)} awaiting PUBCOMP); all delivered after {drain_s:.2f}s "
          f"({len(publishes)} PUBLISH, {len(pubrels)} PUBREL)")

    # -- exactly what arrived
    keys = [int(p.payload) for p in publishes]
    counts = Counter(keys)
    dups = sorted(k for k, c in counts.items() if c > 1)
    assert not dups, f"delivered twice on the new connection: {dups[:10]}"
    again = sorted(set(keys) & (set(completed) | set(rec_only)))
    assert not again, f"acknowledged messages delivered again: {again[:10]}"
    assert set(keys) == need, sorted(set(keys) ^ need)[:10]
    assert all(p.qos == qos for p in publishes), Counter(p.qos for p in publishes)
    for p in publishes:
        k = int(p.payload)
        assert p.topic == topic_of(t, k), (k, p.topic)
        if k in unacked:
            assert p.dup, f"re-sent inflight message {k} without DUP"
            assert p.packet_id == unacked[k], \
                f"re-sent message {k} with packet id {p.packet_id}, was {unacked[k]}"
        else:
            assert not p.dup, f"message {k} first sent with DUP=1"
    missing_resends = sorted(set(unacked) - set(keys))
    assert not missing_resends, f"unacknowledged inflight messages not re-sent: {missing_resends}"
    if qos == 2:
        assert sorted(set(rec_only.values()) & set(pubrels)) == sorted(rec_only.values()), \
            f"PUBREL not re-sent for {sorted(set(rec_only.values()) - set(pubrels))}"
        assert len(pubrels) == len(set(pubrels)), Counter(pubrels).most_common(3)
    # in order per topic: the first deliveries, old connection then new, increase per topic
    first_delivery = list(completed) + list(rec_only) + keys
    for letter in (0, 1):
        seq = [k for k in first_delivery if k % 2 == letter]
        assert seq == sorted(seq), f"topic {'ab'[letter]} out of order: " + str(
            [(a, b) for a, b in zip(seq, seq[1:]) if b < a][:5])
    assert sorted(first_delivery) == list(range(total))

    # -- every node agrees: node 3 owns and holds it, node 1 (and 2) hold no copy
    views = wait_owned_by(cluster, cid, "n3")
    assert views["n1"]["here"] is False
    assert views["n3"]["connected"] is True
    wait_for(lambda: (n3.session_view(cid) or {}).get("inflight") == 0 and
             n3.session_view(cid).get("queued") == 0, 5.0,
             message=lambda: f"n3's copy drained: {n3.session_view(cid)}")
    # and the moved subscription keeps working: a new message from node 2 arrives on node 3
    pub.publish(topic_of(t, total), str(total).encode(), qos=qos)
    p = s3.await_packet(lambda p: isinstance(p, Publish) and not p.topic.endswith("/probe"),
                        "a PUBLISH after the takeover")
    assert int(p.payload) == total


@pytest.mark.parametrize("version", [5, 4], ids=["v5", "v311"])
def test_qos2_publisher_sends_pubrel_to_another_node(cluster, version):
    t = uid()
    cid = f"q2pub-{t}"
    topic = f"q2/{t}"
    sub = cluster.node(3).paho(f"q2sub-{t}", 5)
    sub.subscribe(topic, qos=2)
    other = cluster.node(1).paho(f"q2other-{t}", 5)
    probe_until_seen(lambda m: other.publish(topic, m, qos=0),
                     lambda m: any(p.startswith(b"probe-") for p in sub.payloads()),
                     what="subscriber route on n1")

    p1 = cluster.node(1).raw(version)
    p1.connect(cid, clean_start=(version == 5), properties=connect_props(version))
    p1.send(Publish(topic, b"exactly-once", qos=2, packet_id=7))
    rec = p1.await_packet(lambda p: isinstance(p, Pubrec), "PUBREC")
    assert rec.packet_id == 7 and rec.reason_code < 0x80, rec
    p1.close()  # the socket goes away before the PUBREL

    p2 = cluster.node(2).raw(version)
    ack = p2.connect(cid, clean_start=False, properties=connect_props(version))
    assert isinstance(ack, Connack) and ack.session_present, ack
    p2.send(Pubrel(7))
    comp = p2.await_packet(lambda p: isinstance(p, Pubcomp), "PUBCOMP", timeout=10.0)
    assert comp.packet_id == 7 and comp.reason_code == 0, \
        f"PUBCOMP {comp!r} (0x92 = the QoS 2 state did not move with the session)"

    wait_for(lambda: b"exactly-once" in sub.payloads(), 10.0, message="the QoS 2 message")
    # a marker from each node that handled the flow: when both arrived, anything either
    # node routed before them (a second copy) has arrived too
    other2 = cluster.node(2).paho(f"q2other2-{t}", 5)
    for i, client in enumerate((other, other2)):
        marker = f"after-{t}-{i}".encode()
        client.publish(topic, marker, qos=2)
        wait_for(lambda: marker in sub.payloads(), 10.0, message=f"marker {i}")
    got = [p for p in sub.payloads(topic) if p == b"exactly-once"]
    assert got == [b"exactly-once"], f"subscriber got the QoS 2 message {len(got)} times"
    views = wait_owned_by(cluster, cid, "n2")
    assert views["n1"]["here"] is False


def test_rapid_moves_under_steady_publishing_lose_no_acknowledged_message(cluster):
    """A persistent subscriber hops n1 -> n2 -> n3 -> n1 ... every few tens of ms while a
    publisher on n2 sends numbered QoS 1 messages: every acknowledged one arrives. (A
    barrier once overtook forwards still in the sender's outbox: the old holder ended the
    session before they came, and they were lost.)"""
    nodes = [cluster.node(i) for i in (1, 2, 3)]
    t = uid()
    topic = f"hop/{t}/m"
    sub = PahoClient(nodes[0], f"hop-{t}", 5, connect=False, session_expiry=EXPIRY)
    sub.connect()
    sub.subscribe(f"hop/{t}/#", qos=1)
    pub = PahoClient(nodes[1], f"hop-pub-{t}", 5)
    probe_until_seen(lambda m: pub.publish(f"hop/{t}/probe", m, qos=0),
                     lambda m: m in sub.payloads(f"hop/{t}/probe"))
    publisher = NumberedPublisher(pub, topic, pace=0.003).start()
    acked, errors = publisher.acked, publisher.errors
    try:
        for i in range(1, 31):
            after = len(acked)
            wait_for(lambda: errors or any(int(p) >= after for p in sub.payloads(topic)[-20:]),
                     10.0, message=f"a message after move {i}")
            sub.disconnect()
            sub.port = nodes[i % 3].port
            assert sub.connect(clean=False), f"move {i}: session present = 0"
    finally:
        publisher.stop()
    assert not errors, f"publisher failed: {errors[0]!r}"
    want = set(acked)
    wait_for(lambda: want <= {int(p) for p in sub.payloads(topic)}, 20.0,
             message=lambda: f"every acknowledged message; missing "
                             f"{sorted(want - {int(p) for p in sub.payloads(topic)})[:20]}")
