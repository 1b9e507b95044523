"""The Raft-replicated routing table: members, ClientID owners, subscription routes.

pysyncobj runs the Raft node in its own thread. The replicated state (``RoutingState``,
a ``SyncObjConsumer``) is touched only there: every committed batch of operations is
applied to it in log order, and the same batch is posted to the asyncio loop
(``loop.call_soon_threadsafe``), where ``RoutingView`` applies it to its own copy with the
same pure function (:func:`apply`, a table of one rule per operation) and hands the events
to its listeners. So reads are local and never block, there is one set of rules, and one
owner per copy: the Raft thread owns ``RoutingState``, the loop owns ``RoutingView``.

Entries are small and batched (``RaftClient`` sends every operation submitted during one
loop iteration as one entry); message payloads never go through Raft.

Operations (tuples, the first item names them):

    ("claim", client_id, node_id, clean_start[, owner])
                                                 -> (epoch, holder); (None, holder):
                                                    refused, the session is another
                                                    owner's (bind_client_id)
    ("release", client_id, node_id, epoch[, holder]) -> bool (holder False: the claim
                                                    only, not the node's holding)
    ("routes", node_id, added, removed)          -> None (filters, "$share/..." kept whole)
    ("moved", client_id, epoch, from_node, to_node[, replicas])
                                                 -> bool (takeover barrier point; the
                                                    new holder's in-sync replicas)
    ("member", node_id, info | None)             -> None (None removes)
    ("forget", node_id)                          -> [client_id...] (a dead node removed:
                                                    its member entry, routes and sessions)
    ("init", cluster_id)                         -> the cluster id (the first one sticks)
    ("replicas", client_id, holder, [node...])   -> bool (the session's in-sync replicas)
    ("unreplicate", holder, node)                -> int (node dropped from the in-sync
                                                    replicas of every session holder holds)
    ("down", node_id)                            -> [(client_id, new holder, epoch)...]
                                                    (declared down: sessions promoted)

Ownership has two parts. ``owners[client_id] = (node, epoch)`` is who may serve the
ClientID now: every claim takes it with a new epoch (strictly increasing: one counter for
the table), the fencing token of every node-to-node message about it.
``holders[client_id] = node`` is where the session physically is: it changes only when a
takeover finished (``moved``), so a claim answers "ask this node for the session", and two
racing claims both ask the node that really has it. A claim with clean start makes the
claimer the holder at once (the old copy is discarded where it is). ``release`` (the
session ended) clears the owner if it is still that (node, epoch), and the holder if it is
that node.

``forget`` is an operator's word that a node is gone for good (``shoal cluster forget``):
its member entry and routes go; its sessions with an in-sync replica are promoted there
(as ``down`` does), the ClientIDs it owned or held otherwise go, so that their next claim
starts a fresh session instead of asking a node that never answers.

Replicas (cluster/replication.py). ``replicas[client_id]`` is the in-sync replica set of
the session at its current holder: nodes that hold a copy of every change the holder
acknowledged. The holder records a node there once the node stored its seed (``replicas``,
refused unless the proposer still holds the session); a replica that stops answering is
dropped (``unreplicate``). A move sets it to the replicas the new holder seeded before
proposing it (none: empty); a clean claim or a release empties it. ``down`` is the leader's verdict that a node has been silent for
``failover_timeout``: for every session it held that has an in-sync replica up, the first
such replica becomes owner and holder under a new epoch (the fence: the old node's
messages about it carry an older epoch), and the dead node's routes go to the nodes that
got its sessions (they narrow them to their real filters at the next reconciliation).
Sessions without a replica stay held by it. ``member`` with info (the node came back)
clears ``down``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from .raftwire import RaftTransport, install_restricted_unpickler

log = logging.getLogger("shoal.routing")


class RaftUnavailable(Exception):
    """The operation could not be committed (no leader, lost leadership, no quorum)."""


# -- the tables and the one set of rules ------------------------------------------------------

@dataclass
class Tables:
    """The replicated routing table. The Raft state machine owns one copy (Raft thread),
    the loop-side view another; both change only through :func:`apply`."""

    members: dict[str, dict] = field(default_factory=dict)
    owners: dict[str, tuple[str, int]] = field(default_factory=dict)
    holders: dict[str, str] = field(default_factory=dict)
    routes: dict[str, set[str]] = field(default_factory=dict)
    next_epoch: int = 1
    cluster_id: str | None = None
    #: operations applied so far: the same in every copy at the same point of the log
    #: (a snapshot carries it), so "has a node applied this move?" is a comparison
    position: int = 0
    #: per held ClientID, the position of its latest move (to compare with a position
    #: a node says it routes with)
    moved_at: dict[str, int] = field(default_factory=dict)
    #: per held ClientID, per node it moved away from, the position of that move (a node
    #: restarted in the middle of handing it over compares with its own move, not with
    #: a later one)
    left_at: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per held ClientID, its in-sync replica nodes (at its current holder)
    replicas: dict[str, list[str]] = field(default_factory=dict)
    #: nodes declared down (not heard from for failover_timeout), with the position
    down: dict[str, int] = field(default_factory=dict)
    #: the position of the latest ``down`` that promoted sessions (0: none): a forward
    #: routed with a table at or past it waits at a receiver that has not applied it
    promoted_at: int = 0
    #: per promoted ClientID, per node it was promoted from, the promotion's epoch: a
    #: copy that node kept from an older epoch is superseded, late messages included
    #: (its replica had them)
    promoted: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per held ClientID, per node it moved away from by a hand-over, that move's epoch
    #: and the node's in-sync replicas then: their copies kept what the hand-over did not
    #: deliver, should that node die before it does
    handed_from: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = \
        field(default_factory=dict)
    #: per promoted ClientID, the position of its move to the node it was promoted from
    #: (None: it never moved there): a forward to that node routed before it went, by
    #: the old holder's routes, is the old holder's to keep
    arrived: dict[str, int | None] = field(default_factory=dict)
    #: per held ClientID claimed with an owner (``bind_client_id``), the login that
    #: created its session: a claim by another login is refused while the session exists
    users: dict[str, str] = field(default_factory=dict)

    def copy(self) -> "Tables":
        return Tables({k: dict(v) for k, v in self.members.items()}, dict(self.owners),
                      dict(self.holders), {f: set(n) for f, n in self.routes.items()},
                      self.next_epoch, self.cluster_id, self.position,
                      dict(getattr(self, "moved_at", {})),
                      {c: dict(n) for c, n in getattr(self, "left_at", {}).items()},
                      {c: list(n) for c, n in _replicas(self).items()}, dict(_down(self)),
                      getattr(self, "promoted_at", 0),
                      {c: dict(n) for c, n in _promoted(self).items()},
                      {c: dict(n) for c, n in _handed_from(self).items()},
                      dict(_arrived(self)), dict(_users(self)))


# What an operation changed, as the view's listeners see it (cluster/member.py dispatches
# on the type). Local objects: they never cross the wire.

@dataclass(frozen=True, slots=True)
class Claimed:
    client_id: str
    node: str
    epoch: int
    previous: str | None  # the owner before this claim
    holder: str | None    # where the session was when claimed (the claim's answer)
    clean: bool


@dataclass(frozen=True, slots=True)
class Released:
    client_id: str
    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Moved:
    client_id: str
    epoch: int
    from_node: str
    to_node: str
    ok: bool  # False: refused (an older claim's move, or the holder changed)
    position: int = 0  # the table's position once applied (Tables.position)


@dataclass(frozen=True, slots=True)
class RoutesChanged:
    node: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MemberChanged:
    node: str
    info: dict | None  # None: removed


@dataclass(frozen=True, slots=True)
class Forgotten:
    node: str
    released: tuple[str, ...]  # the ClientIDs it owned or held
    promoted: tuple[tuple[str, str, int], ...] = ()  # (client_id, new holder, epoch)
    position: int = 0


@dataclass(frozen=True, slots=True)
class NodeDown:
    """A node declared down (or forgotten): its replicated sessions promoted."""
    node: str
    promoted: tuple[tuple[str, str, int], ...]  # (client_id, new holder, epoch)
    stuck: int  # sessions it held with no in-sync replica up (they wait for it)
    position: int


@dataclass(frozen=True, slots=True)
class ClusterIdSet:
    cluster_id: str


@dataclass(frozen=True, slots=True)
class Replaced:
    """A Raft snapshot replaced the whole table (a joining or lagging node)."""


Event = Claimed | Released | Moved | RoutesChanged | MemberChanged | Forgotten | \
    ClusterIdSet | Replaced | NodeDown


def _change_routes(routes: dict, node_id: str, added, removed) -> None:
    for f in added:
        routes.setdefault(f, set()).add(node_id)
    for f in removed:
        nodes = routes.get(f)
        if nodes is not None:
            nodes.discard(node_id)
            if not nodes:
                del routes[f]


def _claim(t: Tables, client_id: str, node_id: str, clean: bool, owner: str | None = None):
    prev = t.owners.get(client_id)
    holder = t.holders.get(client_id)
    if owner is not None:
        users = _users(t)
        if holder is not None and users.get(client_id, owner) != owner:
            return (None, holder), None  # bound to another login: nothing changes
        if clean or holder is None:
            users[client_id] = owner
    epoch = t.next_epoch
    t.next_epoch += 1
    t.owners[client_id] = (node_id, epoch)
    if clean or holder is None:
        t.holders[client_id] = node_id
        _replicas(t).pop(client_id, None)
        _promoted(t).pop(client_id, None)
    return (epoch, holder), Claimed(client_id, node_id, epoch, prev[0] if prev else None,
                                    holder, bool(clean))


def _release(t: Tables, client_id: str, node_id: str, epoch: int, holder: bool = True):
    cur = t.owners.get(client_id)
    released = False
    if cur is not None and cur[0] == node_id and cur[1] == epoch:
        del t.owners[client_id]
        released = True
    if holder and t.holders.get(client_id) == node_id:
        del t.holders[client_id]
        _moved_at(t).pop(client_id, None)
        _left_at(t).pop(client_id, None)
        _handed_from(t).pop(client_id, None)
        _arrived(t).pop(client_id, None)
        _replicas(t).pop(client_id, None)
        _promoted(t).pop(client_id, None)
        _users(t).pop(client_id, None)
        released = True
    return released, (Released(client_id, node_id, epoch) if released else None)


def _added_map(t: Tables, name: str) -> dict:
    """A dict field added since the first version (a table unpickled from a snapshot of
    an older version has none)."""
    value = t.__dict__.get(name)
    if value is None:
        value = {}
        setattr(t, name, value)
    return value


def _moved_at(t: Tables) -> dict:
    return _added_map(t, "moved_at")


def _left_at(t: Tables) -> dict:
    return _added_map(t, "left_at")


def _handed_from(t: Tables) -> dict:
    return _added_map(t, "handed_from")


def _arrived(t: Tables) -> dict:
    return _added_map(t, "arrived")


def _replicas(t: Tables) -> dict:
    return _added_map(t, "replicas")


def _users(t: Tables) -> dict:
    return _added_map(t, "users")


def _down(t: Tables) -> dict:
    return _added_map(t, "down")


def _promoted(t: Tables) -> dict:
    return _added_map(t, "promoted")


def _routes(t: Tables, node_id: str, added, removed):
    _change_routes(t.routes, node_id, added, removed)
    return None, RoutesChanged(node_id, tuple(added), tuple(removed))


def _moved(t: Tables, client_id: str, epoch: int, from_node: str, to_node: str,
           replicas=()):
    # only for the claim that is still current: a move proposed for an older epoch (a
    # newer claim was applied first) never happens, whatever holds the session
    owner = t.owners.get(client_id)
    ok = t.holders.get(client_id) == from_node and owner is not None and \
        tuple(owner) == (to_node, epoch)
    if ok:
        t.holders[client_id] = to_node
        _moved_at(t)[client_id] = t.position
        _left_at(t).setdefault(client_id, {})[from_node] = t.position
        _handed_from(t).setdefault(client_id, {})[from_node] = \
            (epoch, tuple(_replicas(t).get(client_id, ())))
        down = _down(t)
        reps = [n for n in dict.fromkeys(replicas or ())
                if n != to_node and n in t.members and n not in down]
        if reps:
            _replicas(t)[client_id] = reps
        else:
            _replicas(t).pop(client_id, None)
    return ok, Moved(client_id, epoch, from_node, to_node, ok, t.position)


def _sync(t: Tables):
    return None, None  # applied once every earlier entry is: a read barrier


def _member(t: Tables, node_id: str, info):
    if info is None:
        t.members.pop(node_id, None)
        # a removed node routes nothing
        _change_routes(t.routes, node_id, (), [f for f, n in t.routes.items() if node_id in n])
        _drop_replica(t, node_id)
    else:
        t.members[node_id] = dict(info)
        _down(t).pop(node_id, None)  # (back: it announces itself again)
    return None, MemberChanged(node_id, None if info is None else dict(info))


def _drop_replica(t: Tables, node_id: str, holder: str | None = None) -> int:
    """``node_id`` out of every in-sync set (of the sessions ``holder`` holds, if given);
    returns how many sets it left."""
    reps = _replicas(t)
    cids = [c for c, nodes in reps.items() if node_id in nodes
            and (holder is None or t.holders.get(c) == holder)]
    for cid in cids:
        reps[cid] = [n for n in reps[cid] if n != node_id]
    return len(cids)


def _promote(t: Tables, node_id: str) -> tuple[list, int]:
    """Every session ``node_id`` holds that has an in-sync replica up moves there under a
    new epoch; the node's routes go to the nodes that got sessions. Returns the
    promotions and how many sessions it holds without one."""
    down, reps = _down(t), _replicas(t)
    promoted, stuck = [], 0
    for cid in sorted(c for c, h in t.holders.items() if h == node_id):
        up = [n for n in reps.get(cid, ()) if n != node_id and n in t.members and n not in down]
        if not up:
            stuck += 1
            continue
        target = up[0]
        epoch = t.next_epoch
        t.next_epoch += 1
        t.owners[cid] = (target, epoch)
        t.holders[cid] = target
        _arrived(t)[cid] = _moved_at(t).get(cid)
        _moved_at(t)[cid] = t.position
        _left_at(t).setdefault(cid, {})[node_id] = t.position
        reps[cid] = []
        _promoted(t).setdefault(cid, {})[node_id] = epoch
        promoted.append((cid, target, epoch))
    _drop_replica(t, node_id)
    gone = [f for f, n in t.routes.items() if node_id in n]
    if not stuck:
        # (with sessions of its own left, it keeps its routes: what they subscribed to
        # still goes to it, and waits for it, as before there were replicas)
        _change_routes(t.routes, node_id, (), gone)
    for target in sorted({p[1] for p in promoted}):
        _change_routes(t.routes, target, gone, ())
    if promoted:
        t.promoted_at = t.position
    return promoted, stuck


def _down_rule(t: Tables, node_id: str):
    if node_id not in t.members or node_id in _down(t):
        return [], None
    _down(t)[node_id] = t.position
    promoted, stuck = _promote(t, node_id)
    return promoted, NodeDown(node_id, tuple(promoted), stuck, t.position)


def _set_replicas(t: Tables, client_id: str, holder: str, nodes):
    down = _down(t)
    if t.holders.get(client_id) != holder or holder in down:
        return False, None
    _replicas(t)[client_id] = [n for n in dict.fromkeys(nodes)
                               if n != holder and n in t.members and n not in down]
    return True, None


def _unreplicate(t: Tables, holder: str, node_id: str):
    return _drop_replica(t, node_id, holder), None


def _forget(t: Tables, node_id: str):
    """A node gone for good: member entry, routes, and the ClientIDs it owned or held
    (those with an in-sync replica are promoted there first, as ``down`` does)."""
    promoted = _promote(t, node_id)[0] if node_id in t.members else []
    _down(t).pop(node_id, None)
    t.members.pop(node_id, None)
    _change_routes(t.routes, node_id, (), [f for f, n in t.routes.items() if node_id in n])
    released = sorted({cid for cid, h in t.holders.items() if h == node_id} |
                      {cid for cid, (n, _e) in t.owners.items() if n == node_id})
    for cid in released:
        if t.holders.get(cid) == node_id:
            del t.holders[cid]
            _moved_at(t).pop(cid, None)
            _left_at(t).pop(cid, None)
            _handed_from(t).pop(cid, None)
            _arrived(t).pop(cid, None)
        owner = t.owners.get(cid)
        if owner is not None and owner[0] == node_id:
            del t.owners[cid]
        _replicas(t).pop(cid, None)
        _promoted(t).pop(cid, None)
    return released, Forgotten(node_id, tuple(released), tuple(promoted), t.position)


def _init(t: Tables, cluster_id):
    if t.cluster_id is not None:
        return t.cluster_id, None
    t.cluster_id = str(cluster_id)
    return t.cluster_id, ClusterIdSet(t.cluster_id)


#: operation name -> rule (the operation's other items are the rule's arguments)
RULES: dict[str, Callable] = {
    "claim": _claim, "release": _release, "routes": _routes, "moved": _moved,
    "sync": _sync, "member": _member, "forget": _forget, "init": _init,
    "replicas": _set_replicas, "unreplicate": _unreplicate, "down": _down_rule,
}


def apply(tables: Tables, op: tuple):
    """Apply one operation to ``tables``: ``(result, event or None)``. The one set of
    routing rules: the Raft state machine runs it on its copy in the Raft thread, the view
    runs it on its own copy in the loop, on the same operations in the same order, so the
    two agree (a malformed operation raises the same error, at the same point, in both)."""
    rule = RULES.get(op[0])
    if rule is None:
        raise ValueError(f"unknown operation {op[0]!r}")
    # (counted before the rule runs: one that raises counts too, in every copy alike)
    tables.position = getattr(tables, "position", 0) + 1
    return rule(tables, *op[1:])


#: what a malformed operation raises (it must not stop the state machine on any node)
OP_ERRORS = (ValueError, TypeError, IndexError, KeyError)


class RoutingState(SyncObjConsumer):
    """The replicated state machine. Runs in the Raft thread only."""

    def __init__(self, sink: Callable[[object], None]) -> None:
        # set before SyncObjConsumer.__init__: attributes that exist then are not
        # serialized into Raft snapshots (the sink is a local callback)
        self._sink = sink
        super().__init__()
        self.tables = Tables()

    @replicated
    def apply(self, ops: list) -> list:
        results = []
        for op in ops:
            try:
                results.append(apply(self.tables, op)[0])
            except OP_ERRORS as err:
                results.append(("error", repr(err)))
        self._sink(ops)  # the view applies the same operations in the same order
        return results

    def _deserialize(self, data) -> None:
        # a snapshot holds our one replicated attribute and nothing else (it sets
        # attributes by name: a crafted one must not replace the sink or anything else)
        if not (isinstance(data, dict) and set(data) == {"tables"} and
                isinstance(data["tables"], Tables)):
            raise ValueError("a Raft snapshot of the routing state holds only 'tables', "
                             f"got {sorted(map(repr, data)) if isinstance(data, dict) else data!r}")
        super()._deserialize(data)
        # a snapshot replaced the whole state (a joining or lagging node): so does the view
        self._sink(self.tables.copy())


class RoutingView:
    """The loop-side copy of the table: what every read uses. It applies the operations
    the Raft state machine applied, in the same order, with the same :func:`apply`.

    ``listeners`` get each event after the view applied it (the cluster member reacts to
    claims, moves and membership changes there)."""

    def __init__(self) -> None:
        self.tables = Tables()
        self.listeners: list[Callable[[Event], None]] = []
        #: called after each applied batch (or replaced table), once its events went out
        self.after_apply: list[Callable[[], None]] = []
        self.applied = 0

    # reads
    @property
    def members(self) -> dict[str, dict]:
        return self.tables.members

    @property
    def owners(self) -> dict[str, tuple[str, int]]:
        return self.tables.owners

    @property
    def holders(self) -> dict[str, str]:
        return self.tables.holders

    @property
    def routes(self) -> dict[str, set[str]]:
        return self.tables.routes

    @property
    def replicas(self) -> dict[str, list[str]]:
        return self.tables.replicas

    @property
    def down(self) -> dict[str, int]:
        return self.tables.down

    @property
    def promoted(self) -> dict[str, dict[str, int]]:
        return _promoted(self.tables)

    @property
    def handed_from(self) -> dict[str, dict[str, tuple[int, tuple[str, ...]]]]:
        return _handed_from(self.tables)

    @property
    def arrived(self) -> dict[str, int | None]:
        return _arrived(self.tables)

    @property
    def cluster_id(self) -> str | None:
        return self.tables.cluster_id

    def owner_of(self, client_id: str) -> tuple[str, int] | None:
        return self.tables.owners.get(client_id)

    # changes
    def apply_ops(self, ops) -> None:
        """A batch the Raft state machine applied (a list of operations), or the table a
        Raft snapshot installed (a ``Tables``)."""
        if isinstance(ops, Tables):
            self.tables = ops
            self._emit(Replaced())
        else:
            for op in ops:
                try:
                    _result, event = apply(self.tables, op)
                except OP_ERRORS:
                    continue  # refused in the state machine too (it answered the error)
                self.applied += 1
                if event is not None:
                    self._emit(event)
        for hook in self.after_apply:
            try:
                hook()
            except Exception:  # as for listeners
                log.exception("routing after-apply hook failed")

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # one listener's bug must not starve the others
                log.exception("routing listener failed event=%s", type(event).__name__)


def raft_conf(secret: str, bind_addr: str, journal: str | None = None,
              compaction_entries: int = 20_000, compaction_seconds: float = 60.0,
              dump: str | None = None) -> SyncObjConf:
    """The settings measured on this kind of machine (DESIGN.md). ``bind_addr`` is
    "host:port": pysyncobj binds 0.0.0.0 unless told. ``journal`` and ``dump`` (files) keep
    the log, the term and the vote, and the compacted state across a restart of the
    process: a Raft voter must not forget what it acknowledged or whom it voted for."""
    return SyncObjConf(
        password=secret,
        bindAddress=bind_addr,
        dynamicMembershipChange=True,
        appendEntriesUseBatch=False,
        connectionRetryTime=0.3,
        raftMinTimeout=0.2,
        raftMaxTimeout=0.5,
        appendEntriesPeriod=0.05,
        connectionTimeout=1.0,
        leaderFallbackTimeout=1.0,
        useFork=False,  # we run asyncio and threads: never fork to serialize
        logCompactionMinEntries=compaction_entries,
        logCompactionMinTime=compaction_seconds,
        commandsWaitLeader=True,
        journalFile=journal,
        fullDumpFile=dump,
    )


def raft_files(log_dir: str) -> tuple[str, ...]:
    """The files pysyncobj keeps in ``log_dir``: the log (with its ``.meta``: term, vote,
    commit index), the compacted state, and their temporary files."""
    journal = os.path.join(log_dir, "raft.journal")
    dump = os.path.join(log_dir, "raft.dump")
    return journal, dump, journal + ".meta", dump + ".tmp", journal + ".meta.tmp"


def clear_raft_files(log_dir: str) -> int:
    """Remove the Raft files of ``log_dir`` (a node that joins as a new member starts
    with an empty log); returns how many there were."""
    removed = 0
    for path in raft_files(log_dir):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed += 1
    return removed


class Proposals:
    """Operations proposed from the loop: every op submitted in one loop iteration goes
    in one entry (``_flush``, at the end of the iteration). Shared by ``RaftNode`` and
    the simulation's Raft (cluster/simulation.py); needs ``loop``, ``_pending``,
    ``_flush_scheduled`` and ``_flush``."""

    def submit(self, op: tuple) -> asyncio.Future:
        """Queue one operation; every op submitted in one loop iteration is one entry."""
        fut = self.loop.create_future()
        self._pending.append((op, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    async def run(self, op: tuple, timeout: float):
        fut = self.submit(op)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise RaftUnavailable(f"{op[0]} not committed within {timeout:.1f}s") from None


class RaftNode:
    """pysyncobj wrapped for asyncio: starts the Raft thread, batches operations, and
    bridges results and events into the loop."""

    def __init__(self, self_addr: str, partners: list[str], secret: str, bind_host: str,
                 view: RoutingView, loop: asyncio.AbstractEventLoop,
                 compaction: tuple[int, float] = (20_000, 60.0),
                 log_dir: str | None = None) -> None:
        """``log_dir``: where the Raft log and the compacted state live (the files of
        :func:`raft_files`); None keeps them in memory (a restart forgets them)."""
        self.view = view
        self.loop = loop
        self.self_addr = self_addr
        self.state = RoutingState(self._events_from_raft)
        port = self_addr.rsplit(":", 1)[1]
        journal = dump = None
        if log_dir is not None:
            journal, dump = raft_files(log_dir)[:2]
        conf = raft_conf(secret, f"{bind_host}:{port}", journal, compaction[0], compaction[1],
                         dump)
        # the Raft port's bounds and restricted unpickler: cluster/raftwire.py
        install_restricted_unpickler()
        self.syncobj = SyncObj(self_addr, partners, conf=conf, consumers=[self.state],
                               transportClass=RaftTransport)
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flush_scheduled = False
        self.commits = 0  # batches committed through this node
        self.batches_in_flight = 0

    def _events_from_raft(self, ops) -> None:  # Raft thread
        self.loop.call_soon_threadsafe(self.view.apply_ops, ops)

    # -- proposing ---------------------------------------------------------------------------

    submit = Proposals.submit
    run = Proposals.run

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        ops = [op for op, _ in batch]
        futures = [fut for _, fut in batch]
        loop = self.loop
        self.batches_in_flight += 1

        def done(result, error) -> None:  # Raft thread
            loop.call_soon_threadsafe(self._resolve, futures, result, error)

        self.state.apply(ops, callback=done)

    def _resolve(self, futures: list, result, error) -> None:
        self.batches_in_flight -= 1
        if error == FAIL_REASON.SUCCESS:
            self.commits += 1
            for fut, r in zip(futures, result):
                if fut.done():
                    continue
                if isinstance(r, tuple) and r and r[0] == "error":
                    fut.set_exception(ValueError(r[1]))
                else:
                    fut.set_result(r)
        else:
            exc = RaftUnavailable(f"raft refused the entry: {_fail_name(error)}")
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)

    # -- membership (pysyncobj's own) ------------------------------------------------------

    async def add_raft_member(self, addr: str, timeout: float) -> None:
        await self._call(self.syncobj.addNodeToCluster, addr, timeout)

    async def remove_raft_member(self, addr: str, timeout: float) -> None:
        await self._call(self.syncobj.removeNodeFromCluster, addr, timeout)

    async def transfer_leadership(self, timeout: float) -> None:
        await self._call(self.syncobj.transferLeadership, None, timeout)

    async def _call(self, method, arg, timeout: float) -> None:
        fut = self.loop.create_future()

        def done(result, error) -> None:  # Raft thread
            self.loop.call_soon_threadsafe(_settle, fut, error)

        method(arg, callback=done)
        try:
            error = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RaftUnavailable(f"{method.__name__} timed out") from None
        if error != FAIL_REASON.SUCCESS:
            raise RaftUnavailable(f"{method.__name__}: {_fail_name(error)}")

    # -- status --------------------------------------------------------------------------

    def voters(self) -> list[str]:
        """The Raft voter set as this node's pysyncobj has it (its own address included):
        the configuration every commit is counted against."""
        so = self.syncobj
        return sorted({self.self_addr} | {n.address for n in so.otherNodes})

    def status(self) -> dict:
        so = self.syncobj
        leader = so._getLeader()
        return {
            "self": self.self_addr,
            "leader": None if leader is None else leader.address,
            "is_leader": so._isLeader(),
            "term": so.raftCurrentTerm,
            "commit_index": so.raftCommitIndex,
            "last_applied": so.raftLastApplied,
            "has_quorum": so.hasQuorum,
            "partners": sorted(n.address for n in so.otherNodes),
            "connected": sorted(n.address for n in so.otherNodes if so.isNodeConnected(n)),
        }

    def destroy(self) -> None:
        self.syncobj.destroy()

    def destroy_and_wait(self) -> None:
        """Destroy and wait for the Raft thread to end (its port is free afterwards)."""
        self.syncobj.destroy_synchronous()


def _settle(fut: asyncio.Future, error) -> None:
    if not fut.done():
        fut.set_result(error)


def _fail_name(code) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == code:
            return name
    return str(code)


def now() -> float:
    return time.time()
