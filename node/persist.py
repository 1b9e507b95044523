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


class SessionJournal:
    __slots__ = ("store", "writes")

    def __init__(self, store) -> None:
        self.store = store
        self.writes = 0  # changes written, ever

    # -- which sessions ------------------------------------------------------------------

    @staticmethod
    def wanted(session: Session) -> bool:
        return session.expiry_interval > 0

    def track(self, session: Session) -> None:
        """Store the whole session (it became persistent, or arrived from another node)."""
        session.journal = self
        store = self.store
        store.put_session(session.client_id, session_meta(session))
        for pid, e in session.inflight_out.items():
            e.key = 0
            self.sent(session, pid, e)
        queue = session.queue
        for i, (msg, qos, retain, sub_ids, _) in enumerate(queue):
            key = self.queued(session, msg, qos, retain, sub_ids) if qos else 0
            queue[i] = (msg, qos, retain, sub_ids, key)
        for pid in session.inflight_in:
            store.add_incoming(session.client_id, pid)
        self.writes += 1

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
        self.writes += 1

    def meta(self, session: Session) -> None:
        """Expiry, will or subscriptions changed."""
        self.store.put_session(session.client_id, session_meta(session))
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
        self.store.put_message(session.client_id, key,
                               [qos, retain, list(sub_ids) if sub_ids else None, 0, 0],
                               self._ref(msg))
        self.writes += 1
        return key

    def sent(self, session: Session, pid: int, e: OutFlight) -> None:
        """``e`` is inflight under ``pid`` (new, from the queue, or PUBREC'd: stage 1)."""
        entry = [e.qos, e.retain, list(e.sub_ids) if e.sub_ids else None, pid, e.stage]
        if e.key:
            self.store.update_message(session.client_id, e.key, entry)
        else:
            key = e.key = session.seq
            session.seq = key + 1
            self.store.put_message(session.client_id, key, entry, self._ref(e.msg))
        self.writes += 1

    def remove(self, session: Session, key: int) -> None:
        self.store.remove_message(session.client_id, key)
        self.writes += 1

    def incoming(self, session: Session, pid: int, add: bool) -> None:
        if add:
            self.store.add_incoming(session.client_id, pid)
        else:
            self.store.remove_incoming(session.client_id, pid)
        self.writes += 1

    def retained(self, topic: str, msg: Message | None) -> None:
        self.store.put_retained(topic, None if msg is None else pack(message_to_record(msg)))
        self.writes += 1

    def commit_wait(self):
        """A future done when everything written so far is durable, or None when nothing
        needs waiting for (all durable already, or the fast durability mode). A failed
        store fails the future: the acknowledgement waiting for it is never sent."""
        return self.store.durable_future()

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
            sessions.append((session, subs))
        if expired:
            counters.expired_messages += expired
            log.info("store: %d queued message(s) expired while the node was down", expired)
        return sessions


def resume_clocks(session: Session, now: float) -> None:
    """Expiry and will of a session loaded at start. One that was connected when the node
    went down lost its connection then: its expiry starts now, and its will (if any) is
    due after its delay, as for any connection that ends without DISCONNECT. One that was
    offline keeps its wall-clock deadlines (``time.time()``): time spent down counts."""
    if session.will is not None and session.will_at is None:  # connected at the crash
        session.will_at = now + min(session.will_delay, session.expiry_interval)
    if session.expires_at is None and session.expiry_interval != EXPIRY_NEVER:
        session.expires_at = now + session.expiry_interval
