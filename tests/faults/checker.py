"""The checker of the fault tests (issue 6): a pure function from a recorded history to
figures. No I/O, no clock, no broker: unit-tested with hand-made histories
(tests/faults/test_checker.py) and fed by the workload of tests/faults/test_faults.py.

History
-------
A list of ``Event`` (times in seconds, any origin, one clock for the whole history):

* publisher ``sent`` / ``acked`` (topic, seq, qos): the PUBLISH went out / its PUBACK
  (QoS 1) or PUBCOMP (QoS 2) came back. Sequence numbers count up per topic, and the
  workload never re-sends a sequence number (a message whose acknowledgement did not come
  is abandoned, the next one gets the next number), so every copy of (topic, seq) a
  subscriber gets comes from the broker.
* publisher / subscriber ``connected`` (node, session_present, resume): a CONNACK 0;
  ``resume`` when the client asked to continue a session it already had (clean start 0
  after its first SUBACK).
* subscriber ``subscribed`` (filter, qos): a SUBACK granted.
* subscriber ``received`` (topic, seq, qos, dup): the application got the message.
* ``disconnected`` (reason): the connection ended (reason: a v5 reason code, or text).
* subscriber ``stale_received`` (topic, seq, reason: the time the connection was
  superseded): a message that arrived on a connection the client had left open while a
  newer connection of the same ClientID already had its CONNACK (an overlap hop).
* nemesis ``kill`` / ``restart`` (node, leader): kill -9 of a node / the node ready again.
* nemesis ``partition`` / ``heal`` (node, leader): the node cut off from every other node
  (clients still reach it: it is a minority of one) / the cut removed.
* nemesis ``toxic`` / ``toxic_end`` (node: the toxiproxy proxy's name, reason: the toxic
  type and attributes): a toxic added to / removed from a client link.

Rules
-----
* **lost**: an acknowledged message that a subscriber never received although it was
  *subscribed* when the message was sent: its first SUBACK for a matching filter came
  before the ``sent`` event (persistent: a session once made is expected to last; a
  session lost by the documented ``unreachable_owner = fresh`` policy still counts as a
  loss, and such losses are counted apart in ``lost_in_session_gap``: the message was
  sent between the last connection that preceded a session loss and the re-SUBACK).
  Counted per (message, subscriber).
* **qos2_duplicates**: deliveries at QoS 2 of a (topic, seq) that subscriber had already
  received (each extra delivery counts one).
* **order_violations**: per subscriber and topic, a first arrival of an acknowledged
  message with a lower seq than a first arrival before it.
* **sessions_lost**: a resume answered with session present = 0.
* **double_owners**: a ``stale_received`` message that was *sent* after the newer
  connection's CONNACK: the node of the old connection was still delivering the session
  while another node had taken it over (a message sent before it may legitimately still
  be on its way on the old connection).

Losses are attributed for information: ``lost_in_partition`` counts the lost (message,
subscriber) pairs whose message was sent while a partition was on (``partition`` up to its
``heal``, or the end of the history without one).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Event:
    t: float
    kind: str           # sent acked connected subscribed received disconnected, and the
    #                     nemesis' kill restart partition heal toxic toxic_end
    who: str = ""       # publisher / subscriber id ("nemesis" for the nemesis' events)
    topic: str = ""     # sent, acked, received; the filter of subscribed
    seq: int = -1
    qos: int = 0
    dup: bool = False
    node: str = ""      # connected, kill, restart, partition, heal; toxic*: the proxy
    session_present: bool = False
    resume: bool = False
    leader: bool = False
    reason: Any = None


# -- constructors (what the workload calls, and what the unit tests write)
def sent(t, who, topic, seq, qos):
    return Event(t, "sent", who, topic, seq, qos)


def acked(t, who, topic, seq, qos):
    return Event(t, "acked", who, topic, seq, qos)


def connected(t, who, node, session_present, resume):
    return Event(t, "connected", who, node=node, session_present=bool(session_present),
                 resume=bool(resume))


def subscribed(t, who, topic_filter, qos):
    return Event(t, "subscribed", who, topic_filter, qos=qos)


def received(t, who, topic, seq, qos, dup=False):
    return Event(t, "received", who, topic, seq, qos, bool(dup))


def disconnected(t, who, reason=None):
    return Event(t, "disconnected", who, reason=reason)


def kill(t, node, leader=False):
    return Event(t, "kill", "nemesis", node=node, leader=bool(leader))


def restart(t, node):
    return Event(t, "restart", "nemesis", node=node)


def partition(t, node, leader=False):
    return Event(t, "partition", "nemesis", node=node, leader=bool(leader))


def heal(t, node):
    return Event(t, "heal", "nemesis", node=node)


def stale_received(t, who, topic, seq, superseded_at):
    return Event(t, "stale_received", who, topic, seq, reason=float(superseded_at))


def toxic(t, proxy, detail):
    return Event(t, "toxic", "nemesis", node=proxy, reason=detail)


def toxic_end(t, proxy, detail):
    return Event(t, "toxic_end", "nemesis", node=proxy, reason=detail)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (+ and #; no $-topic special case needed here)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


@dataclass
class Result:
    acknowledged: int = 0
    sent: int = 0
    received: int = 0                 # deliveries, duplicates included
    lost: int = 0                     # (message, subscriber) pairs
    lost_messages: int = 0            # distinct messages with at least one loss
    lost_in_session_gap: int = 0      # the part of ``lost`` a session loss explains
    lost_in_partition: int = 0        # the part of ``lost`` sent during a partition
    qos2_duplicates: int = 0
    qos1_redeliveries: int = 0        # allowed (at least once): for information
    order_violations: int = 0
    sessions_lost: int = 0
    double_owners: int = 0
    stale_deliveries: int = 0         # on a superseded connection, sent before: allowed
    resumes: int = 0
    kills: int = 0
    leader_kills: int = 0
    partitions: int = 0
    leader_partitions: int = 0
    toxics: int = 0                   # toxics added (any type)
    toxic_types: dict = field(default_factory=dict)   # type -> count
    lost_examples: list = field(default_factory=list)
    duplicate_examples: list = field(default_factory=list)
    order_examples: list = field(default_factory=list)
    session_lost_examples: list = field(default_factory=list)
    double_owner_examples: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.qos2_duplicates or self.order_violations
                    or self.sessions_lost or self.double_owners)

    def figures(self) -> dict:
        return {k: getattr(self, k) for k in (
            "sent", "acknowledged", "received", "lost", "lost_messages",
            "lost_in_session_gap", "lost_in_partition", "qos2_duplicates",
            "qos1_redeliveries", "order_violations", "sessions_lost", "double_owners",
            "stale_deliveries", "resumes", "kills",
            "leader_kills", "partitions", "leader_partitions", "toxics", "toxic_types")}

    def report(self) -> str:
        lines = ["checker: " + "  ".join(f"{k}={v}" for k, v in self.figures().items())]
        for name in ("lost_examples", "duplicate_examples", "order_examples",
                     "session_lost_examples", "double_owner_examples"):
            examples = getattr(self, name)
            if examples:
                lines.append(f"  {name} ({len(examples)} shown):")
                lines += [f"    {e}" for e in examples]
        return "\n".join(lines)


def _last_before(events: list[Event], t: float) -> Event | None:
    found = None
    for e in events:
        if e.t <= t:
            found = e
        else:
            break
    return found


def check(history: Iterable[Event]) -> Result:
    events = sorted(history, key=lambda e: e.t)   # stable: equal times keep their order
    r = Result()
    sent_at: dict = {}                    # (topic, seq) -> sent Event
    acked_at: dict = {}                   # (topic, seq) -> acked Event
    first_sub: dict = defaultdict(list)   # subscriber -> [(t, filter)] first SUBACK per filter
    connects: dict = defaultdict(list)    # who -> [connected Event]
    resubs: dict = defaultdict(list)      # subscriber -> [subscribed Event]
    got: dict = defaultdict(list)         # subscriber -> [received Event] in arrival order
    kills: list[Event] = []
    partitions: list[list] = []           # [partition Event, heal time or inf]
    stale: list[Event] = []
    for e in events:
        if e.kind == "sent":
            sent_at.setdefault((e.topic, e.seq), e)
            r.sent += 1
        elif e.kind == "acked":
            acked_at.setdefault((e.topic, e.seq), e)
        elif e.kind == "subscribed":
            if all(f != e.topic for _, f in first_sub[e.who]):
                first_sub[e.who].append((e.t, e.topic))
            resubs[e.who].append(e)
        elif e.kind == "connected":
            connects[e.who].append(e)
        elif e.kind == "received":
            got[e.who].append(e)
            r.received += 1
        elif e.kind == "stale_received":
            stale.append(e)
        elif e.kind == "kill":
            kills.append(e)
            r.kills += 1
            r.leader_kills += e.leader
        elif e.kind == "partition":
            partitions.append([e, float("inf")])
            r.partitions += 1
            r.leader_partitions += e.leader
        elif e.kind == "heal":
            for p in reversed(partitions):
                if p[0].node == e.node and p[1] == float("inf"):
                    p[1] = e.t
                    break
        elif e.kind == "toxic":
            r.toxics += 1
            kind = str(e.reason).split()[0] if e.reason else "?"
            r.toxic_types[kind] = r.toxic_types.get(kind, 0) + 1
    r.acknowledged = len(acked_at)

    def context(t: float) -> str:
        k = _last_before(kills, t)
        text = f"last kill before: {k.node}{' (leader)' if k.leader else ''} at {k.t:.2f}" \
            if k else "no kill before"
        p = _last_before([p for p, _ in partitions], t)
        if p is not None:
            healed = next(h for q, h in partitions if q is p)
            text += (f"; last partition before: {p.node}{' (leader)' if p.leader else ''} "
                     f"{p.t:.2f}-{healed:.2f}")
        return text

    def in_partition(t: float) -> bool:
        return any(p.t <= t <= healed for p, healed in partitions)

    # -- sessions lost, and the gaps they explain: from the connection before the loss
    # to the next SUBACK after it
    gaps: dict = defaultdict(list)
    for who, cs in connects.items():
        for i, c in enumerate(cs):
            if not c.resume:
                continue
            r.resumes += 1
            if c.session_present:
                continue
            r.sessions_lost += 1
            start = cs[i - 1].t if i else c.t
            end = next((s.t for s in resubs[who] if s.t >= c.t), float("inf"))
            gaps[who].append((start, end))
            if len(r.session_lost_examples) < MAX_EXAMPLES:
                r.session_lost_examples.append(
                    f"{who} resumed on {c.node} at {c.t:.2f}: session present = 0 "
                    f"(previous connection at {start:.2f}"
                    f"{' on ' + cs[i - 1].node if i else ''}; {context(c.t)})")

    # -- lost
    lost_keys = set()
    seen_by = {who: {(e.topic, e.seq) for e in evs} for who, evs in got.items()}
    for key, ack in sorted(acked_at.items(), key=lambda kv: kv[1].t):
        s = sent_at.get(key)
        t_sent = s.t if s else ack.t
        for who, subs in first_sub.items():
            if not any(t < t_sent and topic_matches(f, key[0]) for t, f in subs):
                continue
            if key in seen_by.get(who, ()):
                continue
            r.lost += 1
            lost_keys.add(key)
            in_gap = any(a <= t_sent <= b for a, b in gaps[who])
            r.lost_in_session_gap += in_gap
            parted = in_partition(t_sent)
            r.lost_in_partition += parted
            if len(r.lost_examples) < MAX_EXAMPLES:
                c = _last_before(connects[who], t_sent)
                pc = _last_before(connects[ack.who], t_sent)
                r.lost_examples.append(
                    f"{key[0]} #{key[1]} qos{ack.qos} never reached {who}: sent {t_sent:.2f} "
                    f"by {ack.who} on {pc.node if pc else '?'}, acked {ack.t:.2f}; {who} "
                    f"was last connected to {c.node if c else '?'} at "
                    f"{c.t if c else float('nan'):.2f}; {context(ack.t)}"
                    f"{'; in a session-loss gap' if in_gap else ''}"
                    f"{'; sent during a partition' if parted else ''}")
    r.lost_messages = len(lost_keys)

    # -- two live owners: the old connection delivering what was sent after the takeover
    for e in stale:
        s = sent_at.get((e.topic, e.seq))
        if s is None or s.t <= e.reason:
            r.stale_deliveries += 1
            continue
        r.double_owners += 1
        if len(r.double_owner_examples) < MAX_EXAMPLES:
            r.double_owner_examples.append(
                f"{e.who} got {e.topic} #{e.seq} at {e.t:.2f} on a connection superseded at "
                f"{e.reason:.2f}, sent at {s.t:.2f}; {context(e.t)}")

    # -- duplicates and order
    for who, evs in got.items():
        count: dict = defaultdict(int)
        highest: dict = {}
        for e in evs:
            key = (e.topic, e.seq)
            count[key] += 1
            if count[key] > 1:
                if e.qos == 2:
                    r.qos2_duplicates += 1
                    if len(r.duplicate_examples) < MAX_EXAMPLES:
                        r.duplicate_examples.append(
                            f"{who} got {e.topic} #{e.seq} at QoS 2 a {count[key]}. time at "
                            f"{e.t:.2f} (dup={e.dup}); {context(e.t)}")
                else:
                    r.qos1_redeliveries += 1
                continue
            if key not in acked_at:
                continue
            top = highest.get(e.topic)
            if top is not None and e.seq < top:
                r.order_violations += 1
                if len(r.order_examples) < MAX_EXAMPLES:
                    r.order_examples.append(
                        f"{who} got {e.topic} #{e.seq} first at {e.t:.2f}, after #{top}; "
                        f"{context(e.t)}")
            else:
                highest[e.topic] = e.seq
    return r
