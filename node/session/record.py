"""The one msgpack record format of a session, used by the takeover snapshot (cluster)
and the durable store: plain lists and dicts, no pickles, versioned.

    session record = {"v": 1, "client_id", "expiry_interval", "expires_at", "version",
                      "next_pid", "epoch", "created_at", "subscriptions": [sub...],
                      "inflight_out": [[pid, msg, qos, retain, sub_ids, stage]...],
                      "queue": [[msg, qos, retain, sub_ids]...], "inflight_in": [pid...],
                      "will": will | None, "will_delay", "will_at",
                      "handover": the cluster's hand-over mark (cluster/marks.py) | None,
                      "user": the client's login | None (absent in older records)}
    (records of older versions have "handed" and "late_seen" instead of "handover": read
    into it)
    msg  = [topic, payload, qos, retain, properties | None, expires_at | None, origin]
    sub  = [topic_filter, qos, no_local, retain_as_published, retain_handling, sub_id,
            share_group]
    will = [topic, payload, qos, retain, properties]
"""

from __future__ import annotations

import msgpack

from ..mqtt.codes import PropertyId
from ..mqtt.packets import Will
from .message import Message
from .session import OutFlight, Session

RECORD_VERSION = 1
_USER = PropertyId.USER_PROPERTY
_SUB_ID = PropertyId.SUBSCRIPTION_IDENTIFIER


class RecordError(ValueError):
    """A record that cannot be read back (wrong version, wrong shape)."""


def props_out(props: dict | None):
    if not props:
        return None
    return {int(k): v for k, v in props.items()}


def props_in(raw) -> dict | None:
    if not raw:
        return None
    props = {}
    for k, v in raw.items():
        pid = PropertyId(k)
        if pid is _USER:
            v = [tuple(pair) for pair in v]
        elif pid is _SUB_ID:
            v = list(v)
        props[pid] = v
    return props


def message_to_record(m: Message) -> list:
    return [m.topic, m.payload, m.qos, m.retain, props_out(m.properties), m.expires_at, m.origin]


def message_from_record(r) -> Message:
    topic, payload, qos, retain, props, expires_at, origin = r
    return Message(topic, payload, qos, retain, props_in(props), expires_at, origin)


def sub_ids_in(raw):
    return tuple(raw) if raw else None


def session_meta(s: Session) -> dict:
    """The session record without its messages: what the store keeps per session (the
    messages are records of their own there)."""
    will = s.will
    return {
        "v": RECORD_VERSION,
        "client_id": s.client_id,
        "expiry_interval": s.expiry_interval,
        "expires_at": s.expires_at,
        "version": s.version,
        "next_pid": s.next_pid,
        "epoch": s.epoch,
        "created_at": s.created_at,
        "subscriptions": [e.to_record() for e in s.subscriptions.values()],
        "inflight_out": [],
        "queue": [],
        "inflight_in": [],
        "will": None if will is None else [will.topic, will.payload, will.qos, will.retain,
                                           props_out(will.properties)],
        "will_delay": s.will_delay,
        "will_at": s.will_at,
        "handover": s.handover,
        "user": s.username,
    }


def session_to_record(s: Session) -> dict:
    r = session_meta(s)
    r["inflight_out"] = [[pid, message_to_record(e.msg), e.qos, e.retain,
                          list(e.sub_ids) if e.sub_ids else None, e.stage]
                         for pid, e in s.inflight_out.items()]
    r["queue"] = [[message_to_record(m), qos, retain, list(sub_ids) if sub_ids else None]
                  for m, qos, retain, sub_ids, _ in s.queue]
    r["inflight_in"] = sorted(s.inflight_in)
    return r


def session_from_record(r: dict, limits, counters) -> tuple[Session, list]:
    """Rebuild a session (OFFLINE, no subscriptions in any tree yet). Returns the session
    and its subscription records, which the broker adds to its tree."""
    if not isinstance(r, dict) or r.get("v") != RECORD_VERSION:
        raise RecordError(f"unknown session record version {r.get('v') if isinstance(r, dict) else r!r}")
    try:
        s = Session(r["client_id"], limits, counters)
        s.expiry_interval = r["expiry_interval"]
        s.expires_at = r["expires_at"]
        s.version = r["version"]
        s.next_pid = r["next_pid"]
        s.epoch = r["epoch"]
        s.created_at = r["created_at"]
        for pid, m, qos, retain, sub_ids, stage in r["inflight_out"]:
            e = OutFlight(message_from_record(m), qos, retain, sub_ids_in(sub_ids))
            e.stage = stage
            s.inflight_out[pid] = e
        for m, qos, retain, sub_ids in r["queue"]:
            s.queue.append((message_from_record(m), qos, retain, sub_ids_in(sub_ids), 0))
            if qos == 0:
                s.queued_qos0 += 1
        s.count_queue_bytes()
        s.inflight_in = set(r["inflight_in"])
        w = r["will"]
        s.will = None if w is None else Will(w[0], w[1], w[2], w[3], props_in(w[4]) or {})
        s.will_delay = r["will_delay"]
        s.will_at = r["will_at"]
        s.username = r.get("user")
        if s.username is not None and not isinstance(s.username, str):
            raise TypeError(f"user is {type(s.username).__name__}")
        handover = r.get("handover")
        if handover is None and (r.get("handed") or r.get("late_seen")):
            handover = {"handed": r.get("handed"), "late_seen": r.get("late_seen")}
        if handover is not None and not isinstance(handover, dict):
            raise TypeError(f"handover is {type(handover).__name__}")
        s.handover = handover or None
        return s, list(r["subscriptions"])
    except (KeyError, TypeError, ValueError) as err:
        raise RecordError(f"malformed session record: {err!r}") from err


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
