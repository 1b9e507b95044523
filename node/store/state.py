"""What the store holds, in memory: the live state every record is applied to.

One ``LiveState`` is updated by the store's mutation methods as they are called and by
recovery as it replays records: both go through the same methods, so what a reopened
store holds is what the running one held. Message bodies are kept once, with the number
of messages that reference them (Mosquitto's ref-counted msg store); a body nobody
references any more is forgotten at once and its bytes on disk go at the next compaction.

Objects handed to the store (meta dicts, entry lists, body records) are kept by
reference and written to the next snapshot: treat them as frozen once handed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .format import Op


class MessageRef:
    """A message body the store keeps once, however many sessions queue it."""

    __slots__ = ("id", "record")

    def __init__(self, id: int, record: bytes) -> None:
        self.id = id
        self.record = record

    def __repr__(self) -> str:
        return f"MessageRef({self.id}, {len(self.record)}B)"


class StoredMessage(NamedTuple):
    entry: list
    ref: MessageRef


@dataclass
class SessionData:
    meta: dict
    messages: dict[int, StoredMessage] = field(default_factory=dict)  # in key order
    incoming: set[int] = field(default_factory=set)


@dataclass
class LoadedState:
    sessions: dict[str, SessionData]
    retained: dict[str, bytes]


class _Session:
    __slots__ = ("meta", "meta_size", "messages", "incoming")

    def __init__(self, meta, meta_size: int) -> None:
        self.meta = meta
        self.meta_size = meta_size
        self.messages: dict[int, tuple] = {}  # key -> (entry, body_id, size); never mutated
        self.incoming: set[int] = set()


#: Bytes a QoS 2 incoming packet id costs in a snapshot, besides its client id.
_INCOMING_SIZE = 16


class LiveState:
    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.bodies: dict[int, list] = {}  # body_id -> [record, references, size]
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.live_bytes = 0  # what a snapshot of this state would take, about
        self.messages = 0
        self.incoming = 0

    # --- mutations (return False when the record refers to something unknown) ---

    def put_session(self, cid: str, meta, size: int) -> None:
        s = self.sessions.get(cid)
        if s is None:
            self.sessions[cid] = _Session(meta, size)
            self.live_bytes += size
        else:
            self.live_bytes += size - s.meta_size
            s.meta, s.meta_size = meta, size

    def drop_session(self, cid: str) -> None:
        s = self.sessions.pop(cid, None)
        if s is None:
            return
        self.live_bytes -= s.meta_size + len(s.incoming) * (_INCOMING_SIZE + len(cid))
        self.incoming -= len(s.incoming)
        for _entry, bid, size in s.messages.values():
            self.live_bytes -= size
            self._unref(bid)
        self.messages -= len(s.messages)

    def put_body(self, bid: int, record: bytes, size: int) -> None:
        b = self.bodies.get(bid)
        if b is None:
            self.bodies[bid] = [record, 0, size]
            self.live_bytes += size

    def put_message(self, cid: str, key: int, entry, bid: int, size: int) -> bool:
        s = self.sessions.get(cid)
        b = self.bodies.get(bid)
        if s is None or b is None:
            return False
        b[1] += 1
        old = s.messages.get(key)
        if old is not None:
            self.live_bytes -= old[2]
            self._unref(old[1])
        else:
            self.messages += 1
        s.messages[key] = (entry, bid, size)
        self.live_bytes += size
        return True

    def update_message(self, cid: str, key: int, entry, size: int) -> bool:
        s = self.sessions.get(cid)
        old = s.messages.get(key) if s is not None else None
        if old is None:
            return False
        size += 4  # the body id an UPDATE record does not carry
        s.messages[key] = (entry, old[1], size)
        self.live_bytes += size - old[2]
        return True

    def remove_message(self, cid: str, key: int) -> None:
        s = self.sessions.get(cid)
        old = s.messages.pop(key, None) if s is not None else None
        if old is not None:
            self.messages -= 1
            self.live_bytes -= old[2]
            self._unref(old[1])

    def add_incoming(self, cid: str, pid: int) -> bool:
        s = self.sessions.get(cid)
        if s is None:
            return False
        if pid not in s.incoming:
            s.incoming.add(pid)
            self.incoming += 1
            self.live_bytes += _INCOMING_SIZE + len(cid)
        return True

    def remove_incoming(self, cid: str, pid: int) -> None:
        s = self.sessions.get(cid)
        if s is not None and pid in s.incoming:
            s.incoming.discard(pid)
            self.incoming -= 1
            self.live_bytes -= _INCOMING_SIZE + len(cid)

    def put_retained(self, topic: str, record: bytes | None, size: int) -> None:
        old = self.retained.pop(topic, None)
        if old is not None:
            self.live_bytes -= old[1]
        if record is not None:
            self.retained[topic] = (record, size)
            self.live_bytes += size

    def _unref(self, bid: int) -> None:
        b = self.bodies[bid]
        b[1] -= 1
        if b[1] == 0:
            del self.bodies[bid]
            self.live_bytes -= b[2]

    # --- replay ---

    def apply(self, rec: list, size: int) -> bool:
        """Apply one decoded record (recovery). False when it refers to a session, message
        or body that is not there, which only damage can cause; raises ``ValueError`` /
        ``TypeError`` / ``IndexError`` for a record of the wrong shape."""
        op = rec[0]
        if op == Op.MESSAGE:
            _, cid, key, entry, bid = rec
            return self.put_message(cid, key, entry, bid, size)
        if op == Op.REMOVE:
            _, cid, key = rec
            self.remove_message(cid, key)
            return True
        if op == Op.BODY:
            _, bid, record = rec
            self.put_body(bid, record, size)
            return True
        if op == Op.UPDATE:
            _, cid, key, entry = rec
            return self.update_message(cid, key, entry, size)
        if op == Op.SESSION:
            _, cid, meta = rec
            self.put_session(cid, meta, size)
            return True
        if op == Op.DROP_SESSION:
            _, cid = rec
            self.drop_session(cid)
            return True
        if op == Op.IN_ADD:
            _, cid, pid = rec
            return self.add_incoming(cid, pid)
        if op == Op.IN_REMOVE:
            _, cid, pid = rec
            self.remove_incoming(cid, pid)
            return True
        if op == Op.RETAIN:
            _, topic, record = rec
            self.put_retained(topic, record, size)
            return True
        raise ValueError(f"unknown record type {op!r}")

    def drop_unreferenced_bodies(self) -> int:
        """After replay: bodies whose messages were lost to a torn tail."""
        dead = [bid for bid, b in self.bodies.items() if b[1] == 0]
        for bid in dead:
            self.live_bytes -= self.bodies.pop(bid)[2]
        return len(dead)

    # --- views ---

    def record_count(self) -> int:
        return (len(self.sessions) + self.messages + self.incoming + len(self.bodies)
                + len(self.retained))

    def freeze(self) -> tuple:
        """A consistent copy of the live state for a snapshot written in another thread
        while this one keeps changing: shallow copies, O(live) but no encoding."""
        return (
            [(t, r) for t, (r, _size) in self.retained.items()],
            [(bid, b[0]) for bid, b in self.bodies.items()],
            [(cid, s.meta, tuple(s.incoming), list(s.messages.items()))
             for cid, s in self.sessions.items()],
        )

    def session_data(self, client_id: str) -> SessionData | None:
        """One session as ``loaded`` gives it (messages in key order), or None."""
        s = self.sessions.get(client_id)
        if s is None:
            return None
        bodies = self.bodies
        return SessionData(s.meta, {k: StoredMessage(e, MessageRef(bid, bodies[bid][0]))
                                    for k, (e, bid, _sz) in sorted(s.messages.items())},
                           set(s.incoming))

    def loaded(self) -> LoadedState:
        refs = {bid: MessageRef(bid, b[0]) for bid, b in self.bodies.items()}
        sessions = {}
        for cid, s in self.sessions.items():
            items = s.messages.items()
            keys = list(s.messages)
            if any(a > b for a, b in zip(keys, keys[1:])):
                items = sorted(items)
                # keep the live mirror in key order too, so snapshots are written sorted
                s.messages = dict(items)
            sessions[cid] = SessionData(
                s.meta, {k: StoredMessage(e, refs[bid]) for k, (e, bid, _sz) in items},
                set(s.incoming))
        return LoadedState(sessions, {t: r for t, (r, _s) in self.retained.items()})
