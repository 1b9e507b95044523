"""Typed node-to-node messages of the session hand-over.

Each is a dataclass with its wire ``kind`` (the string the transport carries) and a
plain-dict body (msgpack). ``decode(kind, body)`` turns a received body back into its
dataclass through one table, ``KINDS``; cluster/member.py dispatches received messages
by type. Forwarded PUBLISH batches keep their compact encoding (cluster/wire.py).

    SnapshotRequest  B -> A  request: the session of ``client_id`` at ``epoch``
    SnapChunk        A -> B  one chunk of a long queue, sent before the answer
    Barrier          P -> A, B  P applied ``moved``: its forwards from now on use the new routes
    Switched         P -> all   P's table was replaced by a Raft snapshot: a barrier for every move
    LateBatch        A -> B  request: what ``source`` forwarded to A with the old routes
    Adopt            leaving node -> member  request: take these offline sessions over
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

__all__ = ["SnapshotRequest", "SnapChunk", "Barrier", "Switched", "LateBatch", "Adopt",
           "KINDS", "encode", "decode", "MalformedMessage", "RESTART"]


class MalformedMessage(ValueError):
    pass


@dataclass(frozen=True)
class SnapshotRequest:
    kind = "snapshot"
    client_id: str
    epoch: int


@dataclass(frozen=True)
class SnapChunk:
    kind = "snap_chunk"
    client_id: str
    epoch: int
    i: int
    items: list


@dataclass(frozen=True)
class Barrier:
    kind = "barrier"
    client_id: str
    epoch: int


@dataclass(frozen=True)
class Switched:
    """``moves`` None: the sender routes with every move applied there (its table was
    replaced by a snapshot). Maps, sent when the sender sees the receiver restarted: the
    sessions the sender's table has at the receiver (``moves``) and, of the hand-overs
    the receiver's handshake says its restart resumed, those whose move the sender
    applied (``moved_from``), ClientID -> epoch: as good as its barriers for those moves,
    which the receiver's previous process may have taken. ``moved_from`` goes with a
    replaced table's switch too (a position cannot be compared with that of a move the
    session has made since)."""
    kind = "switched"
    moves: dict | None = None
    moved_from: dict | None = None
    #: with ``moves`` None: the sender's table position (routing.Tables.position): the
    #: moves applied at or before it are the ones it routes with
    position: int | None = None


@dataclass(frozen=True)
class LateBatch:
    """Late messages: items are ``[message record, qos, retain, sub_ids, store key on
    the old holder (0: not stored there)]``."""
    kind = "late"
    client_id: str
    epoch: int
    source: str  # the node that forwarded them (RESTART, "relay": see cluster/holder.py)
    messages: list
    hops: int = 0  # passed on by nodes the session had left (at most RELAY_HOPS)
    #: with source RESTART: the nodes whose late messages may still come, one batch each
    still_pending: list | None = None
    #: sent by a replica for this old holder, declared down (its copy's late messages)
    origin: str | None = None


#: the source of the batch a restarted old holder sends first: every late message its
#: store kept, whatever node forwarded it
RESTART = "restart"


@dataclass(frozen=True)
class Adopt:
    kind = "adopt"
    client_ids: list


#: wire kind -> message type
KINDS: dict[str, type] = {t.kind: t for t in (SnapshotRequest, SnapChunk, Barrier, Switched,
                                               LateBatch, Adopt)}


def encode(message) -> tuple[str, dict]:
    """(kind, body) for the transport."""
    return message.kind, asdict(message)


def decode(kind: str, body) -> object:
    """The typed message of a received (kind, body); ``MalformedMessage`` when the body
    does not fit (a peer of another version, or a bug)."""
    cls = KINDS[kind]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise MalformedMessage(f"{kind}: body is {type(body).__name__}, not a map")
    values = {}
    for f in fields(cls):
        if f.name in body:
            values[f.name] = body[f.name]
        elif f.default is MISSING:
            raise MalformedMessage(f"{kind}: missing {f.name!r}")
    return cls(**values)
