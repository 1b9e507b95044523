"""Session.deliver: window, queue bound and the drop policy (oldest QoS 0 first, then
oldest), re-send on attach. A recording client stands in for the socket side."""

from node.session.message import Message
from node.session.session import Counters, Session, SessionLimits


class RecordingClient:
    writable = True

    def __init__(self):
        self.frames = []

    def publish_frame(self, msg, qos, retain, dup, pid, sub_ids, now):
        return (msg.payload, qos, dup, pid)

    def write(self, frame):
        self.frames.append(frame)

    def write_pubrel(self, pid, reason=0):
        self.frames.append(("PUBREL", pid))


def msg(n, qos=1):
    return Message("t", str(n).encode(), qos, False, None, None, "pub")


def offline_session(max_queue=5, qos0=True):
    return Session("c", SessionLimits(32, max_queue, qos0), Counters())


def test_full_queue_drops_oldest_qos0_first_then_oldest():
    s = offline_session()
    for n, q in [(1, 1), (2, 0), (3, 1), (4, 0), (5, 1)]:
        s.deliver(msg(n, q), q, False, None)
    s.deliver(msg(6, 1), 1, False, None)  # drops 2 (oldest QoS 0)
    s.deliver(msg(7, 1), 1, False, None)  # drops 4
    s.deliver(msg(8, 1), 1, False, None)  # no QoS 0 left: drops 1 (oldest)
    assert [m.payload for m, *_ in s.queue] == [b"3", b"5", b"6", b"7", b"8"]
    assert s.counters.dropped_messages == 3
    s.deliver(msg(9, 0), 0, False, None)  # new QoS 0, none older queued: it is dropped
    assert [m.payload for m, *_ in s.queue] == [b"3", b"5", b"6", b"7", b"8"]
    assert s.counters.dropped_messages == 4


def test_qos0_not_queued_offline_unless_enabled():
    s = offline_session(qos0=False)
    s.deliver(msg(1, 0), 0, False, None)
    assert not s.queue and s.counters.qos0_offline_discarded == 1


def test_window_limits_inflight_and_acks_pull_from_the_queue():
    s = offline_session(max_queue=100)
    client = RecordingClient()
    s.attach(client, receive_maximum=3)
    for n in range(10):
        s.deliver(msg(n), 1, False, None)
    assert len(s.inflight_out) == 3 and len(s.queue) == 7
    first_pid = client.frames[0][3]
    assert s.on_puback(first_pid)
    assert len(s.inflight_out) == 3 and len(s.queue) == 6
    assert not s.on_puback(first_pid)  # unknown now


def test_attach_resends_inflight_with_dup_and_pubrel():
    s = offline_session(max_queue=100)
    c1 = RecordingClient()
    s.attach(c1, 65535)
    s.deliver(msg(1, 1), 1, False, None)
    s.deliver(msg(2, 2), 2, False, None)
    pid1, pid2 = c1.frames[0][3], c1.frames[1][3]
    assert s.on_pubrec(pid2, 0) is True
    s.detach("test")
    c2 = RecordingClient()
    s.attach(c2, 65535)
    assert c2.frames == [(b"1", 1, True, pid1), ("PUBREL", pid2)]
    assert s.on_pubcomp(pid2) and s.on_puback(pid1)
    assert not s.inflight_out


def test_packet_ids_skip_ids_in_use():
    s = offline_session(max_queue=100)
    c = RecordingClient()
    s.attach(c, 65535)
    s.next_pid = 65535
    s.deliver(msg(1), 1, False, None)
    s.deliver(msg(2), 1, False, None)
    assert [f[3] for f in c.frames] == [65535, 1]


def test_session_record_round_trip_keeps_everything():
    from node.mqtt.codes import PropertyId as P
    from node.mqtt.packets import Will
    from node.session.record import pack, session_from_record, session_to_record, unpack
    from node.topics import SubEntry

    s = offline_session(max_queue=100)
    c = RecordingClient()
    s.attach(c, 65535)
    props = {P.USER_PROPERTY: [("k", "v")], P.CONTENT_TYPE: "text/plain"}
    s.deliver(Message("a/b", b"1", 1, False, props, 2e9, "p"), 1, False, (7,))
    s.deliver(Message("a/b", b"2", 2, False, None, None, "p"), 2, False, None)
    s.on_pubrec(c.frames[1][3], 0)
    s.window = 2
    s.deliver(msg(3), 1, True, None)  # queued: window full
    s.inflight_in.add(42)
    s.subscriptions["a/#"] = SubEntry("c", "a/#", 2, sub_id=7)
    s.will = Will("w", b"gone", 1, True, {P.WILL_DELAY_INTERVAL: 5})
    s.will_delay = 5
    s.expiry_interval = 3600
    s.detach("test")
    r = unpack(pack(session_to_record(s)))
    s2, subs = session_from_record(r, s.limits, s.counters)
    assert [(pid, e.msg.payload, e.qos, e.stage, e.sub_ids) for pid, e in s2.inflight_out.items()] \
        == [(pid, e.msg.payload, e.qos, e.stage, e.sub_ids) for pid, e in s.inflight_out.items()]
    first = next(iter(s2.inflight_out.values())).msg
    assert first.properties == props and first.expires_at == 2e9
    assert [(m.payload, q, r_) for m, q, r_, *_ in s2.queue] == [(b"3", 1, True)]
    assert s2.inflight_in == {42} and s2.will == s.will and s2.expiry_interval == 3600
    assert subs == [["a/#", 2, False, False, 0, 7, None]]


class OrderedClient(RecordingClient):
    """Like the connection: ``write_after(wait, frame)`` holds a frame until ``wait``."""

    def __init__(self):
        super().__init__()
        self.held = []  # (wait, frame) handed to write_after

    def write_after(self, wait, frame):
        self.held.append((wait, frame))


def test_a_qos2_publish_to_a_stored_session_leaves_only_once_its_packet_id_is_durable(tmp_path):
    """A crash between the PUBLISH and the fsync of its packet id would make the restarted
    node send the message again under a new packet id: a QoS 2 duplicate at the client.
    QoS 1 (duplicates allowed) is written at once."""
    import asyncio

    from node.persist import SessionJournal
    from node.store import SessionStore

    async def go():
        store = SessionStore(str(tmp_path / "store"))
        store.open()
        journal = SessionJournal(store)
        s = offline_session(max_queue=100)
        s.expiry_interval = 60
        journal.track(s)
        await store.commit()
        c = OrderedClient()
        s.attach(c, 65535)
        s.deliver(msg(1, 1), 1, False, None)
        s.deliver(msg(2, 2), 2, False, None)
        assert [f[:2] for f in c.frames] == [(b"1", 1)]  # QoS 1: at once
        [(wait, frame)] = c.held
        assert frame[:2] == (b"2", 2)
        assert wait is not None and not wait.done()  # the packet id is not on disk yet
        await wait
        await store.close()
        again = SessionStore(str(tmp_path / "store"))
        state, _ = again.open()
        await again.close()
        stored = {entry[3]: entry[0] for entry, _ in state.sessions["c"].messages.values()}
        assert stored.get(frame[3]) == 2, stored  # durable under the id the client gets
    asyncio.run(go())


def test_hand_over_marks_travel_with_the_stored_record_but_not_the_snapshot():
    """The cluster's hand-over mark is stored with the session as it is; a snapshot for
    the next holder carries only ``late_seen`` (late messages already taken), never this
    copy's own ``handed`` or ``taking``. Records of the older version (``handed`` and
    ``late_seen`` at the top level) are read into it."""
    from cluster.marks import Handed, HandoverMark, Taking
    from node.session.record import pack, session_from_record, session_meta, \
        session_to_record, unpack

    s = offline_session()
    mark = HandoverMark(Handed("n2", 7, 40), {"n1": (3, [5, 6])},
                        Taking("n3", 9, ("n1",), ("n1", "n3")))
    mark.save(s)
    stored, _ = session_from_record(unpack(pack(session_meta(s))), s.limits, s.counters)
    assert HandoverMark.of(stored) == mark
    record = unpack(pack(session_to_record(s)))
    record["handover"] = HandoverMark.for_receiver(record["handover"])
    sent, _ = session_from_record(record, s.limits, s.counters)
    assert HandoverMark.of(sent) == HandoverMark(None, {"n1": (3, [5, 6])}, None)
    old = session_meta(offline_session())
    del old["handover"]
    old["handed"], old["late_seen"] = ["n2", 7, 40], {"n1": [3, [5, 6]]}
    before, _ = session_from_record(old, s.limits, s.counters)
    assert HandoverMark.of(before) == HandoverMark(Handed("n2", 7, 40), {"n1": (3, [5, 6])})
    del old["handed"], old["late_seen"]
    assert HandoverMark.of(session_from_record(old, s.limits, s.counters)[0]) == HandoverMark()


def test_the_queue_is_bounded_in_bytes_and_its_byte_count_stays_exact():
    """max_queue_bytes: the same drop policy past the byte cap; a message larger than the
    cap is dropped alone; queue_bytes always equals what is queued (random deliveries,
    attaches, acknowledgements and expiries)."""
    import random
    rng = random.Random(7)
    s = Session("c", SessionLimits(4, 1000, True, max_queue_bytes=1000), Counters())

    def big(n, size, qos=1):
        return Message("t/x", bytes([n % 256]) * size, qos, False, None, None, "pub")

    for n in range(10):
        s.deliver(big(n, 197), 1, False, None)  # 200 bytes each with the topic
    assert len(s.queue) == 5 and s.queue_bytes == 1000
    assert [m.payload[0] for m, *_ in s.queue] == [5, 6, 7, 8, 9]
    s.deliver(big(99, 2000), 1, False, None)  # alone beyond the cap
    assert len(s.queue) == 5 and s.queue_bytes == 1000
    client = RecordingClient()
    for _ in range(2000):
        op = rng.random()
        if op < 0.6:
            q = rng.choice((0, 1, 2))
            s.deliver(big(rng.randrange(256), rng.randrange(0, 400), q), q, False, None)
        elif op < 0.7 and s.client is None:
            s.attach(client, receive_maximum=4)
        elif op < 0.8 and s.client is not None:
            s.detach("test")
        elif op < 0.95 and s.inflight_out:
            pid = next(iter(s.inflight_out))
            s.on_puback(pid) or s.on_pubrec(pid, 0)
        assert s.queue_bytes == sum(len(m.payload) + len(m.topic) for m, *_ in s.queue)
        assert s.queue_bytes <= 1000
