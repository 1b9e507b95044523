"""Session state and its delivery rules.

A ``Session`` is not a connection (STYLE.md, Mosquitto's lesson): it lives from the
first CONNECT with its ClientID until it ends (clean start, expiry), and a connection
attaches to it and detaches from it. It owns, for one ClientID:

* ``subscriptions``: filter -> ``SubEntry`` (the tree holds the same entries for matching);
* ``inflight_out``: packet id -> ``OutFlight`` (QoS 1/2 sent, not yet acknowledged), in
  send order, at most ``window`` of them;
* ``queue``: messages waiting for a window slot, a writable socket or a connection,
  bounded by ``max_queue`` with the drop policy of ``_enqueue``: items
  ``(msg, qos, retain, sub_ids, key)``;
* ``inflight_in``: packet ids of QoS 2 messages received and PUBREC'd, awaiting PUBREL;
* will, expiry.

``deliver()`` (our ``db__message_insert``) alone decides send now / queue / drop.

A persistent session on a node with a store has a ``journal`` (node/persist.py): every
QoS 1/2 message it queues or sends gets a ``key`` (the session's increasing counter, 0 =
not stored) and each change of it (sent with a packet id, PUBREC'd, acknowledged,
dropped) is told to the journal, which writes it to the store.
"""

from __future__ import annotations

import collections
import enum
import logging
import time

log = logging.getLogger("shoal.session")


class SessionState(enum.Enum):
    ONLINE = "online"      # a connection is attached
    OFFLINE = "offline"    # kept for its expiry interval, queuing
    FROZEN = "frozen"      # claimed by another node: no delivery, appends continue (cluster)
    HANDING_OVER = "handing_over"  # snapshot streaming to the new owner (cluster)
    ENDED = "ended"        # discarded; must not be used again


class Trigger(enum.Enum):
    ATTACHED = "attached"
    DETACHED = "detached"
    CLAIMED = "claimed"
    SNAPSHOT_ASKED = "snapshot_asked"
    RECLAIMED = "reclaimed"
    HANDED_BACK = "handed_back"
    ENDED = "ended"


S, T = SessionState, Trigger
#: The only transitions a session can make; anything else is a bug and raises.
TRANSITIONS: dict[tuple[SessionState, Trigger], SessionState] = {
    (S.OFFLINE, T.ATTACHED): S.ONLINE,
    (S.ONLINE, T.ATTACHED): S.ONLINE,  # takeover by a new connection of the same client
    (S.ONLINE, T.DETACHED): S.OFFLINE,
    (S.ONLINE, T.CLAIMED): S.FROZEN,
    (S.OFFLINE, T.CLAIMED): S.FROZEN,
    (S.FROZEN, T.SNAPSHOT_ASKED): S.HANDING_OVER,
    (S.FROZEN, T.RECLAIMED): S.OFFLINE,  # the claim that froze it was given up or lost
    # the node it was handed to never became its holder (its move was not committed) and
    # a newer claim asks for it: frozen again, to be handed over once more
    (S.HANDING_OVER, T.HANDED_BACK): S.FROZEN,
    (S.ONLINE, T.ENDED): S.ENDED,
    (S.OFFLINE, T.ENDED): S.ENDED,
    (S.FROZEN, T.ENDED): S.ENDED,
    (S.HANDING_OVER, T.ENDED): S.ENDED,
}
del S, T


class OutFlight:
    """A QoS 1/2 message sent to the client and not yet fully acknowledged."""

    __slots__ = ("msg", "qos", "retain", "sub_ids", "stage", "key")

    def __init__(self, msg, qos: int, retain: bool, sub_ids, key: int = 0) -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.stage = 0  # 0: PUBLISH sent (await PUBACK/PUBREC); 1: PUBREL sent (await PUBCOMP)
        self.key = key  # the message's key in the store (0: not stored)


class Counters:
    """Node-wide message counters, shared by the broker and its sessions."""

    __slots__ = ("messages_in", "messages_out", "dropped_messages", "expired_messages",
                 "qos0_offline_discarded", "messages_in_qos1", "messages_in_qos2",
                 "messages_out_qos1", "messages_out_qos2", "publishes_refused",
                 "subscriptions_refused", "deliveries_refused", "output_overflows",
                 "retained_refused")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        # by QoS where the QoS is known anyway (QoS 0 = the total minus these): /metrics
        self.messages_in_qos1 = 0
        self.messages_in_qos2 = 0
        self.messages_out_qos1 = 0
        self.messages_out_qos2 = 0
        self.dropped_messages = 0
        self.expired_messages = 0
        self.qos0_offline_discarded = 0
        self.publishes_refused = 0  # (to a server topic: $SYS/..., or denied by the ACL)
        self.subscriptions_refused = 0  # (denied by the ACL)
        self.deliveries_refused = 0  # (messages an ACL deny rule kept from a subscriber)
        self.output_overflows = 0  # connections closed past max_output_buffer
        self.retained_refused = 0  # retained PUBLISHes past max_retained(_bytes)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class SessionLimits:
    __slots__ = ("max_inflight", "max_queue", "queue_qos0_offline", "read_check",
                 "max_queue_bytes", "queue_bytes_cap")

    def __init__(self, max_inflight: int, max_queue: int, queue_qos0_offline: bool,
                 max_queue_bytes: int = 0) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes  # 0: no byte cap
        self.queue_bytes_cap = max_queue_bytes or 1 << 62  # (one comparison either way)
        self.queue_qos0_offline = queue_qos0_offline
        # read_check(session, topic) -> bool: may a message on topic be delivered to the
        # session? Set by the broker while its ACL has deny rules; None otherwise
        self.read_check = None


class Session:
    __slots__ = (
        "client_id", "state", "client", "subscriptions", "inflight_out", "queue", "queued_qos0",
        "inflight_in", "window", "limits", "counters", "next_pid", "expiry_interval",
        "expires_at", "will", "will_delay", "will_at", "version", "dropping", "created_at",
        "timer_gen", "epoch", "gate", "journal", "seq", "handover", "username", "rights",
        "queue_bytes",
        "__weakref__",
    )

    def __init__(self, client_id: str, limits: SessionLimits, counters: Counters) -> None:
        self.client_id = client_id
        self.state = SessionState.OFFLINE
        self.client = None  # the attached connection (node.server.MqttProtocol) or None
        self.subscriptions: dict = {}
        self.inflight_out: dict[int, OutFlight] = {}
        self.queue: collections.deque = collections.deque()  # (msg, qos, retain, sub_ids)
        self.queued_qos0 = 0
        self.queue_bytes = 0  # payload and topic bytes of the queued messages (max_queue_bytes)
        self.inflight_in: set[int] = set()
        self.limits = limits
        self.window = limits.max_inflight
        self.counters = counters
        self.next_pid = 1
        self.expiry_interval = 0  # seconds the session outlives its connection
        self.expires_at: float | None = None
        self.will = None  # packets.Will of the current connection
        self.will_delay = 0
        self.will_at: float | None = None  # a will waiting for its delay to pass
        self.version = 4
        self.dropping = False
        self.created_at = time.time()
        self.timer_gen = 0  # bumps on every attach/detach: stale timer entries are ignored
        self.epoch = 0  # ownership epoch (cluster fencing token)
        # While a session moves between nodes, the cluster decides per message what
        # happens (append for the new owner, hold, drop): gate(session, msg, qos, retain,
        # sub_ids) replaces deliver(). None the rest of the time.
        self.gate = None
        self.journal = None  # node.persist.SessionJournal while the session is stored
        self.seq = 1  # the next message key in the store
        # The cluster's record of this session's hand-overs (cluster/marks.py gives it its
        # shape): a plain dict stored with the session, or None. Opaque here.
        self.handover: dict | None = None
        # the login of the client that opened or last resumed it (None: anonymous): what
        # the ACL and the ClientID binding use; stored and handed over with the session
        self.username: str | None = None
        self.rights = None  # its compiled ACL rules (node/acl.py Acl.rights_of), a cache

    # -- state ---------------------------------------------------------------------------

    def _transition(self, trigger: Trigger, why: str = "") -> None:
        new = TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise RuntimeError(f"session {self.client_id!r}: {trigger.value} not allowed in "
                               f"state {self.state.value}")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session transition client_id=%s %s -> %s trigger=%s %s", self.client_id,
                      self.state.value, new.value, trigger.value, why)
        self.state = new

    def attach(self, client, receive_maximum: int) -> None:
        """A connection takes this session: re-send what is inflight, then the queue."""
        self._transition(Trigger.ATTACHED)
        self.client = client
        self.timer_gen += 1
        self.expires_at = None
        self.window = min(self.limits.max_inflight, receive_maximum)
        # [MQTT-4.4.0-1]: re-send unacknowledged PUBLISH (DUP) and PUBREL, original ids.
        journal = self.journal
        wait = journal.commit_wait() if journal is not None and self.inflight_out else None
        if wait is not None and not wait.done():
            # the inflight records may still be on their way to the disk and the
            # replicas (a session just installed or changed): a packet id leaves only once
            # they are there, as at its first send (a copy promoted without it would send
            # the message again under another id). New messages wait behind the re-sends.
            window, self.window = self.window, 0
            gen = self.timer_gen

            def resume(done) -> None:
                if self.client is not client or self.timer_gen != gen or \
                        done.cancelled() or done.exception() is not None:
                    return  # (detached meanwhile; a failed store stops the node)
                self.window = window
                self._resend(client)
                self.pump()
            wait.add_done_callback(resume)
            return
        self._resend(client)
        self.pump()

    def _resend(self, client) -> None:
        now = time.time()
        for pid, e in self.inflight_out.items():
            if e.stage == 0:
                frame = client.publish_frame(e.msg, e.qos, e.retain, True, pid, e.sub_ids, now)
                if frame is not None:
                    client.write(frame)
            else:
                client.write_pubrel(pid)

    def detach(self, why: str) -> None:
        self._transition(Trigger.DETACHED, why)
        self.client = None
        self.timer_gen += 1

    def freeze(self, why: str) -> None:
        """Claimed by another node: no more deliveries from here (messages append)."""
        self._transition(Trigger.CLAIMED, why)
        self.timer_gen += 1

    def unfreeze(self, why: str) -> None:
        self._transition(Trigger.RECLAIMED, why)
        self.timer_gen += 1

    def hand_over(self, why: str) -> None:
        self._transition(Trigger.SNAPSHOT_ASKED, why)

    def hand_back(self, why: str) -> None:
        self._transition(Trigger.HANDED_BACK, why)

    def end(self, why: str) -> None:
        self._transition(Trigger.ENDED, why)
        self.client = None
        self.timer_gen += 1
        self.queue.clear()
        self.queue_bytes = 0
        self.inflight_out.clear()
        if self.journal is not None:
            self.journal.forget(self)

    # -- outgoing messages -----------------------------------------------------------------

    def deliver(self, msg, qos: int, retain: bool, sub_ids) -> None:
        read_check = self.limits.read_check
        if read_check is not None and not read_check(self, msg.topic):
            return  # (an ACL deny rule: node/acl.py)
        if self.gate is not None:
            self.gate(self, msg, qos, retain, sub_ids)
            return
        self.admit(msg, qos, retain, sub_ids)

    def admit(self, msg, qos: int, retain: bool, sub_ids) -> int:
        """Send now, queue or drop (the gate's way in, too). Returns the store key of the
        message when it was queued in a stored session, else 0."""
        client = self.client
        if client is not None and client.writable and not self.queue:
            if qos == 0:
                frame = client.publish_frame(msg, 0, retain, False, 0, sub_ids, None)
                if frame is not None:
                    client.write(frame)
                    self.counters.messages_out += 1
                return 0
            if len(self.inflight_out) < self.window:
                self._send_new(client, msg, qos, retain, sub_ids, None, 0)
                return 0
        return self._enqueue(msg, qos, retain, sub_ids)

    def _send_new(self, client, msg, qos, retain, sub_ids, now, key: int) -> None:
        pid = self._allocate_pid()
        frame = client.publish_frame(msg, qos, retain, False, pid, sub_ids, now)
        journal = self.journal
        if frame is None:
            # larger than the client's Maximum Packet Size: discarded [MQTT-3.1.2-25]
            if key:
                journal.remove(self, key)
            return
        e = self.inflight_out[pid] = OutFlight(msg, qos, retain, sub_ids, key)
        if journal is None:
            client.write(frame)
        else:
            journal.sent(self, pid, e)
            if qos == 2:
                # Exactly once across a crash: the packet id goes to disk before the
                # PUBLISH leaves. A restart would otherwise send the message again under
                # a new id, and the client would deliver it twice [MQTT-4.3.3].
                client.write_after(journal.commit_wait(), frame)
            else:
                client.write(frame)
        counters = self.counters
        counters.messages_out += 1
        if qos == 1:
            counters.messages_out_qos1 += 1
        else:
            counters.messages_out_qos2 += 1

    def _allocate_pid(self) -> int:
        pid = self.next_pid
        inflight = self.inflight_out
        # the window is at most 65535, so a free id always exists
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        self.next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def _enqueue(self, msg, qos: int, retain: bool, sub_ids) -> int:
        if qos == 0 and self.client is None and not self.limits.queue_qos0_offline:
            self.counters.qos0_offline_discarded += 1
            return 0
        queue = self.queue
        limits = self.limits
        size = msg.size
        cap = limits.queue_bytes_cap
        while len(queue) >= limits.max_queue or self.queue_bytes + size > cap:
            if size > cap:
                self._dropped(1)  # (alone larger than the whole queue may be)
                return 0
            # Drop policy: the oldest QoS 0 message (the new one counts as the newest),
            # else the oldest message. A new QoS 0 message with no older QoS 0 queued is
            # itself the oldest QoS 0, so it is the one dropped.
            if self.queued_qos0:
                if queue[0][1] == 0:
                    gone = queue.popleft()
                else:
                    for i, item in enumerate(queue):
                        if item[1] == 0:
                            gone = item
                            del queue[i]
                            break
                self.queued_qos0 -= 1
            elif qos == 0:
                self._dropped(1)
                return 0
            else:
                gone = queue.popleft()
                if gone[4]:
                    self.journal.remove(self, gone[4])
            self.queue_bytes -= gone[0].size
            self._dropped(1)
        key = 0
        if qos and self.journal is not None:
            key = self.journal.queued(self, msg, qos, retain, sub_ids)
        queue.append((msg, qos, retain, sub_ids, key))
        self.queue_bytes += size
        if qos == 0:
            self.queued_qos0 += 1
        return key

    def count_queue_bytes(self) -> None:
        """``queue_bytes`` from the queue itself (after it was filled or rebuilt whole)."""
        self.queue_bytes = sum(item[0].size for item in self.queue)

    def _dropped(self, n: int) -> None:
        self.counters.dropped_messages += n
        if not self.dropping:
            self.dropping = True  # log once per episode (Mosquitto's is_dropping)
            log.warning("queue full, dropping messages client_id=%s max_queue=%d",
                        self.client_id, self.limits.max_queue)

    def pump(self) -> None:
        """Move queued messages to the client while it is writable and the window allows."""
        client = self.client
        queue = self.queue
        if client is None or not queue:
            return
        now = time.time()
        inflight = self.inflight_out
        counters = self.counters
        if self.dropping and len(queue) < self.limits.max_queue // 2:
            self.dropping = False  # the episode is over: the next drop logs again
        while queue and client.writable:
            msg, qos, retain, sub_ids, key = queue[0]
            if qos and len(inflight) >= self.window:
                break
            queue.popleft()
            self.queue_bytes -= msg.size
            if qos == 0:
                self.queued_qos0 -= 1
            if msg.expires_at is not None and now >= msg.expires_at:
                counters.expired_messages += 1
                if key:
                    self.journal.remove(self, key)
                continue
            if qos == 0:
                frame = client.publish_frame(msg, 0, retain, False, 0, sub_ids, now)
                if frame is not None:
                    client.write(frame)
                    counters.messages_out += 1
            else:
                self._send_new(client, msg, qos, retain, sub_ids, now, key)

    def drop_expired(self, now: float) -> int:
        """Remove queued messages whose Message Expiry passed."""
        before = len(self.queue)
        if not before:
            return 0
        kept = []
        journal = self.journal
        for item in self.queue:
            if item[0].expires_at is None or now < item[0].expires_at:
                kept.append(item)
            elif item[4]:
                journal.remove(self, item[4])
        removed = before - len(kept)
        if removed:
            self.queue = collections.deque(kept)
            self.queued_qos0 = sum(1 for item in kept if item[1] == 0)
            self.count_queue_bytes()
            self.counters.expired_messages += removed
        return removed

    # -- acknowledgements from the client ------------------------------------------------

    def on_puback(self, pid: int) -> bool:
        e = self.inflight_out.get(pid)
        if e is None or e.qos != 1:
            return False
        del self.inflight_out[pid]
        if e.key:
            self.journal.remove(self, e.key)
        if self.queue:
            self.pump()
        return True

    def on_pubrec(self, pid: int, reason: int) -> bool | None:
        """True: send PUBREL; None: the flow ended (error reason); False: unknown id."""
        e = self.inflight_out.get(pid)
        if e is None or e.qos != 2:
            return False
        if reason >= 0x80:
            del self.inflight_out[pid]
            if e.key:
                self.journal.remove(self, e.key)
            self.pump()
            return None
        if e.stage == 0:
            e.stage = 1
            if e.key:
                self.journal.sent(self, pid, e)
        return True

    def on_pubcomp(self, pid: int) -> bool:
        e = self.inflight_out.get(pid)
        if e is None or e.stage != 1:
            return False
        del self.inflight_out[pid]
        if e.key:
            self.journal.remove(self, e.key)
        if self.queue:
            self.pump()
        return True

    def __repr__(self) -> str:
        return (f"Session({self.client_id!r}, {self.state.value}, subs={len(self.subscriptions)},"
                f" inflight={len(self.inflight_out)}, queued={len(self.queue)})")
