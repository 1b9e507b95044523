"""The Raft-replicated routing table: members, ClientID owners, subscription routes.

pysyncobj runs the Raft node in its own thread. The replicated state (``RoutingState``,
a ``SyncObjConsumer``) is touched only there: every committed batch of operations is
applied to it in log order, and each change is posted, in the same order, to the asyncio
loop (``loop.call_soon_threadsafe``) where ``RoutingView`` keeps the mirror every read
uses. So reads are local and never block, and there is one owner per copy: the Raft
thread owns ``RoutingState``, the loop owns ``RoutingView``.

Entries are small and batched (``RaftClient`` sends every operation submitted during one
loop iteration as one entry); message payloads never go through Raft.

Operations (tuples, the first item names them):

    ("claim", client_id, node_id, clean_start)   -> (epoch, holder)
    ("release", client_id, node_id, epoch)       -> bool
    ("routes", node_id, added, removed)          -> None (filters, "$share/..." kept whole)
    ("moved", client_id, epoch, from_node, to_node) -> bool (takeover barrier point)
    ("member", node_id, info | None)             -> None (None removes)
    ("forget", node_id)                          -> [client_id...] (a dead node removed:
                                                    its member entry, routes and sessions)
    ("init", cluster_id)                         -> the cluster id (the first one sticks)

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
its member entry and routes go, and so do the ClientIDs it owned or held, so that their
next claim starts a fresh session instead of asking a node that never answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

log = logging.getLogger("shoal.routing")


class RaftUnavailable(Exception):
    """The operation could not be committed (no leader, lost leadership, no quorum)."""


def forget_node(members: dict, owners: dict, holders: dict, routes: dict,
                node_id: str) -> list[str]:
    """Remove ``node_id`` for good: member entry, routes, and the ClientIDs it owned or
    held (returned). One rule for the Raft state and its loop-side view."""
    members.pop(node_id, None)
    change_routes(routes, node_id, (), [f for f, nodes in routes.items() if node_id in nodes])
    released = sorted({cid for cid, h in holders.items() if h == node_id} |
                      {cid for cid, (n, _e) in owners.items() if n == node_id})
    for cid in released:
        if holders.get(cid) == node_id:
            del holders[cid]
        owner = owners.get(cid)
        if owner is not None and owner[0] == node_id:
            del owners[cid]
    return released


def change_routes(routes: dict, node_id: str, added, removed) -> None:
    """filter -> nodes: one rule for the Raft state and its loop-side view."""
    for f in added:
        routes.setdefault(f, set()).add(node_id)
    for f in removed:
        nodes = routes.get(f)
        if nodes is not None:
            nodes.discard(node_id)
            if not nodes:
                del routes[f]


class RoutingState(SyncObjConsumer):
    """The replicated state machine. Runs in the Raft thread only."""

    def __init__(self, sink: Callable[[list], None]) -> None:
        # set before SyncObjConsumer.__init__: attributes that exist then are not
        # serialized into Raft snapshots (the sink is a local callback)
        self._sink = sink
        super().__init__()
        self.members: dict[str, dict] = {}
        self.owners: dict[str, tuple[str, int]] = {}
        self.holders: dict[str, str] = {}
        self.routes: dict[str, set[str]] = {}
        self.next_epoch = 1
        self.cluster_id: str | None = None

    @replicated
    def apply(self, ops: list) -> list:
        results = []
        events = []
        for op in ops:
            try:
                results.append(self._apply_one(op, events))
            except (ValueError, TypeError, IndexError) as err:
                # a malformed operation must not stop the state machine on any node
                results.append(("error", repr(err)))
        if events:
            self._sink(events)
        return results

    def _apply_one(self, op, events: list):
        kind = op[0]
        if kind == "claim":
            _, client_id, node_id, clean = op
            prev = self.owners.get(client_id)
            holder = self.holders.get(client_id)
            epoch = self.next_epoch
            self.next_epoch += 1
            self.owners[client_id] = (node_id, epoch)
            if clean or holder is None:
                self.holders[client_id] = node_id
            prev_node = prev[0] if prev else None
            events.append(("claimed", client_id, node_id, epoch, prev_node, holder, clean))
            return (epoch, holder)
        if kind == "release":
            _, client_id, node_id, epoch = op
            cur = self.owners.get(client_id)
            released = False
            if cur is not None and cur[0] == node_id and cur[1] == epoch:
                del self.owners[client_id]
                released = True
            if self.holders.get(client_id) == node_id:
                del self.holders[client_id]
                released = True
            if released:
                events.append(("released", client_id, node_id, epoch))
            return released
        if kind == "routes":
            _, node_id, added, removed = op
            change_routes(self.routes, node_id, added, removed)
            events.append(("routes", node_id, list(added), list(removed)))
            return None
        if kind == "moved":
            # only for the claim that is still current: a move proposed for an older epoch
            # (a newer claim was applied first) never happens, whatever holds the session
            _, client_id, epoch, from_node, to_node = op
            owner = self.owners.get(client_id)
            ok = self.holders.get(client_id) == from_node and owner is not None and \
                tuple(owner) == (to_node, epoch)
            if ok:
                self.holders[client_id] = to_node
            events.append(("moved", client_id, epoch, from_node, to_node, ok))
            return ok
        if kind == "sync":
            return None  # applied here once every earlier entry is: a read barrier
        if kind == "member":
            _, node_id, info = op
            if info is None:
                self.members.pop(node_id, None)
                # a removed node routes nothing
                change_routes(self.routes, node_id, (), [f for f, nodes in self.routes.items()
                                                         if node_id in nodes])
            else:
                self.members[node_id] = dict(info)
            events.append(("member", node_id, None if info is None else dict(info)))
            return None
        if kind == "forget":
            _, node_id = op
            released = forget_node(self.members, self.owners, self.holders, self.routes,
                                   node_id)
            events.append(("forget", node_id, released))
            return released
        if kind == "init":
            _, cluster_id = op
            if self.cluster_id is None:
                self.cluster_id = str(cluster_id)
                events.append(("init", self.cluster_id))
            return self.cluster_id
        raise ValueError(f"unknown operation {kind!r}")

    def _deserialize(self, data) -> None:
        super()._deserialize(data)
        # a snapshot replaced the whole state (a joining or lagging node): rebuild the view
        self._sink([("reset", {
            "members": {k: dict(v) for k, v in self.members.items()},
            "owners": dict(self.owners),
            "holders": dict(self.holders),
            "routes": {f: set(n) for f, n in self.routes.items()},
            "cluster_id": self.cluster_id,
        })])


class RoutingView:
    """The loop-side mirror of ``RoutingState``: what every read uses.

    ``listeners`` get each event after the view applied it (the cluster member reacts to
    claims, moves and membership changes there)."""

    def __init__(self) -> None:
        self.members: dict[str, dict] = {}
        self.owners: dict[str, tuple[str, int]] = {}
        self.holders: dict[str, str] = {}
        self.routes: dict[str, set[str]] = {}
        self.cluster_id: str | None = None
        self.listeners: list[Callable[[tuple], None]] = []
        self.applied = 0

    def apply_events(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "claimed":
                _, client_id, node_id, epoch, _prev, holder, clean = ev
                self.owners[client_id] = (node_id, epoch)
                if clean or holder is None:
                    self.holders[client_id] = node_id
            elif kind == "released":
                _, client_id, node_id, epoch = ev
                if self.owners.get(client_id) == (node_id, epoch):
                    del self.owners[client_id]
                if self.holders.get(client_id) == node_id:
                    del self.holders[client_id]
            elif kind == "moved":
                _, client_id, epoch, from_node, to_node, ok = ev
                if ok:
                    self.holders[client_id] = to_node
            elif kind == "routes":
                _, node_id, added, removed = ev
                change_routes(self.routes, node_id, added, removed)
            elif kind == "member":
                _, node_id, info = ev
                if info is None:
                    self.members.pop(node_id, None)
                    change_routes(self.routes, node_id, (), [f for f, n in self.routes.items()
                                                             if node_id in n])
                else:
                    self.members[node_id] = info
            elif kind == "forget":
                forget_node(self.members, self.owners, self.holders, self.routes, ev[1])
            elif kind == "init":
                self.cluster_id = ev[1]
            elif kind == "reset":
                state = ev[1]
                self.members = state["members"]
                self.owners = state["owners"]
                self.holders = state["holders"]
                self.routes = state["routes"]
                self.cluster_id = state.get("cluster_id")
            self.applied += 1
            for listener in list(self.listeners):
                try:
                    listener(ev)
                except Exception:  # one listener's bug must not starve the others
                    log.exception("routing listener failed event=%s", kind)

    def owner_of(self, client_id: str) -> tuple[str, int] | None:
        return self.owners.get(client_id)


def raft_conf(secret: str, bind_addr: str, journal: str | None = None,
              compaction_entries: int = 20_000, compaction_seconds: float = 60.0) -> SyncObjConf:
    """The settings measured on this kind of machine (DESIGN.md). ``bind_addr`` is
    "host:port": pysyncobj binds 0.0.0.0 unless told."""
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
    )


class RaftNode:
    """pysyncobj wrapped for asyncio: starts the Raft thread, batches operations, and
    bridges results and events into the loop."""

    def __init__(self, self_addr: str, partners: list[str], secret: str, bind_host: str,
                 view: RoutingView, loop: asyncio.AbstractEventLoop,
                 compaction: tuple[int, float] = (20_000, 60.0)) -> None:
        self.view = view
        self.loop = loop
        self.self_addr = self_addr
        self.state = RoutingState(self._events_from_raft)
        port = self_addr.rsplit(":", 1)[1]
        conf = raft_conf(secret, f"{bind_host}:{port}", compaction_entries=compaction[0],
                         compaction_seconds=compaction[1])
        self.syncobj = SyncObj(self_addr, partners, conf=conf, consumers=[self.state])
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flush_scheduled = False
        self.commits = 0  # batches committed through this node
        self.batches_in_flight = 0

    def _events_from_raft(self, events: list) -> None:  # Raft thread
        self.loop.call_soon_threadsafe(self.view.apply_events, events)

    # -- proposing ---------------------------------------------------------------------------

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
