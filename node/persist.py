"""The journal: what persistent sessions change, written to the node's store.

The one place that knows both sides: ``Session`` and the broker tell it what changed
(a message queued, sent with a packet id, PUBREC'd, acknowledged, dropped; a session's
subscriptions, will, expiry), and it turns that into records of ``node.store``; at start
it turns the store's ``LoadedState`` back into sessions.

What is stored, per persistent session (3.1.1 Clean Session 0, 5.0 Session Expiry
Interval > 0):

* the session record without its messages (``record.session_meta``): expiry, will and
  its delay, subscriptions with their options and identifiers;
* every QoS 1/2 message it holds, queued or inflight, under the session's increasing
  ``key``: entry ``[qos, retain, sub_ids, pid, stage]`` (``pid`` 0 while queued) and the
  message body, written once however many sessions hold it;
* the packet ids of incoming QoS 2 messages PUBREC'd and awaiting PUBREL.

QoS 0 messages are not stored: at most once, a crash may lose them. Sessions with expiry
0 are not stored: they end with their connection.

Replication (a cluster's replica nodes): when ``tap`` is set, every change to a
persistent session is also given to it as one small tuple, in the order made (``OPS``
below), and ``commit_wait()`` also waits for ``tap_wait()``: the replicas' commit.

Acknowledgements wait for the disk where a promise depends on it: ``writes`` counts the
changes written; a packet handler that changed it gets a ``commit_wait()`` for its PUBACK,
PUBREC, PUBCOMP, SUBACK or UNSUBACK (one that wrote nothing, none: an in-memory flow
never waits for the disk because of another one).
"""

from __future__ import annotations

import logging

from .mqtt.codes import EXPIRY_NEVER
from .session.message import Message
from .session.record import (RecordError, message_from_record, message_to_record, pack,
                             session_from_record, session_meta, sub_ids_in, unpack)
from .session.session import OutFlight, Session

log = logging.getLogger("shoal.persist")

STORE_COMMIT_TIMEOUT = 10.0  # seconds; a disk this slow is treated as failed for an ack

#: the changes ``tap`` is given (the store's mutations, with the message body as bytes):
#:   ("s", client_id, meta)                 session record without messages, replaced
#:   ("m", client_id, key, entry, body)     a message added (body: packed message record)
#:   ("u", client_id, key, entry)           a message's entry changed (sent, PUBREC'd)
#:   ("r", client_id, key)                  a message removed
#:   ("i", client_id, pid, add)             an incoming QoS 2 packet id added / removed
#:   ("d", client_id)                       the session deleted
OPS = ("s", "m", "u", "r", "i", "d")


class SessionJournal:
    __slots__ = ("store", "writes", "tap", "tap_wait")

    def __init__(self, store) -> None:
        self.store = store
        self.writes = 0  # changes written, ever
        self.tap = None       # called with each change (OPS), when set
        self.tap_wait = None  # -> a future done once every change tapped so far is safe

    # -- which sessions ------------------------------------------------------------------

    @staticmethod
    def wanted(session: Session) -> bool:
        return session.expiry_interval > 0

    def track(self, session: Session) -> None:
        """Store the whole session (it became persistent, or arrived from another node)."""
        session.journal = self
        store = self.store
        meta = session_meta(session)
        store.put_session(session.client_id, meta)
        if self.tap is not None:
            self.tap(("s", session.client_id, meta))
        for pid, e in session.inflight_out.items():
            e.key = 0
            self.sent(session, pid, e)
        queue = session.queue
        for i, (msg, qos, retain, sub_ids, _) in enumerate(queue):
            key = self.queued(session, msg, qos, retain, sub_ids) if qos else 0
            queue[i] = (msg, qos, retain, sub_ids, key)
        for pid in session.inflight_in:
            store.add_incoming(session.client_id, pid)
            if self.tap is not None:
                self.tap(("i", session.client_id, pid, True))
        self.writes += 1

    @staticmethod
    def changes_of(session: Session) -> list[tuple]:
        """The whole stored state of a tracked session as ``tap`` changes, oldest key
        first (a replica seeded from scratch: after a ("d", client_id))."""
        cid = session.client_id
        out: list[tuple] = [("s", cid, session_meta(session))]
        msgs = []
        for pid, e in session.inflight_out.items():
            if e.key:
                msgs.append((e.key, [e.qos, e.retain, list(e.sub_ids) if e.sub_ids else None,
                                     pid, e.stage], e.msg))
        for msg, qos, retain, sub_ids, key in session.queue:
            if key:
                msgs.append((key, [qos, retain, list(sub_ids) if sub_ids else None, 0, 0],
                             msg))
        msgs.sort(key=lambda m: m[0])
        for key, entry, msg in msgs:
            out.append(("m", cid, key, entry, _body(msg)))
        for pid in sorted(session.inflight_in):
            out.append(("i", cid, pid, True))
        return out

    def forget(self, session: Session) -> None:
        """The session ended here, or is no longer persistent: delete its records."""
        session.journal = None
        for e in session.inflight_out.values():
            e.key = 0
        queue = session.queue
        for i, item in enumerate(queue):
            if item[4]:
                queue[i] = item[:4] + (0,)
        self.store.delete_session(session.client_id)
        if self.tap is not None:
            self.tap(("d", session.client_id))
        self.writes += 1

    def meta(self, session: Session) -> None:
        """Expiry, will or subscriptions changed."""
        meta = session_meta(session)
        self.store.put_session(session.client_id, meta)
        if self.tap is not None:
            self.tap(("s", session.client_id, meta))
        self.writes += 1

    # -- messages ------------------------------------------------------------------------

    def _ref(self, msg: Message):
        ref = msg.store_ref
        if ref is None:
            ref = msg.store_ref = self.store.message_ref(pack(message_to_record(msg)))
        return ref

    def queued(self, session: Session, msg: Message, qos: int, retain: bool, sub_ids) -> int:
        key = session.seq
        session.seq = key + 1
        entry = [qos, retain, list(sub_ids) if sub_ids else None, 0, 0]
        ref = self._ref(msg)
        self.store.put_message(session.client_id, key, entry, ref)
        if self.tap is not None:
            self.tap(("m", session.client_id, key, entry, ref.record))
        self.writes += 1
        return key

    def sent(self, session: Session, pid: int, e: OutFlight) -> None:
        """``e`` is inflight under ``pid`` (new, from the queue, or PUBREC'd: stage 1)."""
        entry = [e.qos, e.retain, list(e.sub_ids) if e.sub_ids else None, pid, e.stage]
        if e.key:
            self.store.update_message(session.client_id, e.key, entry)
            if self.tap is not None:
                self.tap(("u", session.client_id, e.key, entry))
        else:
            key = e.key = session.seq
            session.seq = key + 1
            ref = self._ref(e.msg)
            self.store.put_message(session.client_id, key, entry, ref)
            if self.tap is not None:
                self.tap(("m", session.client_id, key, entry, ref.record))
        self.writes += 1

    def remove(self, session: Session, key: int) -> None:
        self.store.remove_message(session.client_id, key)
        if self.tap is not None:
            self.tap(("r", session.client_id, key))
        self.writes += 1

    def incoming(self, session: Session, pid: int, add: bool) -> None:
        if add:
            self.store.add_incoming(session.client_id, pid)
        else:
            self.store.remove_incoming(session.client_id, pid)
        if self.tap is not None:
            self.tap(("i", session.client_id, pid, add))
        self.writes += 1

    def retained(self, topic: str, msg: Message | None) -> None:
        self.store.put_retained(topic, None if msg is None else pack(message_to_record(msg)))
        self.writes += 1

    def commit_wait(self):
        """A future done when everything written so far is durable, or None when nothing
        needs waiting for (all durable already, or the fast durability mode). A failed
        store fails the future: the acknowledgement waiting for it is never sent. With
        replicas (``tap_wait``), done once they have committed too."""
        local = self.store.durable_future()
        if self.tap_wait is None:
            return local
        return self.tap_wait(local)

    # -- start -----------------------------------------------------------------------------

    def restore(self, loaded, limits, counters, now: float) -> list[tuple[Session, list]]:
        """Sessions from the store, as they were at the crash (OFFLINE, keys and inflight
        state restored, messages whose expiry passed while the node was down removed), and
        each one's subscription records. Unreadable records are reported and skipped."""
        sessions = []
        store = self.store
        expired = 0
        for cid, data in loaded.sessions.items():
            try:
                session, subs = session_from_record(data.meta, limits, counters)
            except RecordError as err:
                log.error("stored session %r unreadable, skipped: %s", cid, err)
                continue
            session.journal = self
            inflight, queue = session.inflight_out, session.queue
            for key in sorted(data.messages):
                stored = data.messages[key]
                try:
                    qos, retain, sub_ids, pid, stage = stored.entry
                    msg = message_from_record(unpack(stored.ref.record))
                except (TypeError, ValueError, RecordError) as err:
                    log.error("stored message %d of session %r unreadable, removed: %s",
                              key, cid, err)
                    store.remove_message(cid, key)
                    continue
                msg.store_ref = stored.ref
                session.seq = key + 1
                if pid:
                    e = inflight[pid] = OutFlight(msg, qos, retain, sub_ids_in(sub_ids), key)
                    e.stage = stage
                elif msg.expires_at is not None and now >= msg.expires_at:
                    store.remove_message(cid, key)
                    expired += 1
                else:
                    queue.append((msg, qos, retain, sub_ids_in(sub_ids), key))
            session.inflight_in = set(data.incoming)
            session.count_queue_bytes()
            sessions.append((session, subs))
        if expired:
            counters.expired_messages += expired
            log.info("store: %d queued message(s) expired while the node was down", expired)
        return sessions


def _body(msg: Message) -> bytes:
    ref = msg.store_ref
    return ref.record if ref is not None else pack(message_to_record(msg))


def record_from_changes(meta: dict, messages, incoming) -> dict:
    """A session record (node/session/record.py) from what a replica stored: ``meta``,
    ``messages`` as (key, entry, packed body) in key order, ``incoming`` packet ids. The
    messages whose packet id is set are inflight (re-sent with DUP / PUBREL at the next
    connection), the others queued. Raises RecordError for a body that cannot be read."""
    record = dict(meta)
    inflight, queue = [], []
    for _key, (qos, retain, sub_ids, pid, stage), body in messages:
        try:
            m = unpack(body)
        except (TypeError, ValueError) as err:
            raise RecordError(f"message body unreadable: {err}") from err
        if pid:
            inflight.append([pid, m, qos, retain, sub_ids, stage])
        else:
            queue.append([m, qos, retain, sub_ids])
    record["inflight_out"] = inflight
    record["queue"] = queue
    record["inflight_in"] = sorted(incoming)
    return record


def resume_clocks(session: Session, now: float) -> None:
    """Expiry and will of a session loaded at start. One that was connected when the node
    went down lost its connection then: its expiry starts now, and its will (if any) is
    due after its delay, as for any connection that ends without DISCONNECT. One that was
    offline keeps its wall-clock deadlines (``time.time()``): time spent down counts."""
    if session.will is not None and session.will_at is None:  # connected at the crash
        session.will_at = now + min(session.will_delay, session.expiry_interval)
    if session.expires_at is None and session.expiry_interval != EXPIRY_NEVER:
        session.expires_at = now + session.expiry_interval
