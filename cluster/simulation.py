"""A deterministic simulation of a Shoal cluster (FoundationDB's and TigerBeetle's method).

In one process, on a simulated clock, N nodes run the real protocol code: the broker
(node/broker.py: sessions, queues, delivery, the journal), the hand-over state machines
and their driver (cluster/claimer.py, cluster/holder.py, cluster/takeover.py), the
forwarding and Raft-event handling of cluster/member.py and the routing rules of
cluster/routing.py. What is simulated around them:

* the clock: an asyncio event loop whose time only moves when nothing is ready (``SimLoop``),
  so every timer, timeout and sleep of the node code runs on simulated time;
* the network (``SimTransport``): per-link order, random delays, partitions that hold
  messages until they heal (the transport retransmits across reconnects), a peer that
  restarted loses what was in flight to its old process and is told to its peers;
* Raft (``SimRaft``): a linearizable log of the same operations, committed after a
  random delay while the proposer is in a majority, applied by each node in order and
  late, with leader changes (stalls, refused proposals) and, for a node that was cut off,
  a catch-up by snapshot (a log compaction): its view is replaced, as pysyncobj does;
* the disk (``SimStore``): the store's records applied to the real ``LiveState`` at
  group commits; a crash loses what was not committed;
* clients: subscribers with persistent sessions that hop between nodes and acknowledge
  (QoS 1 and 2 flows, exactly as a client keeps them across connections), publishers
  that send numbered QoS 1/2 messages and count what was acknowledged.

A seeded scheduler injects node crashes and restarts, partitions and heals, Raft stalls,
and client hops. Then it heals everything and checks (``Checker``): no acknowledged
message lost, no QoS 2 duplicate, per-publisher order, one serving copy per ClientID,
every resume answered session present = 1, every hand-over finished.

    python -m cluster.simulation --seeds 300            # or: make simulate SEEDS=300
    python -m cluster.simulation --seed 17 --trace      # replay one seed, print its trace
    python -m cluster.simulation --seeds 100 --plant barrier-overtakes-forwards

The last line: ``simulation: seeds=N steps=S violations=V trace=<hex digest>``. The same
seed gives the same trace (run with PYTHONHASHSEED=0, as ``make simulate`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import itertools
import logging
import math
import os
import random
import selectors
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import msgpack

from node.broker import Broker
from node.config import Config
from node.mqtt.codes import EXPIRY_NEVER
from node.ownership import ConnectRefused
from node.persist import STORE_COMMIT_TIMEOUT
from node.session.message import Message
from node.session.session import SessionState
from node.store.format import Op
from node.store.state import LiveState, MessageRef, SessionData
from node.topics import SubEntry, SubscriptionTree

from .member import ClusterMember
from .replication import Replication
from .routing import OP_ERRORS, Proposals, RaftUnavailable, RoutingView, Tables, apply
from .takeover import Takeovers
from .transport import PeerUnreachable, RemoteError, RequestTimeout

__all__ = ["Scenario", "World", "run_seed", "run", "PLANTS", "main"]

log = logging.getLogger("shoal.simulation")

#: the least time between two deliveries on one link (they keep their order)
TICK = 1e-6
#: the clock's grain: deliveries, commits and wake-ups fall on it, so that many happen in
#: one loop iteration, as in a busy node (a barrier and a forward in the same iteration)
GRAIN = 0.001


def _grain(t: float) -> float:
    return math.ceil(t / GRAIN) * GRAIN


def _tick(world: "World", t: float) -> float:
    """``t`` on the grain, plus a jitter well under the loop's clock resolution: timers
    due at one tick run in one loop iteration, in a seeded order (asyncio runs timers due
    at the same instant in heap order, which would favour the one scheduled first)."""
    return _grain(t) + world.rng.uniform(0.0, 4e-10)

#: the incarnation whose code runs now (tasks inherit it: a crash cancels its tasks)
CURRENT: contextvars.ContextVar = contextvars.ContextVar("shoal_sim_node", default=None)


# -- the clock ----------------------------------------------------------------------------

class _Selector(selectors.BaseSelector):
    """No I/O: ``select`` moves the simulated clock to the next timer instead of waiting."""

    def __init__(self, loop: "SimLoop") -> None:
        self._loop = loop
        self._map: dict = {}

    def register(self, fileobj, events, data=None):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj)

    def modify(self, fileobj, events, data=None):
        self._map.pop(fileobj, None)
        return self.register(fileobj, events, data)

    def select(self, timeout=None):
        if timeout is None:
            raise SimulationStuck("nothing scheduled: the simulation cannot go on")
        if timeout > 0:
            self._loop.clock += timeout
        return []

    def get_map(self):
        return self._map

    def close(self) -> None:
        self._map.clear()


class SimulationStuck(RuntimeError):
    pass


class SimLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on simulated time: callbacks run in the order asyncio runs them,
    timers fire in time order, and a second of simulated time costs nothing."""

    def __init__(self) -> None:
        self.clock = 0.0
        super().__init__(_Selector(self))
        self.set_task_factory(self._new_task)
        self.tasks_of: dict = {}  # incarnation -> its live tasks

    def time(self) -> float:
        return self.clock

    def _new_task(self, loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        inc = CURRENT.get()
        if inc is not None:
            # (a dict, not a set: iterating objects hashed by address would make the
            # order, and so the run, differ between processes)
            tasks = self.tasks_of.setdefault(inc, {})
            tasks[task] = None
            task.add_done_callback(lambda t: tasks.pop(t, None))
        return task


# -- the disk -------------------------------------------------------------------------------

class SimStore:
    """The store's interface (node/store/engine.py) over the real ``LiveState``: records
    are applied at once to ``live`` (what the running node sees) and to ``disk.durable``
    at the next group commit, which a crash never reaches."""

    def __init__(self, world: "World", disk: "Disk", inc: "Incarnation") -> None:
        self.world = world
        self.disk = disk
        self.inc = inc
        self.live = LiveState()
        self.pending: list[list] = []
        self.submitted = 0
        self.durable = 0
        self.waiters: list[tuple[int, asyncio.Future]] = []
        self.timer = None
        self.next_body = disk.next_body

    def load(self):
        for rec in self.disk.records():
            self.live.apply(rec, 0)
        return self.live.loaded()

    def _append(self, rec: list) -> None:
        self.pending.append(rec)
        self.submitted += 1
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                self.world.rng.uniform(0.0005, 0.004), self._commit)

    def _commit(self) -> None:
        self.timer = None
        if self.inc.dead:
            return  # the crash came first: nothing of it reached the disk
        for rec in self.pending:
            self.disk.durable.apply(rec, 0)
        self.disk.next_body = self.next_body
        self.pending = []
        self.durable = self.submitted
        done = [f for target, f in self.waiters if target <= self.durable]
        self.waiters = [(t, f) for t, f in self.waiters if t > self.durable]
        for fut in done:
            if not fut.done():
                fut.set_result(None)

    def put_session(self, client_id: str, meta: dict) -> None:
        self._append([Op.SESSION, client_id, meta])
        self.live.put_session(client_id, meta, 0)

    def delete_session(self, client_id: str) -> None:
        if client_id in self.live.sessions:
            self._append([Op.DROP_SESSION, client_id])
            self.live.drop_session(client_id)

    def message_ref(self, record: bytes) -> MessageRef:
        ref = MessageRef(self.next_body, record)
        self.next_body += 1
        return ref

    def put_message(self, client_id: str, key: int, entry: list, ref: MessageRef) -> None:
        if client_id not in self.live.sessions:
            raise RuntimeError(f"no session {client_id!r} in the store")
        if ref.id not in self.live.bodies:
            self._append([Op.BODY, ref.id, ref.record])
            self.live.put_body(ref.id, ref.record, 0)
        self._append([Op.MESSAGE, client_id, key, entry, ref.id])
        self.live.put_message(client_id, key, entry, ref.id, 0)

    def update_message(self, client_id: str, key: int, entry: list) -> None:
        self._append([Op.UPDATE, client_id, key, entry])
        self.live.update_message(client_id, key, entry, 0)

    def remove_message(self, client_id: str, key: int) -> None:
        s = self.live.sessions.get(client_id)
        if s is not None and key in s.messages:
            self._append([Op.REMOVE, client_id, key])
            self.live.remove_message(client_id, key)

    def add_incoming(self, client_id: str, pid: int) -> None:
        self._append([Op.IN_ADD, client_id, pid])
        self.live.add_incoming(client_id, pid)

    def remove_incoming(self, client_id: str, pid: int) -> None:
        s = self.live.sessions.get(client_id)
        if s is not None and pid in s.incoming:
            self._append([Op.IN_REMOVE, client_id, pid])
            self.live.remove_incoming(client_id, pid)

    def put_retained(self, topic: str, record: bytes | None) -> None:
        self._append([Op.RETAIN, topic, record])
        self.live.put_retained(topic, record, 0)

    # (reads, as the engine's: the replica side promotes and sweeps copies with them)
    def has_session(self, client_id: str) -> bool:
        return client_id in self.live.sessions

    def session_ids(self) -> list[str]:
        return list(self.live.sessions)

    def session_data(self, client_id: str) -> SessionData | None:
        return self.live.session_data(client_id)

    def durable_future(self):
        if self.durable >= self.submitted:
            return None
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((self.submitted, fut))
        return fut


class Disk:
    """What survives a node's crash: the durable store state (kept as records)."""

    def __init__(self) -> None:
        self.durable = LiveState()
        self.next_body = 1

    def records(self) -> list[list]:
        out = []
        bodies = self.durable.bodies
        for bid, b in bodies.items():
            out.append([Op.BODY, bid, b[0]])
        for cid, s in self.durable.sessions.items():
            out.append([Op.SESSION, cid, s.meta])
            for key, (entry, bid, _size) in sorted(s.messages.items()):
                out.append([Op.MESSAGE, cid, key, entry, bid])
            for pid in sorted(s.incoming):
                out.append([Op.IN_ADD, cid, pid])
        return out


# -- the network ----------------------------------------------------------------------------

def _wire(body):
    """What the other side gets: a msgpack round trip (no shared objects)."""
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False,
                           strict_map_key=False)


class SimTransport:
    """The node-to-node transport's interface (cluster/transport.py) on the simulated
    network."""

    def __init__(self, world: "World", inc: "Incarnation") -> None:
        self.world = world
        self.inc = inc
        self.node_id = inc.node_id
        self.requests: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.info = {}
        self.incarnation = str(inc.number)

    def send(self, peer: str, kind: str, body, force: bool = False) -> bool:
        self.world.net.send(self.inc, peer, ("msg", kind, _wire(body)))
        return True

    async def request(self, peer: str, kind: str, body, timeout: float):
        if not self.world.net.link_up(self.node_id, peer):
            await asyncio.sleep(min(timeout, 0.05))  # (the real one waits for a link)
            raise PeerUnreachable(f"no link to {peer}")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self.requests[rid] = fut
        self.world.net.send(self.inc, peer, ("req", kind, _wire(body), rid))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"{kind} to {peer}: no answer in {timeout:.1f}s") from None
        finally:
            self.requests.pop(rid, None)

    def is_up(self, peer: str) -> bool:
        return self.world.net.link_up(self.node_id, peer)

    def silent_for(self, peer: str) -> float:
        return self.world.net.silent_for(self.node_id, peer)

    def peer_info(self, peer: str):
        inc = self.world.incarnation(peer)
        return None if inc is None else inc.member.info

    def peer_incarnation(self, peer: str) -> str | None:
        known = self.world.net.seen.get((self.node_id, peer))
        return None if known is None else str(known)

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        pass  # every node knows every other one

    def remove_peer(self, peer_id: str) -> None:
        pass

    def fail_requests(self, peer: str) -> None:
        """``peer`` restarted: requests to its old process fail, as the transport's do."""
        for rid, fut in list(self.requests.items()):
            if not fut.done():
                fut.set_exception(PeerUnreachable(f"peer {peer} restarted"))


class Net:
    """Links between nodes: one FIFO queue per direction. A message waits in its queue
    while the link is down (partitioned, or its receiver down) and goes when it is back
    (the transport's retransmit buffer); what was written to a process that then crashed
    is lost with it, what was never written goes to the next process."""

    def __init__(self, world: "World") -> None:
        self.world = world
        self.queues: dict[tuple[str, str], list] = {}  # per link: [at, src, item, written]
        self.pumping: set[tuple[str, str]] = set()
        self.group: dict[str, int] = {}  # node -> partition group (same group: linked)
        self.seen: dict[tuple[str, str], int] = {}  # (a, b): b's incarnation a knows
        #: (a, b) -> since when a hears nothing from b (b down or cut off): the failure
        #: detector's input (a real link carries heartbeats while it is up)
        self.down_since: dict[tuple[str, str], float] = {}

    def mark(self) -> None:
        """Note which links went down or came back (after a crash, start, cut or heal)."""
        now = self.world.loop.time()
        names = sorted(self.world.nodes)
        for a in names:
            for b in names:
                if a == b:
                    continue
                if self.link_up(a, b):
                    self.down_since.pop((a, b), None)
                else:
                    self.down_since.setdefault((a, b), now)

    def silent_for(self, a: str, b: str) -> float:
        since = self.down_since.get((a, b))
        return 0.0 if since is None else self.world.loop.time() - since

    def link_up(self, a: str, b: str) -> bool:
        w = self.world
        return w.alive(a) and w.alive(b) and self.group.get(a, 0) == self.group.get(b, 0)

    def delay(self) -> float:
        r = self.world.rng.random()
        if r < 0.02:
            return self.world.rng.uniform(0.02, 0.2)  # a slow moment on the link
        return self.world.rng.uniform(0.0002, 0.003)

    def send(self, src: "Incarnation", dst: str, item) -> None:
        if src.dead:
            return
        key = (src.node_id, dst)
        queue = self.queues.setdefault(key, [])
        up = self.link_up(src.node_id, dst)
        # strictly after the link's previous message: asyncio runs timers due at the
        # same instant in no particular order
        last = queue[-1][0] if queue else 0.0
        queue.append([max(last + TICK, _grain(self.world.loop.time() + self.delay())), src,
                      item, up])
        self._pump_later(key)

    def _pump_later(self, key) -> None:
        queue = self.queues.get(key)
        if not queue or key in self.pumping or not self.link_up(*key):
            return
        self.pumping.add(key)
        self.world.loop.call_at(max(queue[0][0], self.world.loop.time()), self._pump, key)

    def _pump(self, key) -> None:
        self.pumping.discard(key)
        queue = self.queues.get(key)
        loop = self.world.loop
        while queue and self.link_up(*key) and queue[0][0] <= loop.time():
            _at, src, item, _written = queue.pop(0)
            if src.dead:
                continue  # (it was in the old process's buffer)
            self.world.incarnation(key[1]).receive(src, item)
        self._pump_later(key)

    def crashed(self, node: str) -> None:
        """What was written to ``node``'s links before the crash is gone with it (both
        ways); what waited for a link stays for its next process."""
        for key, queue in self.queues.items():
            if key[0] == node:
                queue.clear()
            elif key[1] == node:
                queue[:] = [m for m in queue if not m[3]]

    def release(self) -> None:
        """Links that are up again send what waited, in order, from now on; peers learn
        of restarts."""
        loop = self.world.loop
        for key in sorted(self.queues):
            queue = self.queues[key]
            if queue and self.link_up(*key):
                at = loop.time()
                for m in queue:
                    at = max(at + TICK, m[0])
                    m[0], m[3] = at, True
                self._pump_later(key)
        for a in sorted(self.world.nodes):
            for b in sorted(self.world.nodes):
                if a != b and self.link_up(a, b):
                    self.world.link_check(a, b)


# -- Raft ---------------------------------------------------------------------------------

class SimRaft(Proposals):
    """``RaftNode``'s interface (cluster/routing.py) over the simulated log."""

    def __init__(self, world: "World", inc: "Incarnation") -> None:
        self.world = world
        self.inc = inc
        self.loop = world.loop
        self._pending: list = []
        self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self.world.raft.propose(self.inc, batch)

    def status(self) -> dict:
        raft = self.world.raft
        return {"has_quorum": raft.has_quorum(self.inc.node_id), "leader": "sim",
                "is_leader": raft.leader() == self.inc.node_id}


@dataclass
class Entry:
    ops: list
    results: list
    proposer: "Incarnation"
    futures: list


class Log:
    """The Raft log: one linearizable sequence of batches, applied by every node in order."""

    COMPACT_LAG = 12  # a node this far behind may get a snapshot instead of the entries

    def __init__(self, world: "World") -> None:
        self.world = world
        self.entries: list[Entry] = []
        self.tables = Tables()  # the state after every committed entry
        self.snapshots: dict[int, Tables] = {}
        self.stall_until = 0.0
        self.commit_at = 0.0

    def has_quorum(self, node: str) -> bool:
        w = self.world
        if not w.alive(node):
            return False
        group = w.net.group.get(node, 0)
        linked = sum(1 for n in w.nodes if w.alive(n) and w.net.group.get(n, 0) == group)
        return linked * 2 > len(w.nodes)

    def leader(self) -> str | None:
        """The node that leads: the first one (by name) of the majority side, if any."""
        for n in sorted(self.world.nodes):
            if self.has_quorum(n):
                return n
        return None

    def propose(self, inc: "Incarnation", batch: list) -> None:
        w = self.world
        if inc.dead:
            return  # (a timer of a crashed process: its proposals never left it)
        loop = w.loop
        now = loop.time()
        if not self.has_quorum(inc.node_id) or (now < self.stall_until and w.rng.random() < 0.3):
            # no leader reachable, or one being elected: refused after a moment
            loop.call_at(now + w.rng.uniform(0.02, 0.2), _fail_all, [f for _, f in batch],
                         RaftUnavailable("no leader"))
            return
        at = _grain(max(now, self.stall_until, self.commit_at) + w.rng.uniform(0.0005, 0.006))
        at = max(at, self.commit_at + TICK)
        self.commit_at = at
        loop.call_at(at, self._commit, inc, batch)

    def _commit(self, inc: "Incarnation", batch: list) -> None:
        w = self.world
        if not any(self.has_quorum(n) for n in w.nodes):
            self.world.loop.call_at(w.loop.time() + 0.05, self._commit, inc, batch)
            return
        ops, results = [], []
        for op, _fut in batch:
            try:
                result = apply(self.tables, op)[0]
            except OP_ERRORS as err:
                result = ("error", repr(err))
            ops.append(op)
            results.append(result)
        self.entries.append(Entry(ops, results, inc, [f for _, f in batch]))
        if len(self.entries) % 8 == 0:
            self.snapshots[len(self.entries)] = self.tables.copy()
        w.note(f"commit {len(self.entries)} {inc.node_id} {ops}")
        for n in sorted(w.nodes):
            w.apply_pump(n)


def _fail_all(futures: list, exc: Exception) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


# -- a node ---------------------------------------------------------------------------------

class SimMember(ClusterMember):
    """The real ClusterMember's forwarding, Raft-event handling and restart logic, with
    the simulated transport and Raft (its own ``__init__`` opens sockets: not called)."""

    def __init__(self, world: "World", inc: "Incarnation", broker: Broker, config) -> None:
        # pylint: disable=super-init-not-called
        self.world = world
        self.broker = broker
        self.config = config
        self.node_id = inc.node_id
        self.loop = world.loop
        self.view = RoutingView()
        self.view.listeners.append(self._on_event)
        self._event_handlers = self._event_table()
        self.remote = SubscriptionTree()
        self.transport = SimTransport(world, inc)
        self.raft = SimRaft(world, inc)
        self.takeovers = world.plants.takeovers(self)
        self.replication = Replication(self)
        if world.scenario.failover:
            # replicas (the tap on the journal, copies on their own simulated disk), the
            # leader's failure detector and promotion: cluster/replication.py as it runs
            copies = SimStore(world, world.replica_disks.setdefault(inc.node_id, Disk()), inc)
            copies.load()
            self.replication.open(copies)
        self._waiting_forwards = {}
        self.view.after_apply.append(self._release_waiting_forwards)
        self._message_handlers, self._request_handlers = self._handler_tables()
        self.snapshot_chunks = {}
        self.info = {"transport": f"{inc.node_id}:1", "raft": f"{inc.node_id}:2"}
        self.peer_stats = {}
        self.retained_ts = {}
        self._group_cursor = 0
        self.forwarded = 0
        self.forward_dropped = 0
        self.forward_stale = 0
        self._dropping_to = set()
        self._outbox = {}
        self.confirm_forwards = True
        self._forward_waits = []
        self._held_into = None
        self.forward_position = None
        self._confirms = {}
        self._redone = {}
        self._fenced_at = None
        self._confirm_ids = itertools.count(inc.number << 32)  # (unique per process)
        self._outbox_scheduled = False
        self.received = 0
        self.leaving = False
        self.ready = True
        self.caught_up = False
        self.unjudged = 0
        self.membership = SimpleNamespace(save_soon=lambda: None, phase="member")

    def _drop_peer_later(self, node_id: str) -> None:
        pass


class Incarnation:
    """One process of a node: its broker, member and store; ``dead`` once it crashed."""

    def __init__(self, world: "World", node_id: str, number: int) -> None:
        self.world = world
        self.node_id = node_id
        self.number = number
        self.dead = False
        self.serving = False  # clients are let in (a restarted node catches up first)
        self.context = contextvars.copy_context()
        self.context.run(CURRENT.set, self)
        self.broker: Broker | None = None
        self.member: SimMember | None = None
        self.store: SimStore | None = None

    def run(self, fn, *args):
        """Run node code as this process (its tasks belong to it)."""
        if self.dead:
            return None
        return self.context.run(fn, *args)

    def spawn(self, coro) -> asyncio.Task:
        return self.context.run(asyncio.ensure_future, coro)

    def receive(self, src: "Incarnation", item) -> None:
        kind = item[0]
        member = self.member
        if kind == "msg":
            self.run(member._on_message, src.node_id, item[1], item[2])
        elif kind == "req":
            self.spawn(self._serve(src, item[1], item[2], item[3]))
        else:  # "resp"
            _, rid, ok, result = item
            fut = member.transport.requests.get(rid)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(result)
                else:
                    fut.set_exception(RemoteError(result))

    async def _serve(self, src: "Incarnation", kind: str, body, rid: int) -> None:
        try:
            result, ok = await self.member._on_request(src.node_id, kind, body), True
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            result, ok = repr(err), False
        if src.dead or self.dead:
            return  # the requester restarted: nobody waits for this
        self.world.net.send(self, src.node_id, ("resp", rid, ok, _wire(result)))


# -- clients --------------------------------------------------------------------------------

class Connection:
    """The node side of a client's connection (what node/server.py's MqttProtocol is to the
    broker): frames go to the client after a delay, in order; acknowledgements may wait
    for store commits, in order (``ack_after``)."""

    def __init__(self, world: "World", inc: Incarnation, client: "Subscriber") -> None:
        self.world = world
        self.inc = inc
        self.client = client
        self.session = None
        self.writable = True
        self.closed = False
        self.last = 0.0
        self.acks: list = []

    def publish_frame(self, msg, qos, retain, dup, pid, sub_ids, now):
        return ("publish", pid, qos, dup, msg.payload)

    def write(self, frame) -> None:
        if self.closed or self.inc.dead:
            return
        loop = self.world.loop
        at = max(self.last + TICK, loop.time() + self.world.rng.uniform(0.0001, 0.002))
        self.last = at
        loop.call_at(at, self.client.on_frame, self, frame)

    def write_pubrel(self, pid: int, reason: int = 0) -> None:
        self.write(("pubrel", pid))

    def write_after(self, wait, frame) -> None:
        self.ack_after(wait, self.write, frame)

    def ack_after(self, wait, fn, *args) -> None:
        self.acks.append((wait, fn, args))
        if wait is not None:
            wait.add_done_callback(lambda _f: self.inc.run(self._acks_ready))
        self._acks_ready()

    def _acks_ready(self) -> None:
        while self.acks:
            wait, fn, args = self.acks[0]
            if wait is not None and not wait.done():
                return
            self.acks.pop(0)
            if wait is None or (not wait.cancelled() and wait.exception() is None):
                fn(*args)

    def kick(self, reason: int) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.world.loop
        at = max(self.last + TICK, loop.time() + 0.001)
        loop.call_at(at, self.client.on_closed, self)


class Subscriber:
    """A client with a persistent session (Clean Session 0 / expiry never) on topic
    ``t/<client_id>``: it hops between nodes, acknowledges what it gets (keeping its QoS 2
    state across connections, as a client must) and records every delivery."""

    def __init__(self, world: "World", client_id: str) -> None:
        self.world = world
        self.client_id = client_id
        self.topic = f"t/{client_id}"
        self.conn: Connection | None = None
        self.had_session = False
        self.delivered: list[tuple[str, int]] = []  # first deliveries, in order
        self.seen: set[tuple[str, int]] = set()
        self.qos2_open: dict[int, tuple[str, int]] = {}  # pid -> message, until PUBREL
        self.connects = 0
        self.refused = 0

    async def connect(self, node: str) -> bool:
        w = self.world
        inc = w.incarnation(node)
        if inc is None or not inc.serving:
            return False  # (connection refused)
        old = self.conn
        self.conn = None
        if old is not None:
            old.closed = True  # the client dropped it: what the node still sends is lost
        conn = Connection(w, inc, self)
        w.note(f"connect {self.client_id} -> {node}")
        result = await _wait_as(inc, self._connect_on(inc, conn))
        if result is None:
            self.refused += 1
            w.note(f"refused {self.client_id} on {node}")
            return False
        present = result
        self.connects += 1
        w.note(f"connack {self.client_id} on {node} present={int(present)}")
        if self.had_session and not present:
            w.violation(f"resume of {self.client_id} on {node} answered session present 0")
        if not present:
            self.qos2_open.clear()  # a new session: the old flows are gone
        self.had_session = True
        self.conn = conn
        w.check_single_owner(self.client_id, node)
        return True

    async def _connect_on(self, inc: Incarnation, conn: Connection):
        """CONNECT on ``inc``, as node/server.py and node/session/on_connect.py run it;
        None when refused, else session present."""
        broker, member = inc.broker, inc.member
        try:
            claim = await member.claim(self.client_id, False)
        except ConnectRefused:
            return None
        session, present = broker.open_session(self.client_id, False, EXPIRY_NEVER, 5, claim)
        broker.persist(session)
        if claim.confirm is not None:
            verdict = await broker.confirm_claim(claim, session)
            if verdict and session.state is SessionState.ENDED:
                verdict = False  # (as node/server.py)
            if not verdict:
                if verdict is None:
                    broker.orphaned(session)
                return None
        if conn.closed or inc.dead:
            broker.orphaned(session)
            return None
        conn.session = session
        broker.clients.add(conn)
        session.attach(conn, 20)  # CONNACK
        if not present and not session.subscriptions:
            # SUBSCRIBE, as node/session/on_subscribe.py: SUBACK once the routes are
            # known everywhere and the subscription is on disk
            mark = broker.store_mark()
            entry = SubEntry(self.client_id, self.topic, 2)
            broker.subscribe(session, entry, self.topic)
            broker.persist(session)
            waits = [w for w in (broker.commit_wait(mark), *broker.take_route_waits())
                     if w is not None]
            try:
                if waits:
                    await asyncio.wait_for(broker.all_done(*waits),
                                           max(STORE_COMMIT_TIMEOUT, 5.0))
            except (asyncio.TimeoutError, RaftUnavailable):
                return None  # no SUBACK: the client tries again with a new connection
            if conn.closed or session.client is not conn:
                return None
        return present

    def on_frame(self, conn: Connection, frame) -> None:
        if conn is not self.conn:
            return  # a connection this client dropped
        w = self.world
        if frame[0] == "pubrel":
            pid = frame[1]
            self.qos2_open.pop(pid, None)
            self._ack(conn, "on_pubcomp", pid)
            return
        _, pid, qos, dup, payload = frame
        pub, seq = payload.decode().split(":")
        mid = (pub, int(seq))
        w.note(f"got {self.client_id} {pub}:{seq} pid={pid} qos={qos} dup={int(dup)} "
               f"from {conn.inc.node_id}")
        if qos == 2:
            if pid in self.qos2_open:
                if self.qos2_open[pid] != mid:
                    w.violation(f"{self.client_id}: QoS 2 packet id {pid} reused for {mid} "
                                f"while {self.qos2_open[pid]} is open")
                self._ack(conn, "on_pubrec", pid, 0)
                return
            self.qos2_open[pid] = mid
            if mid in self.seen and w.qos_of.get(mid) == 2:
                w.violation(f"{self.client_id}: QoS 2 message {mid} delivered twice")
        self._record(mid)
        self._ack(conn, "on_puback" if qos == 1 else "on_pubrec", pid, *(() if qos == 1 else (0,)))

    def _record(self, mid: tuple[str, int]) -> None:
        if mid in self.seen:
            return
        self.seen.add(mid)
        self.delivered.append(mid)

    def _ack(self, conn: Connection, method: str, pid: int, *args) -> None:
        w = self.world
        delay = w.rng.uniform(0.0002, 0.003)

        def send() -> None:
            session = conn.session
            if conn.closed or conn.inc.dead or session is None or session.client is not conn:
                return
            broker = conn.inc.broker
            mark = broker.store_mark()
            result = getattr(session, method)(pid, *args)
            if method == "on_pubrec" and result:
                # as node/session/on_publish.py: PUBREL once the stage is on disk
                conn.ack_after(broker.commit_wait(mark), conn.write_pubrel, pid)
        w.loop.call_at(w.loop.time() + delay, conn.inc.run, send)

    def on_closed(self, conn: Connection) -> None:
        if conn is self.conn:
            self.conn = None
            self.world.note(f"kicked {self.client_id} from {conn.inc.node_id}")

    def disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.closed = True
        inc = conn.inc
        self.world.note(f"disconnect {self.client_id} from {inc.node_id}")
        inc.run(inc.broker.connection_lost, conn, conn.session, False)


async def _wait_as(inc: Incarnation, coro):
    """Run ``coro`` as ``inc``'s code; None if it crashes meanwhile."""
    task = inc.spawn(coro)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            return None
        raise


# -- the world ------------------------------------------------------------------------------

@dataclass
class Scenario:
    nodes: int = 3
    subscribers: int = 2
    publishers: int = 3
    messages: int = 40  # per publisher
    fault_time: float = 12.0  # seconds of simulated time with faults
    settle_time: float = 90.0  # seconds at most to heal and drain
    crashes: bool = True
    partitions: bool = True
    stalls: bool = True
    #: a restarted process does not know which processes of its peers came before (as
    #: the real transport). Off (``--lenient-restarts``): a node's restart is told to a
    #: peer that was itself restarted meanwhile too (the model the simulation began with)
    strict_restarts: bool = True
    #: subscribers hop between nodes every few dozen milliseconds (a flapping client:
    #: hand-overs overlap, and one is taken back while another still waits)
    flapping: bool = False
    #: sessions replicated (``session_replicas`` 1), the leader's failure detector on:
    #: crashes and cuts long enough to get a node declared down (its sessions promoted,
    #: then it comes back fenced), and one node lost for good late in the run
    failover: bool = False


class Plants:
    """Bugs put back on purpose (``--plant``), to show the checks catch them."""

    def __init__(self, name: str | None) -> None:
        if name is not None and name not in PLANTS:
            raise ValueError(f"unknown plant {name!r}: one of {', '.join(PLANTS)}")
        self.name = name

    def takeovers(self, member: SimMember) -> Takeovers:
        if self.name == "barrier-overtakes-forwards":
            return _BarrierFirst(member)
        if self.name == "lost-late-messages":
            return _LateLost(member)
        if self.name == "node-behind-compaction":
            return _NoSwitched(member)
        return Takeovers(member)


class _FlushSkipped:
    def __init__(self, member) -> None:
        self._member = member

    def __getattr__(self, name):
        return getattr(self._member, name)

    def flush_outbox(self) -> None:
        pass


class _BarrierFirst(Takeovers):
    """The barrier leaves before the forwards still waiting in the outbox (the bug the
    fault run found first: the old holder ended the session before they arrived)."""

    def on_moved(self, *args, **kwargs) -> None:
        real, self.member = self.member, _FlushSkipped(self.member)
        try:
            super().on_moved(*args, **kwargs)
        finally:
            self.member = real


class _LateLost(Takeovers):
    """A hand-over from here superseded by taking the session back drops the late
    messages it still held (the old code replaced the hand-over, losing them)."""

    def _take_back_late(self, gate, session) -> None:
        out = self.outgoing.get(gate.machine.client_id)
        if out is None or out.copy is session:
            return
        del self.outgoing[gate.machine.client_id]
        self._cancel_timer(out)
        out.supersede()


class _NoSwitched(Takeovers):
    """A node whose table was replaced by a snapshot sends no ``switched``: the
    hand-overs waiting for its barriers wait until it restarts."""

    def on_reset(self) -> None:
        pass


PLANTS = ("barrier-overtakes-forwards", "lost-late-messages", "node-behind-compaction")


class World:
    def __init__(self, seed: int, scenario: Scenario | None = None,
                 plant: str | None = None, keep_trace: bool = False) -> None:
        self.seed = seed
        self.scenario = scenario or Scenario()
        self.rng = random.Random(seed)
        self.loop = SimLoop()
        self.plants = Plants(plant)
        self.digest = hashlib.sha256()
        self.steps = 0
        self.lines: list[str] | None = [] if keep_trace else None
        self.violations: list[str] = []
        self.net = Net(self)
        self.raft = Log(self)
        self.nodes: dict[str, Incarnation | None] = {}
        self.disks: dict[str, Disk] = {}
        self.replica_disks: dict[str, Disk] = {}
        self.lost: str | None = None  # the node crashed for good (``failover``)
        self.applied: dict[str, int] = {}
        self.applying: set[str] = set()
        self.apply_paused: dict[str, float] = {}
        self.numbers = itertools.count(1)
        self.config = self._config()
        self.subscribers: list[Subscriber] = []
        self.acked: set[tuple[str, int]] = set()
        self.qos_of: dict[tuple[str, int], int] = {}
        self.to_of: dict[tuple[str, int], str] = {}  # message -> its subscriber
        self.forced = 0

    @staticmethod
    def _config(node_id: str = "sim"):
        return Config(node_id=node_id, durability="safe")

    # -- trace ---------------------------------------------------------------------------

    def note(self, text: str) -> None:
        line = f"{self.loop.time():.6f} {text}"
        self.digest.update(line.encode() + b"\n")
        self.steps += 1
        if self.lines is not None:
            self.lines.append(line)

    def violation(self, text: str) -> None:
        self.note(f"VIOLATION {text}")
        self.violations.append(f"t={self.loop.time():.3f} {text}")

    # -- nodes ---------------------------------------------------------------------------

    def alive(self, node: str) -> bool:
        inc = self.nodes.get(node)
        return inc is not None and not inc.dead

    def incarnation(self, node: str) -> Incarnation | None:
        inc = self.nodes.get(node)
        return inc if inc is not None and not inc.dead else None

    def start_node(self, node: str, first: bool) -> Incarnation:
        inc = Incarnation(self, node, next(self.numbers))
        self.nodes[node] = inc
        self.net.mark()
        if self.scenario.strict_restarts:
            for key in [k for k in self.net.seen if k[0] == node]:
                del self.net.seen[key]  # a new process knows no other process yet
        disk = self.disks.setdefault(node, Disk())
        config = self._config(node)
        broker = inc.broker = inc.run(Broker, config)
        store = inc.store = SimStore(self, disk, inc)
        inc.run(lambda: broker.attach_store(store, store.load()))
        member = inc.member = inc.run(SimMember, self, inc, broker, config)
        broker.attach_cluster(member)
        # as ClusterMember.start, before any link
        inc.run(member.takeovers.restore_gates)
        inc.run(member.takeovers.restore_handed)
        # the routing table as Raft has it now (a restarted node replays it first: its
        # events are history, not news)
        if first:
            member.view.tables = self.raft.tables.copy()
            self.applied[node] = len(self.raft.entries)
        else:
            # the Raft log lives in memory: a restarted node gets the leader's snapshot of
            # the table once it reaches a majority (a Replaced event: its switch goes out,
            # see Takeovers.on_reset); until then its table is empty
            self.applied[node] = None
        member._rebuild_remote()
        self.note(f"start {node} #{inc.number} sessions={sorted(broker.sessions)}")
        inc.run(broker.start)
        if first:
            member.caught_up = inc.serving = True
            inc.spawn(member._reconcile_loop())
            inc.run(member.replication.adopt_promoted)
            if self.scenario.failover:
                inc.spawn(member.replication._run())
        else:
            inc.spawn(self._restarted(inc))
            self.apply_pump(node)
        return inc

    async def _restarted(self, inc: Incarnation) -> None:
        """ClusterMember.start's last steps: replay the log up to now (a ``sync``
        committed), keep the stored sessions the table says are held here, then serve."""
        member = inc.member
        member._tasks = []
        if self.scenario.failover:
            # as membership's ``_take_seat``: the node announces itself (a node declared
            # down is up again from that entry on)
            for _attempt in range(1000):
                try:
                    await member.raft.run(("member", inc.node_id, member.info), 5.0)
                    break
                except RaftUnavailable:
                    await asyncio.sleep(0.2)
        await member._judge_stored_sessions()
        member.replication.adopt_promoted()
        member._release_waiting_forwards()
        for task in member._tasks:
            self.loop.tasks_of.setdefault(inc, {})[task] = None
        inc.serving = True
        inc.spawn(member._reconcile_loop())
        if self.scenario.failover:
            inc.spawn(member.replication._run())
        self.note(f"restarted {inc.node_id} kept={sorted(inc.broker.sessions)}")

    def serving(self) -> list[str]:
        return [n for n in sorted(self.nodes) if self.alive(n) and self.nodes[n].serving]

    def crash(self, node: str) -> None:
        inc = self.nodes.get(node)
        if inc is None or inc.dead:
            return
        self.note(f"crash {node} #{inc.number}")
        inc.dead = True
        self.net.crashed(node)
        self.net.mark()
        for task in list(self.loop.tasks_of.pop(inc, ())):
            task.cancel()
        for sub in self.subscribers:
            if sub.conn is not None and sub.conn.inc is inc:
                conn = sub.conn
                conn.closed = True
                self.loop.call_soon(sub.on_closed, conn)

    def link_check(self, a: str, b: str) -> None:
        """``a`` has a link to ``b`` again: a new process of ``b`` is told to ``a``."""
        inc_b = self.nodes[b]
        known = self.net.seen.get((a, b))
        self.net.seen[(a, b)] = inc_b.number
        if known == inc_b.number:
            return
        inc_a = self.nodes[a]
        if known is not None:
            self.note(f"peer restarted {a} sees {b} #{inc_b.number}")
            inc_a.run(inc_a.member.transport.fail_requests, b)
            inc_a.run(inc_a.member._on_peer_restarted, b)
        inc_a.run(inc_a.member.takeovers.on_peer_process, b)

    # -- Raft apply ----------------------------------------------------------------------

    def apply_pump(self, node: str) -> None:
        if node in self.applying or not self.raft.has_quorum(node):
            return
        applied = self.applied[node]
        if applied is not None and applied >= len(self.raft.entries):
            return
        self.applying.add(node)
        self.loop.call_at(_tick(self, self.loop.time() + self.rng.uniform(0.0, 0.004)),
                          self._apply_next, node, self.nodes[node])

    def _apply_next(self, node: str, inc: Incarnation) -> None:
        self.applying.discard(node)
        paused = self.apply_paused.get(node, 0.0)
        if paused > self.loop.time():
            # a slow node (a GC pause, a slow disk): it forwards with its old table meanwhile
            self.applying.add(node)
            self.loop.call_at(_grain(paused), self._apply_next, node, inc)
            return
        if inc.dead or self.nodes[node] is not inc or not self.raft.has_quorum(node):
            if self.nodes[node] is not inc:
                self.apply_pump(node)  # (scheduled for a process that died: the new one's)
            return
        entries = self.raft.entries
        i = self.applied[node]
        if i is None:
            # a new process: the leader's snapshot of the table
            self.applied[node] = len(entries)
            self.note(f"snapshot {node} at {len(entries)} (new process)")
            inc.run(inc.member.view.apply_ops, self.raft.tables.copy())
            self.apply_pump(node)
            return
        behind = len(entries) - i
        snaps = [n for n in self.raft.snapshots if n > i]
        if behind >= Log.COMPACT_LAG and snaps and self.rng.random() < 0.5:
            # compacted away: the node gets a snapshot of the table instead
            n = max(snaps)
            self.applied[node] = n
            self.note(f"snapshot {node} at {n} (was {i})")
            inc.run(inc.member.view.apply_ops, self.raft.snapshots[n].copy())
        else:
            e = entries[i]
            self.applied[node] = i + 1
            inc.run(inc.member.view.apply_ops, e.ops)
            if e.proposer is inc:
                for fut, r in zip(e.futures, e.results):
                    if not fut.done():
                        if isinstance(r, tuple) and r and r[0] == "error":
                            fut.set_exception(ValueError(r[1]))
                        else:
                            fut.set_result(r)
        self.apply_pump(node)

    # -- invariants during the run -------------------------------------------------------

    def check_single_owner(self, client_id: str, node: str) -> None:
        """Whoever knows of a newer claim than its own copy's must not serve it."""
        for other in sorted(self.nodes):
            inc = self.incarnation(other)
            if inc is None or other == node:
                continue
            s = inc.broker.sessions.get(client_id)
            if s is None or s.state is not SessionState.ONLINE:
                continue
            owner = inc.member.view.owners.get(client_id)
            if owner is not None and owner[0] != other and owner[1] > s.epoch:
                self.violation(f"{client_id} served on {other} (epoch {s.epoch}) after "
                               f"{owner[0]}'s claim {owner[1]} applied there")

    # -- the run -------------------------------------------------------------------------

    async def main(self) -> None:
        sc = self.scenario
        names = [f"n{i + 1}" for i in range(sc.nodes)]
        for op in [("member", n, {"transport": f"{n}:1", "raft": f"{n}:2"}) for n in names]:
            apply(self.raft.tables, op)
        for n in names:
            self.start_node(n, True)
        for a in names:
            for b in names:
                if a != b:
                    self.net.seen[(a, b)] = self.nodes[b].number
        self.subscribers = [Subscriber(self, f"s{i + 1}") for i in range(sc.subscribers)]
        for sub in self.subscribers:
            for _attempt in range(50):
                if await sub.connect(self.rng.choice(names)):
                    break
                await asyncio.sleep(0.1)
        await self._routes_everywhere()
        end_faults = self.loop.time() + sc.fault_time
        tasks = [asyncio.ensure_future(self._publisher(f"p{i + 1}", end_faults))
                 for i in range(sc.publishers)]
        tasks += [asyncio.ensure_future(self._hopper(sub, end_faults))
                  for sub in self.subscribers]
        tasks.append(asyncio.ensure_future(self._nemesis(end_faults)))
        await asyncio.gather(*tasks)
        await self._settle()

    async def _routes_everywhere(self) -> None:
        for _ in range(500):
            if all(all(self.nodes[n].member.view.routes.get(s.topic) for n in self.nodes)
                   for s in self.subscribers):
                return
            await asyncio.sleep(0.01)
        raise SimulationStuck("the subscribers' routes never reached every node")

    async def _publisher(self, name: str, until: float) -> None:
        rng = self.rng
        inc = None
        connection = 0
        for seq in range(1, self.scenario.messages + 1):
            if self.loop.time() >= until:
                break
            at = _grain(self.loop.time() + rng.uniform(0.005, 0.15))
            await asyncio.sleep(at - self.loop.time() - GRAIN / 2)
            if inc is None or inc.dead or rng.random() < 0.05:
                live = self.serving()
                if not live:
                    continue
                inc = self.nodes[rng.choice(live)]
                # CONNECT (clean start): the ClientID is claimed through Raft, so a node
                # that cannot reach a majority takes no new publisher
                if await _wait_as(inc, self._claim_publisher(inc, name)) is None:
                    inc = None
                    continue
                connection += 1  # MQTT orders messages per connection, not per client
            sub = rng.choice(self.subscribers)
            qos = rng.choice((1, 2))
            mid = (f"{name}.{connection}", seq)
            self.qos_of[mid] = qos
            self.to_of[mid] = sub.client_id
            msg = Message(sub.topic, f"{mid[0]}:{seq}".encode(), qos, False, None, None, name)
            # the PUBLISH is read in a plain callback on the clock's grain, as a socket's
            # data is: in the same loop iteration as Raft's applies due then
            self.loop.call_at(max(_tick(self, at), self.loop.time()), self._publish_now, inc,
                              msg, mid)
            await asyncio.sleep(max(0.0, at - self.loop.time()))

    @staticmethod
    async def _claim_publisher(inc: Incarnation, name: str):
        try:
            claim = inc.member.claim(name, True)
            return await claim if not hasattr(claim, "epoch") else claim
        except ConnectRefused:
            return None

    def _publish_now(self, inc: Incarnation, msg: Message, mid) -> None:
        """PUBLISH on ``inc`` as on_publish runs it: the PUBACK / PUBREC waits for the
        local commit and for the receiving nodes' confirmations."""
        if inc.dead:
            return
        self.note(f"publish {mid[0]}:{mid[1]} on {inc.node_id} for {self.to_of[mid]}")
        broker = inc.broker
        mark = inc.run(broker.store_mark)
        inc.run(broker.publish, msg)
        remote = inc.run(inc.member.take_forward_waits)
        wait = inc.run(broker.commit_wait, mark)
        if remote:
            wait = inc.run(broker.all_done, wait, *remote)
        inc.spawn(self._acked_when(inc, wait, mid))

    async def _acked_when(self, inc: Incarnation, wait, mid) -> None:
        if wait is not None:
            try:
                await asyncio.wait_for(wait, STORE_COMMIT_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                return
        if not inc.dead:
            self.acked.add(mid)
            self.note(f"acked {mid[0]}:{mid[1]} on {inc.node_id} for {self.to_of[mid]}")

    async def _hopper(self, sub: Subscriber, until: float) -> None:
        rng = self.rng
        while self.loop.time() < until:
            await asyncio.sleep(rng.uniform(0.01, 0.15) if self.scenario.flapping
                                else rng.uniform(0.05, 1.2))
            if sub.conn is not None and rng.random() < 0.3:
                sub.disconnect()
                continue
            live = self.serving()
            if live:
                await sub.connect(rng.choice(live))

    async def _nemesis(self, until: float) -> None:
        sc, rng = self.scenario, self.rng
        names = sorted(self.nodes)
        while True:
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            if self.loop.time() >= until:
                return
            r = rng.random()
            dead = [n for n in names if not self.alive(n)]
            # (failover: down long enough, at times, to be declared down)
            longest = 6.0 if sc.failover else None
            if sc.failover and self.lost is None and not dead and \
                    not any(self.net.group.values()) and \
                    self.loop.time() >= until - sc.fault_time * 0.4:
                self._lose(names)
            elif self.lost is not None:
                pass  # (one node fewer: another crash or cut would leave no majority)
            elif sc.crashes and r < 0.25 and not dead:
                node = rng.choice(names)
                self.crash(node)
                self.loop.call_at(self.loop.time() + rng.uniform(0.1, longest or 2.5),
                                  self.restart, node)
            elif sc.partitions and r < 0.55 and not any(self.net.group.values()):
                node = rng.choice(names)
                self.net.group = {node: 1}
                self.net.mark()
                self.note(f"partition {node} | rest")
                self.loop.call_at(self.loop.time() + rng.uniform(0.1, longest or 3.0),
                                  self.heal)
            elif sc.stalls and r < 0.7:
                self.raft.stall_until = self.loop.time() + rng.uniform(0.1, 1.2)
                self.note(f"raft stall until {self.raft.stall_until:.3f}")
            elif sc.stalls and r < 0.85:
                node = rng.choice(names)
                # (a flapping client meets slow nodes longer than a hand-over waits)
                self.apply_paused[node] = self.loop.time() + rng.uniform(
                    0.1, 6.0 if sc.flapping else 1.5)
                self.note(f"slow {node} until {self.apply_paused[node]:.3f}")

    def _lose(self, names: list[str]) -> None:
        """Crash a node for good, once every session it holds has an in-sync replica (the
        guarantee's precondition, as the fault run's ``lose``)."""
        node = self.rng.choice(names)
        inc = self.nodes[node]
        under = inc.run(inc.member.replication.under_replicated)
        # (as the table has it too: a session promoted to a node that has not installed
        # it yet has no replica until that node seeds one)
        t = self.raft.tables
        under += sum(1 for sub in self.subscribers
                     if t.holders.get(sub.client_id) == node and not any(
                         self.alive(r) and r not in t.down
                         for r in t.replicas.get(sub.client_id, ())))
        if under:
            self.note(f"not losing {node}: {under} sessions under-replicated")
            return
        self.lost = node
        self.note(f"lose {node}")
        self.crash(node)
        self.loop.call_at(self.loop.time() + self.rng.uniform(4.0, 8.0), self._forget, node)

    def _forget(self, node: str) -> None:
        """The operator's ``shoal cluster forget`` of the lost node, once it was declared
        down (README: hand-overs wait for its barrier until then)."""
        if node not in self.raft.tables.down:
            self.loop.call_at(self.loop.time() + 1.0, self._forget, node)
            return
        inc = self.incarnation(self.raft.leader() or "")
        if inc is None:
            self.loop.call_at(self.loop.time() + 1.0, self._forget, node)
            return
        self.note(f"forget {node}")
        fut = inc.run(inc.member.raft.submit, ("forget", node))
        fut.add_done_callback(lambda f: f.exception() is None or self.loop.call_at(
            self.loop.time() + 1.0, self._forget, node))

    def restart(self, node: str) -> None:
        if self.alive(node) or node == self.lost:
            return
        self.start_node(node, False)
        self.net.release()
        self.apply_pump(node)

    def heal(self) -> None:
        if not any(self.net.group.values()):
            return
        self.net.group = {}
        self.net.mark()
        self.note("heal")
        self.net.release()
        for n in sorted(self.nodes):
            self.apply_pump(n)

    async def _settle(self) -> None:
        """Faults end: heal, restart, every subscriber connects once more and drains;
        then every hand-over must finish and every acknowledged message arrive."""
        self.heal()
        for n in sorted(self.nodes):
            if not self.alive(n):
                self.restart(n)
        self.note("settle")
        deadline = self.loop.time() + self.scenario.settle_time
        for sub in self.subscribers:
            while self.loop.time() < deadline:
                if await sub.connect(self.rng.choice(sorted(self.nodes))):
                    break
                await asyncio.sleep(0.5)
        while self.loop.time() < deadline:
            if self._drained() and not self._handovers() and \
                    len(self.serving()) == len(self.nodes) - (self.lost is not None) and \
                    not any(self.nodes[n].member.unjudged for n in self.nodes
                            if n != self.lost):
                break
            for sub in self.subscribers:
                if sub.conn is None and self.loop.time() < deadline:
                    await sub.connect(self.rng.choice(sorted(self.nodes)))
            await asyncio.sleep(0.25)
        self.note("settled")
        self._final_checks()

    def _drained(self) -> bool:
        got = set().union(*(s.seen for s in self.subscribers))
        return self.acked <= got and all(not s.qos2_open for s in self.subscribers)

    def _handovers(self) -> list[str]:
        out = []
        for n in sorted(self.nodes):
            inc = self.incarnation(n)
            if inc is None:
                continue  # (the node lost for good)
            t = inc.member.takeovers
            out += [f"{n} hands {cid} over" for cid in sorted(t.outgoing)]
            out += [f"{n} takes {cid} over" for cid in sorted(t.incoming)]
        return out

    def _final_checks(self) -> None:
        got = set().union(*(s.seen for s in self.subscribers))
        lost = sorted(self.acked - got)
        if lost:
            self.violation(f"{len(lost)} acknowledged messages never delivered: {lost[:8]}")
        for pending in self._handovers():
            self.violation(f"hand-over not finished after the heal: {pending}")
        for sub in self.subscribers:
            # MQTT orders a publisher's messages per connection and QoS (4.6)
            last: dict[tuple, int] = {}
            for pub, seq in sub.delivered:
                flow = (pub, self.qos_of[(pub, seq)])
                if seq < last.get(flow, 0):
                    self.violation(f"{sub.client_id}: {pub}:{seq} after {pub}:{last[flow]} "
                                   f"(QoS {flow[1]})")
                last[flow] = max(seq, last.get(flow, 0))
            holders = [n for n in sorted(self.nodes) if n != self.lost and sub.client_id in
                       self.nodes[n].broker.sessions]
            if len(holders) != 1:
                self.violation(f"{sub.client_id}: session held by {holders} at the end")
            table = self.raft.tables.holders.get(sub.client_id)
            if holders and table not in holders:
                self.violation(f"{sub.client_id}: the table names {table}, the session is "
                               f"on {holders}")


def run_seed(seed: int, scenario: Scenario | None = None, plant: str | None = None,
             keep_trace: bool = False) -> World:
    world = World(seed, scenario, plant, keep_trace)
    loop = world.loop
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(world.main())
    except SimulationStuck as err:
        world.violation(f"stuck: {err}")
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        asyncio.set_event_loop(None)
    return world


@dataclass
class Summary:
    seeds: int = 0
    steps: int = 0
    violations: int = 0
    failing: list = field(default_factory=list)
    digest: str = ""


def run(seeds, scenario: Scenario | None = None, plant: str | None = None,
        out=None, stop_at_first: bool = False) -> Summary:
    total = hashlib.sha256()
    summary = Summary()
    for seed in seeds:
        world = run_seed(seed, scenario, plant)
        summary.seeds += 1
        summary.steps += world.steps
        total.update(world.digest.digest())
        if world.violations:
            summary.violations += len(world.violations)
            summary.failing.append(seed)
            if out is not None:
                print(f"seed {seed}: {len(world.violations)} violations; replay with "
                      f"`make simulate SEED={seed}`", file=out)
                for v in world.violations[:5]:
                    print(f"  {v}", file=out)
            if stop_at_first:
                break
    summary.digest = total.hexdigest()[:16]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.simulation",
                                description="Deterministic simulation of a Shoal cluster.")
    p.add_argument("--seeds", type=int, default=100, help="how many seeds (from --first)")
    p.add_argument("--first", type=int, default=1, help="the first seed of a --seeds run")
    p.add_argument("--seed", type=int, default=None,
                   help="run this one seed and print its trace")
    p.add_argument("--plant", choices=PLANTS, default=None,
                   help="put one known bug back, to see how many seeds it takes to catch")
    p.add_argument("--until-caught", action="store_true",
                   help="with --plant: stop at the first failing seed")
    p.add_argument("--lenient-restarts", action="store_true",
                   help="a restarted node learns of its peers' restarts while it was down "
                        "(by default it knows none of their earlier processes, as the real "
                        "transport)")
    p.add_argument("--flapping", action="store_true",
                   help="subscribers hop between nodes every few dozen milliseconds")
    p.add_argument("--failover", action="store_true",
                   help="replicated sessions: nodes down long enough to be declared down "
                        "(promotions, fenced returns) and one node lost for good")
    p.add_argument("--verbose", action="store_true", help="show the nodes' own logs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL,
                        format="%(name)s %(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("shoal").setLevel(logging.CRITICAL)
    t0 = time.monotonic()
    scenario = Scenario(strict_restarts=not args.lenient_restarts, flapping=args.flapping,
                        failover=args.failover,
                        fault_time=20.0 if args.failover else Scenario.fault_time)
    if args.seed is not None:
        world = run_seed(args.seed, scenario, plant=args.plant, keep_trace=True)
        for line in world.lines:
            print(line)
        for v in world.violations:
            print(f"violation: {v}")
        summary = Summary(1, world.steps, len(world.violations),
                          [args.seed] if world.violations else [],
                          hashlib.sha256(world.digest.digest()).hexdigest()[:16])
    else:
        seeds = range(args.first, args.first + args.seeds)
        summary = run(seeds, scenario, plant=args.plant, out=sys.stdout,
                      stop_at_first=args.until_caught)
    print(f"took {time.monotonic() - t0:.1f}s (wall clock)", file=sys.stderr)
    print(f"simulation: seeds={summary.seeds} steps={summary.steps} "
          f"violations={summary.violations} trace={summary.digest}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        # set iteration order must not differ between runs: the same seed, the same trace
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "cluster.simulation", *sys.argv[1:]])
    sys.exit(main())
