"""Session replicas: the write path to them, the copies they keep, failure detection and
promotion (the cluster side of ``session_replicas``).

**Holder side.** The broker's journal gives every change to a stored session to
``tap`` (node/persist.py ``OPS``). Each held session streams its changes to its replica
nodes (``streams``): the changes of one loop iteration to one node go as one ``repl``
message ``[batch id, changes]`` on the ordered node link, answered by ``repl_ok`` once the
replica's store committed them. An acknowledgement that waits for the local commit today
(PUBACK / PUBREC, a forward's confirmation, SUBACK) also waits for every batch sent so far
(``wait``): the group commit, stretched over the replicas. A new replica is *seeded*: a
("d") then the whole session (``broker.stored_changes``) in one batch; once that batch is
acknowledged the holder records the node in the session's in-sync set in the Raft table
(``("replicas", client_id, holder, nodes)``). A replica that leaves a batch unanswered for
``replica_timeout`` is dropped from the in-sync set of every session held here
(``("unreplicate", holder, node)``); only once that is committed do the waits on it end,
so nothing is acknowledged that a promotable replica lacks. It is seeded again once it
answers again.

**Replica side.** Copies live in their own store (``data_dir/replicas``, the same
durability mode), one per (ClientID, holder node): a copy of a session in the middle of a
hand-over can come from both holders. Changes from a node the table says is down are not
taken (the fence: its sessions moved on). Every forwarded batch a holder stored is
*marked* in its replicas' stream (``("k", sender, confirmation id)``) so that a message
sent again after the holder died (below) is not queued twice.

**Failure detection.** The Raft leader declares a node down (``("down", node)``) when it
has heard nothing from it on its node link for ``failover_timeout``. Every session it held
that has an in-sync replica up is promoted there in the same entry (cluster/routing.py):
the new holder installs its copy as the session (queue, inflight messages re-sent with DUP
or PUBREL at the next connection, QoS 2 ids, will with its delay running, subscriptions).

**Publishers.** A node whose forwarded batch to the dead node was never confirmed sends it
again (``pubr``) to the nodes that got its sessions, once: they deliver it to those
sessions only, unless the replica stream had marked it stored. Forwards routed with a
table that has a promotion the receiver has not applied yet wait there until it has.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import zlib

from node.metrics import Histogram
from node.persist import record_from_changes
from node.session.record import RecordError, unpack
from node.store import SessionStore, StoreError
from node.ownership import Claim

from .marks import HandoverMark
from .routing import RaftUnavailable

log = logging.getLogger("shoal.replication")

PERIOD = 0.25          # seconds between placement / timeout / detector passes
SEED_PER_PASS = 500    # sessions seeded per pass at most (a big node catches up in steps)
MARKS_KEPT = 200_000   # forwarded-batch marks kept per holder node
MARKS_SEEDED = 16      # per session, the latest marks its seed gives a new replica (a
#                        batch not yet confirmed when a seed goes out is among the last few)
START_GRACE = 2.0      # x failover_timeout: a new leader's links must have had the time
FAILOVER_BUCKETS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0)
REPAIR_PERIOD = 1.0    # seconds between walks over the held sessions (placement repair)
SWEEP_PERIOD = 5.0     # seconds between sweeps of copies the table no longer backs
SWEEP_AGE = 60.0       # ... and untouched for this long


def _score(client_id: str, node: str) -> int:
    return zlib.crc32(f"{node}\x00{client_id}".encode())


def place(client_id: str, candidates, k: int) -> list[str]:
    """Rendezvous hashing: the ``k`` candidates with the highest score for this ClientID
    (stable when members come and go: only the sessions of the changed node move)."""
    return sorted(candidates, key=lambda n: (_score(client_id, n), n), reverse=True)[:k]


class _Batch:
    __slots__ = ("seq", "changes", "fut", "sent_at", "seeds")

    def __init__(self, seq: int, fut: asyncio.Future) -> None:
        self.seq = seq
        self.changes: list = []
        self.fut = fut
        self.sent_at = 0.0
        self.seeds: list[str] = []  # ClientIDs whose seed this batch carries


class Replication:
    def __init__(self, member) -> None:
        self.member = member
        self.broker = member.broker
        self.transport = member.transport
        self.config = config = member.config
        self.node_id = member.node_id
        self.loop = member.loop
        self.k = config.session_replicas
        self.timeout = config.replica_timeout
        # -- holder side
        self.streams: dict[str, set[str]] = {}      # held ClientID -> replica nodes
        self.seeded: dict[str, set[str]] = {}       # ClientID -> nodes whose seed is stored
        self._fanout: collections.Counter = collections.Counter()  # node -> streams to it
        #: per held ClientID, the latest forwarded batches stored into it (a new replica
        #: of it gets them with its seed: a re-send after this node died is not stored
        #: twice where it is promoted)
        self._recent_marks: dict[str, collections.OrderedDict] = {}
        #: while a forwarded batch is routed: the sessions it stored messages into
        self.collecting: set[str] | None = None
        self._out: dict[str, _Batch] = {}           # node -> batch of this loop iteration
        self._unacked: dict[str, collections.deque] = {}
        self._seq = itertools.count(1)
        #: node -> done once its "unreplicate" committed (then nothing counts on it)
        self._dropping: dict[str, asyncio.Future] = {}
        #: "unreplicate" proposals in flight: node -> when proposed
        self._proposing: dict[str, float] = {}
        self._declared: dict[str, float] = {}  # node -> when this leader proposed "down"
        self._to_place: set[str] = set()
        self._place_scheduled = False
        self._flush_scheduled = False
        # -- replica side
        self.copies: SessionStore | None = None
        #: per holder node, (sender, confirmation id) -> the sessions whose copies here
        #: have that forwarded batch's messages (None: every one, a holder of an older
        #: version)
        self._marks: dict[str, collections.OrderedDict] = {}
        self._touched: dict[str, float] = {}  # copy key -> last change (monotonic)
        self._fenced: set[str] = set()  # copy keys promoted here: their source is stale
        #: (copy key, epoch) of hand-overs whose late messages went on for a dead holder
        self._late_passed: set[tuple[str, int]] = set()
        #: ClientID -> the node it was promoted from (a re-sent forward is for these)
        self.promoted_from: dict[str, str] = {}
        #: the copies promoted here while the node was down are installed (at start,
        #: after the catch-up): until then a session missing here may just not be yet
        self.adopted = False
        #: done once this process knows which in-sync replicas the table names for the
        #: sessions it holds (``adopt_promoted``): its streams to them start empty, so
        #: they are dropped first; nothing is acknowledged before
        self._fresh: asyncio.Future = self.loop.create_future()
        # -- counters (metrics)
        self.failovers = 0
        self.promotions = 0
        #: seconds from the last word of the dead node to its sessions installed here
        self.failover_hist = Histogram(FAILOVER_BUCKETS)
        self.batches_sent = 0
        self.changes_sent = 0
        self.redone = 0
        self._started = self.loop.time()
        self._swept_at = self._repaired_at = self._started
        self._task: asyncio.Task | None = None

    # -- start / stop ---------------------------------------------------------------------

    def open(self, copies=None) -> None:
        """Open the replica store (blocking: at start; ``copies``: one opened already,
        as the simulation's) and put the tap on the journal."""
        if not self.broker.has_store():
            return  # no store here: nothing to replicate, nowhere to keep copies
        if copies is None:
            path = os.path.join(self.config.data_dir, "replicas")
            copies = SessionStore(path, durability=self.config.durability)
            _loaded, report = copies.open()
            for problem in getattr(report, "problems", ()) or ():
                log.error("replica store: %s node=%s", problem, self.node_id)
        self.copies = copies
        if self.k:
            self.broker.attach_replication(self.tap, self.wait)

    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass  # cancelled just above: how the loop ends
        if self.copies is not None:
            await self.copies.close()

    # -- holder side: the write path ---------------------------------------------------------

    def tap(self, change: tuple) -> None:
        cid = change[1]
        if self.collecting is not None and change[0] == "m":
            self.collecting.add(cid)
        nodes = self.streams.get(cid)
        if nodes is None:
            if change[0] == "s":
                # a session that became stored here: place it once this iteration's
                # changes are done (its seed is then the whole of it)
                self._to_place.add(cid)
                self._schedule_place()
            return
        if change[0] == "d":
            del self.streams[cid]
            self.seeded.pop(cid, None)
            self._recent_marks.pop(cid, None)
            self._to_place.discard(cid)
            self._fanout.subtract(nodes)
        for node in nodes:
            self._batch(node).changes.append(change)

    def mark_forward(self, sender: str, confirm_id: int, cids) -> None:
        """A forwarded batch was stored into the sessions ``cids`` here: tell their
        replicas, each about the sessions it has a copy of (see the module doc)."""
        per_node: dict[str, list[str]] = {}
        for cid in sorted(cids):
            # (kept for the seeds to come too: a session placed at the end of this loop
            # iteration has no stream yet)
            marks = self._recent_marks.setdefault(cid, collections.OrderedDict())
            marks[(sender, confirm_id)] = None
            while len(marks) > MARKS_SEEDED:
                marks.popitem(last=False)
            for node in self.streams.get(cid, ()):
                per_node.setdefault(node, []).append(cid)
        for node, named in per_node.items():
            self._batch(node).changes.append(("k", sender, confirm_id, named))

    def _remove_node(self, node: str) -> None:
        """``node`` gets no more changes of any session held here."""
        for cid, nodes in self.streams.items():
            nodes.discard(node)
            seeded = self.seeded.get(cid)
            if seeded is not None:
                seeded.discard(node)
        self._fanout.pop(node, None)

    def _release_waits(self, node: str) -> None:
        """Nothing waits for ``node`` any more (out of every in-sync set, or down)."""
        for batch in self._unacked.pop(node, None) or ():
            if not batch.fut.done():
                batch.fut.set_result(None)
        batch = self._out.pop(node, None)
        if batch is not None and not batch.fut.done():
            batch.fut.set_result(None)
        gate = self._dropping.pop(node, None)
        if gate is not None and not gate.done():
            gate.set_result(None)

    def wait(self, local):
        """``local`` (the store's commit, or None) and every batch sent so far: what an
        acknowledgement waits for. None when nothing has to be waited for."""
        waits = [local] if local is not None else []
        if not self._fresh.done():
            waits.append(self._fresh)
        waits.extend(batch.fut for batch in self._out.values())
        waits.extend(q[-1].fut for q in self._unacked.values() if q)
        waits.extend(self._dropping.values())
        if not waits:
            return None
        return self.broker.all_done(*waits)

    def _batch(self, node: str) -> _Batch:
        batch = self._out.get(node)
        if batch is None:
            batch = self._out[node] = _Batch(next(self._seq), self.loop.create_future())
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        return batch

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, {}
        now = self.loop.time()
        for node, batch in out.items():
            batch.sent_at = now
            self._unacked.setdefault(node, collections.deque()).append(batch)
            self.transport.send(node, "repl", [batch.seq, batch.changes], True)
            self.batches_sent += 1
            self.changes_sent += len(batch.changes)

    def on_ack(self, peer: str, seq) -> None:
        q = self._unacked.get(peer)
        if not q:
            return
        seeded = []
        while q and q[0].seq <= seq:
            batch = q.popleft()
            seeded.extend(batch.seeds)
            if not batch.fut.done():
                batch.fut.set_result(None)
        for cid in seeded:
            if peer in self.streams.get(cid, ()):
                self.seeded.setdefault(cid, set()).add(peer)
        if seeded:
            self._record_insync(seeded)

    def _record_insync(self, cids, limit: int | None = None) -> None:
        """Propose the in-sync sets that differ from the table (for sessions held here),
        ``limit`` of them at most."""
        raft = self.member.raft
        if raft is None:
            return
        view = self.member.view
        for cid in dict.fromkeys(cids):
            if limit is not None and limit <= 0:
                return
            if view.holders.get(cid) != self.node_id:
                continue  # (not yet: a hand-over's move not applied; the pass retries)
            want = self._insync(cid)
            if want is not None:
                raft.submit(("replicas", cid, self.node_id, want)).add_done_callback(_quiet)
                if limit is not None:
                    limit -= 1

    async def seeds_stored(self, cid: str, timeout: float) -> list[str]:
        """The replicas that stored the seed of ``cid`` (a session just taken over here),
        waiting up to ``timeout`` for the seeds in flight: the hand-over's move records
        them as its in-sync set in the same entry, so the session is never held here
        without a promotable replica while the table catches up."""
        if not self.k:
            return []
        if cid in self._to_place:
            self._to_place.discard(cid)
            self._fill(cid)
        waits = [b.fut for b in self._out.values() if cid in b.seeds]
        waits.extend(b.fut for q in self._unacked.values() for b in q if cid in b.seeds)
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        return sorted(self.seeded.get(cid, set()) & self.streams.get(cid, set()))

    def moved_here(self, cid: str) -> None:
        """A hand-over to this node committed: the replicas seeded while it waited for
        that are recorded now (a session that keeps moving would otherwise never be). A
        node the move recorded in-sync that was dropped meanwhile is dropped again: no
        acknowledgement until the table no longer counts it (see ``_drop``)."""
        stale = set(self.member.view.replicas.get(cid, ())) - \
            (self.seeded.get(cid, set()) & self.streams.get(cid, set()))
        for node in sorted(stale):
            self._drop(node, f"dropped while the move of {cid} was in flight")
        if self.seeded.get(cid):
            self._record_insync([cid])

    def _insync(self, cid: str) -> list[str] | None:
        """The in-sync set to record for ``cid`` when the table's differs, else None."""
        want = self.seeded.get(cid, set()) & self.streams.get(cid, set())
        if want == set(self.member.view.replicas.get(cid, ())):
            return None
        return sorted(want)

    # -- placement ------------------------------------------------------------------------

    def _schedule_place(self) -> None:
        if not self._place_scheduled:
            self._place_scheduled = True
            self.loop.call_soon(self._place_pending)

    def _place_pending(self) -> None:
        self._place_scheduled = False
        todo, self._to_place = self._to_place, set()
        for cid in todo:
            self._fill(cid)

    def _candidates(self) -> list[str]:
        view = self.member.view
        down = view.down
        return [n for n in view.members if n != self.node_id and n not in down
                and n not in self._dropping and self.transport.is_up(n)]

    def _fill(self, cid: str, candidates=None) -> int:
        """Seed replicas for a stored session held here up to ``k``; returns how many."""
        session = self.broker.sessions.get(cid)
        if session is None or session.journal is None:
            return 0
        nodes = self.streams.setdefault(cid, set())
        if len(nodes) >= self.k:
            return 0
        if candidates is None:
            candidates = self._candidates()
        new = place(cid, [c for c in candidates if c not in nodes], self.k - len(nodes))
        if not new:
            return 0
        changes = [("d", cid), *self.broker.stored_changes(session)]
        # (the batches forwarded into it that the seed holds: a new copy has them)
        changes += [("k", s, c, [cid]) for s, c in self._recent_marks.get(cid, ())]
        for node in new:
            batch = self._batch(node)
            batch.changes.extend(changes)
            batch.seeds.append(cid)
            nodes.add(node)
            self._fanout[node] += 1
        return len(new)

    # -- the periodic pass: timeouts, placement repair, in-sync records, detector -----

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            try:
                self._pass()
            except Exception:  # one pass's bug must not stop replication for good
                log.exception("replication pass failed node=%s", self.node_id)

    def _pass(self) -> None:
        now = self.loop.time()
        member = self.member
        if member.raft is None or not member.ready:
            return
        # replicas that stopped answering
        for node, q in self._unacked.items():
            if q and now - q[0].sent_at > self.timeout and node not in self._dropping:
                self._drop(node, f"no answer for {now - q[0].sent_at:.1f}s")
        for node in list(self._dropping):
            if self._counted_insync(node):
                self._propose_drop(node)  # (again, if the last proposal did not commit)
            else:
                # the table counts it nowhere any more (its proposal committed, whatever
                # became of the answer: one applied through a Raft snapshot has none)
                self._release_waits(node)
        if self.k and now - self._repaired_at >= REPAIR_PERIOD:
            self._repaired_at = now
            self._repair()  # (a walk over every session: once a second, not each pass)
        self._detect(now)
        self._forget_stale_copies()

    def _drop(self, node: str, why: str) -> None:
        """Stop streaming to ``node`` and take it out of the in-sync sets (committed before
        the waits on it end). It is seeded again once it answers."""
        log.warning("replica dropped node=%s replica=%s: %s", self.node_id, node, why)
        self._remove_node(node)
        if node not in self._dropping:
            # until the table no longer counts it in-sync, nothing new is acknowledged
            # either (it gets no new changes, yet it could be promoted): see ``wait``
            self._dropping[node] = self.loop.create_future()
        self._propose_drop(node)

    def _counted_insync(self, node: str) -> bool:
        """Does the table count ``node`` in the in-sync set of a session held here?"""
        view = self.member.view
        holders = view.holders
        return any(node in nodes and holders.get(cid) == self.node_id
                   for cid, nodes in view.replicas.items())

    def _propose_drop(self, node: str) -> None:
        now = self.loop.time()
        if now - self._proposing.get(node, -math.inf) < self.timeout:
            return
        self._proposing[node] = now
        fut = self.member.raft.submit(("unreplicate", self.node_id, node))

        def done(f: asyncio.Future, node=node) -> None:
            self._proposing.pop(node, None)
            if f.cancelled() or f.exception() is not None:
                return  # not committed: the next pass proposes it again (waits stay)
            self._release_waits(node)
        fut.add_done_callback(done)

    def fence_self(self) -> None:
        """This node was declared down: every change not yet acknowledged by the replicas
        is not acknowledged to anyone (its sessions may live elsewhere now: a publisher
        sends again rather than be told its message is stored where it is not); every
        replica is seeded again for the sessions it still holds."""
        batches = [b for q in self._unacked.values() for b in q] + list(self._out.values())
        for batch in batches:
            batch.fut.cancel()
        for gate in self._dropping.values():
            gate.cancel()
        self._dropping.clear()
        self._unacked.clear()
        self._out.clear()
        self.streams.clear()
        self.seeded.clear()
        self._fanout.clear()
        if batches:
            log.warning("unacknowledged replication batches given up node=%s count=%d",
                        self.node_id, len(batches))
        if self.k:
            self._repaired_at = 0.0  # (at the next pass)

    def on_peer_restarted(self, peer: str) -> None:
        """A replica's new process: what its previous one had not acknowledged may be
        lost; it is dropped and seeded again."""
        if self._fanout.get(peer, 0) > 0 or self._unacked.get(peer):
            self._drop(peer, "restarted")

    def _repair(self) -> None:
        """Sessions held here with fewer replicas than wanted get more (bounded per pass);
        in-sync sets the table lacks are proposed again."""
        view = self.member.view
        candidates = self._candidates()
        seeded = 0
        held = []
        for cid, session in self.broker.sessions.items():
            if session.journal is None or view.holders.get(cid) != self.node_id:
                continue
            held.append(cid)
            if seeded < SEED_PER_PASS and len(self.streams.get(cid, ())) < self.k and \
                    candidates:
                seeded += self._fill(cid, candidates)
        self._record_insync(held, SEED_PER_PASS)

    def under_replicated(self) -> int:
        """Stored sessions held here whose in-sync set in the table is short of ``k`` (a
        replica being dropped does not count)."""
        if not self.k:
            return 0
        view = self.member.view
        reps = view.replicas
        dropping = self._dropping  # (still in the table's set, on their way out)
        held = sum(1 for cid, s in self.broker.sessions.items()
                   if s.journal is not None and view.holders.get(cid) == self.node_id
                   and sum(1 for n in reps.get(cid, ()) if n not in dropping) < self.k)
        # and copies handed over whose late messages are on fewer replicas (the stream
        # to a dropped one is not seeded again: the copy ends with its hand-over)
        handing = sum(1 for cid in self.member.takeovers.outgoing
                      if view.holders.get(cid) != self.node_id
                      and len(self.streams.get(cid, ())) < self.k)
        return held + handing

    def copies_count(self) -> int:
        return len(self.copies.session_ids()) if self.copies is not None else 0

    def lag(self) -> dict:
        """Per replica node: batches unanswered and the age of the oldest (seconds)."""
        now = self.loop.time()
        return {n: {"batches": len(q), "oldest_s": round(now - q[0].sent_at, 3) if q else 0.0}
                for n, q in self._unacked.items()}

    # -- failure detection (the leader) ------------------------------------------------

    def _detect(self, now: float) -> None:
        member = self.member
        raft = member.raft
        if not self.k or not raft.status()["is_leader"]:
            return  # (session_replicas 0: nothing to fail over; nodes wait as before)
        timeout = self.config.failover_timeout
        if now - self._started < START_GRACE * timeout:
            return
        view = member.view
        down = view.down
        for node in list(view.members):
            if node == self.node_id or node in down:
                continue
            silent = self.transport.silent_for(node)
            if silent >= timeout and now - self._declared.get(node, -timeout) >= timeout:
                self._declared[node] = now  # (once per timeout: the entry is in flight)
                log.warning("declaring node down node=%s peer=%s silent=%.1fs", self.node_id,
                            node, silent)
                raft.submit(("down", node)).add_done_callback(_quiet)

    # -- replica side --------------------------------------------------------------------

    def on_repl(self, peer: str, body) -> None:
        seq, changes = body
        if self.copies is None:
            return
        if peer in self.member.view.down:
            return  # fenced: its sessions were promoted; no acknowledgement either
        store = self.copies
        refs: dict[bytes, object] = {}
        seeding: set[str] = set()  # copies this batch (re)starts with a ("d")
        refused = []
        now = self.loop.time()
        for change in changes:
            try:
                self._apply(store, peer, change, refs, seeding, now)
            except _Fenced as err:
                refused.append(f"{change[0]}: {err}")
            except (StoreError, ValueError, TypeError, IndexError) as err:
                # (a copy swept here, or a holder's tail after a hand-over: nothing is
                # promoted from it, so it does not hold the acknowledgement back)
                log.debug("replica change not applied node=%s from=%s change=%s: %s",
                          self.node_id, peer, change[0] if change else "?", err)
        if refused:
            # not acknowledged: the copy was promoted here, so its old holder is stale;
            # it must not tell a publisher that a message is stored where it is not
            log.warning("replica changes refused node=%s from=%s count=%d first=%s",
                        self.node_id, peer, len(refused), refused[0])
            return
        wait = store.durable_future()
        if wait is None:
            self.transport.send(peer, "repl_ok", seq, True)
        else:
            wait.add_done_callback(lambda w, peer=peer, seq=seq: self._acked(w, peer, seq))

    def _acked(self, wait: asyncio.Future, peer: str, seq) -> None:
        if wait.cancelled() or wait.exception() is not None:
            return  # the store failed: this node stops; the holder drops it
        self.transport.send(peer, "repl_ok", seq, True)

    def _apply(self, store: SessionStore, source: str, change, refs: dict,
               seeding: set, now: float) -> None:
        kind = change[0]
        if kind == "k":
            marks = self._marks.setdefault(source, collections.OrderedDict())
            mark = (change[1], change[2])
            if len(change) < 4:
                marks[mark] = None  # (every session)
            else:
                named = marks.get(mark, ())
                if named is not None:
                    marks[mark] = set(named).union(change[3])
            while len(marks) > MARKS_KEPT:
                marks.popitem(last=False)
            return
        key = copy_key(change[1], source)
        self._touched[key] = now
        if kind == "d":
            store.delete_session(key)
            seeding.add(key)  # (a seed follows, or the session ended there)
            return
        if key in self._fenced:
            if kind != "s" or key not in seeding:
                raise _Fenced(f"{change[1]!r} was promoted here from {source}")
            self._fenced.discard(key)  # a new seed: it holds the session again
        if kind == "s":
            store.put_session(key, change[2])
        elif kind == "m":
            body = change[4]
            ref = refs.get(body)
            if ref is None:
                ref = refs[body] = store.message_ref(body)
            store.put_message(key, change[2], change[3], ref)
        elif kind == "u":
            store.update_message(key, change[2], change[3])
        elif kind == "r":
            store.remove_message(key, change[2])
        elif kind == "i":
            if change[3]:
                store.add_incoming(key, change[2])
            else:
                store.remove_incoming(key, change[2])
        else:
            raise ValueError(f"unknown change {kind!r}")

    def marked(self, source: str, sender: str, confirm_id: int):
        """The sessions whose copies of ``source``'s have a forwarded batch stored (an
        empty set: none; None: every one)."""
        marks = self._marks.get(source)
        if marks is None:
            return set()
        return marks.get((sender, confirm_id), set())

    def _forget_stale_copies(self) -> None:
        """Copies whose source no longer holds the session and that were not promoted
        here: the table moved on (a move elsewhere, a release)."""
        store = self.copies
        if store is None:
            return
        now = self.loop.time()
        if now - self._swept_at < SWEEP_PERIOD:
            return
        self._swept_at = now
        view = self.member.view
        for key in store.session_ids():
            cid, source = split_key(key)
            owner = view.owners.get(cid)
            if view.holders.get(cid) == source or (owner is not None and owner[0] == source):
                continue  # (its holder's, or a hand-over's to it not moved yet)
            if now - self._touched.get(key, self._started) < SWEEP_AGE:
                continue  # (still written: an old holder's tail, a hand-over taken back)
            store.delete_session(key)
            self._touched.pop(key, None)

    # -- promotion -----------------------------------------------------------------------

    def on_node_down(self, node: str, promoted, position: int, stuck: int = 0) -> None:
        """``node`` was declared down (or forgotten): install the sessions promoted here,
        give up the waits on it, and send again what was forwarded to it unconfirmed."""
        self.failovers += 1
        t0 = self.loop.time()
        # it is no replica any more: nothing more waits for it
        self._remove_node(node)
        self._release_waits(node)
        mine = [(cid, epoch) for cid, target, epoch in promoted if target == self.node_id]
        installed = 0
        for cid, epoch in mine:
            if self._promote(cid, node, epoch):
                installed += 1
        if mine:
            self.promotions += installed
            ms = (self.loop.time() - t0) * 1000
            silent = self.transport.silent_for(node)
            self.failover_hist.observe(silent)
            log.warning("sessions promoted node=%s from=%s count=%d of=%d ms=%.1f "
                        "since_last_heard=%.2fs", self.node_id, node, installed, len(mine), ms,
                        silent)
        # (a node that still holds sessions of its own is waited for too: what was
        # forwarded to it may be for them)
        self._pass_on_late(node)
        self.member.takeovers.on_node_down(node)
        self.member.redo_forwards(node, sorted({p[1] for p in promoted}), stuck > 0)
        if self.k:
            self._schedule_place()

    def _pass_on_late(self, node: str) -> None:
        """``node`` went down in the middle of a hand-over it had made final (the session
        is held elsewhere, not promoted from it): the late messages its copy kept after the
        snapshot were acknowledged once stored there and here, and its hand-over never
        delivered them. Their copy here sends them to the session's holder, as the old
        holder's restart would have (a batch the holder took already is skipped there)."""
        store = self.copies
        if store is None:
            return
        view = self.member.view
        for key in store.session_ids():
            cid, source = split_key(key)
            if source != node:
                continue
            data = store.session_data(key)
            if data is None:
                continue
            mark = HandoverMark.of(_Meta(data.meta.get("handover")))
            handed = mark.handed
            holder = view.holders.get(cid)
            if handed is None or holder in (None, node):
                continue  # (not handed over, or the session was promoted from this copy)
            move = view.handed_from.get(cid, {}).get(node)
            if move is None or move[0] != handed.epoch or self.node_id not in move[1]:
                continue  # (a stale copy: the hand-over was not the move, or not fed here)
            if view.promoted.get(cid, {}).get(node, -1) > handed.epoch:
                continue  # (promoted from it after that hand-over: the late ones with it)
            if (key, handed.epoch) in self._late_passed:
                continue
            self._late_passed.add((key, handed.epoch))
            late, relayed = [], {}
            for k, m in data.messages.items():
                qos, retain, sub_ids, pid, _stage = m.entry
                if k < handed.first or pid:
                    continue
                item = [unpack(m.ref.record), qos, retain, list(sub_ids) if sub_ids else None]
                name = mark.relayed.get(k)
                if name is None:
                    late.append(item + [k])
                else:
                    relayed.setdefault(name[0], []).append(item + [name[1]])
            if not late and not relayed:
                continue
            log.warning("late messages of a hand-over passed on for a node declared down "
                        "node=%s client_id=%s down=%s epoch=%d to=%s count=%d", self.node_id,
                        cid, node, handed.epoch, holder, len(late) + sum(map(len,
                                                                            relayed.values())))
            self.member.takeovers.pass_on_late(cid, node, handed.epoch, holder, late, relayed)

    def adopt_promoted(self) -> None:
        """After a restart's catch-up: sessions promoted to this node while it replayed
        the log (the table says it holds them, its replica store has their copy)."""
        store = self.copies
        if store is None:
            self.adopted = True
            if not self._fresh.done():
                self._fresh.set_result(None)
            return
        view = self.member.view
        # the in-sync replicas the table names for sessions held here were fed by an
        # earlier process of this node: this one has no stream to them yet, so until
        # they are out of the table (then seeded again) nothing is acknowledged
        stale = sorted({n for cid, nodes in view.replicas.items()
                        if view.holders.get(cid) == self.node_id for n in nodes})
        if self.member.raft is not None:
            for node in stale:
                self._drop(node, "this node restarted: its streams start again")
        if not self._fresh.done():
            self._fresh.set_result(None)
        n = 0
        takeovers = self.member.takeovers
        for key in store.session_ids():
            cid, source = split_key(key)
            # (held here by that promotion: a claim made since may own it, and will ask
            # this node for it); a copy this node was handing over when it went down is
            # older than the promoted one (the hand-over moved before the promotion)
            if view.holders.get(cid) == self.node_id and self.promoted_copy(cid) == source \
                    and (cid not in self.broker.sessions or takeovers.restored_handed(cid)):
                n += self._promote(cid, source, max(view.promoted[cid].values()))
        self.adopted = True
        if n:
            log.warning("sessions promoted here while starting adopted node=%s count=%d",
                        self.node_id, n)

    def promoted_copy(self, cid: str) -> str | None:
        """The node ``cid`` was last promoted from, if this node has that copy (one kept
        from a node it was promoted from earlier is older: a replica dropped since)."""
        promoted = self.member.view.promoted.get(cid)
        if not promoted or self.copies is None:
            return None
        source = max(promoted, key=promoted.get)
        key = copy_key(cid, source)
        return source if self.copies.has_session(key) else None

    def _promote(self, cid: str, source: str, epoch: int) -> bool:
        store = self.copies
        key = copy_key(cid, source)
        data = store.session_data(key) if store is not None else None
        if data is None:
            log.error("promoted without a copy node=%s client_id=%s from=%s: the session is "
                      "lost", self.node_id, cid, source)
            self.member.raft.submit(("release", cid, self.node_id, epoch)).add_done_callback(
                _quiet)
            return False
        try:
            record = record_from_changes(
                data.meta, [(k, m.entry, m.ref.record) for k, m in data.messages.items()],
                data.incoming)
        except RecordError as err:
            log.error("replica copy unreadable node=%s client_id=%s: %s", self.node_id, cid,
                      err)
            return False
        # the dead node's own hand-over state went with it; what it knew of the late
        # messages it had taken stays (they are in the copy: not taken twice), and the
        # gate it had up for them goes on here
        taking = HandoverMark.of(_Meta(record.get("handover"))).taking
        record["handover"] = HandoverMark.for_receiver(record.get("handover"))
        old = self.broker.sessions.get(cid)
        if old is not None:
            # a stale copy here (a hand-over that never finished): the promoted one wins
            self.broker.end_session(old, "replaced by a promoted replica", release=False,
                                    will=False)
        self.broker.adopt_session(Claim(epoch, record=record))
        session = self.broker.sessions.get(cid)
        if session is not None:
            # (a hand-over from here to ``source`` that its move made final: what it kept
            # for ``source`` is this session's, source never had it)
            self.member.takeovers.fold_outgoing(cid, session)
            if taking is not None:
                self.member.takeovers.gate_promoted(session, taking)
        self.promoted_from[cid] = source
        store.delete_session(key)
        self._fenced.add(key)
        self._touched.pop(key, None)
        return True


class _Meta:
    """A stored copy's hand-over mark, read as a session's (``HandoverMark.of``)."""

    __slots__ = ("handover",)

    def __init__(self, handover) -> None:
        self.handover = handover


class _Fenced(Exception):
    """A change for a copy promoted here (its source no longer holds the session)."""


def copy_key(client_id: str, source: str) -> str:
    return f"{client_id}\x00{source}"


def split_key(key: str) -> tuple[str, str]:
    cid, _, source = key.rpartition("\x00")
    return cid, source


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None and \
            not isinstance(fut.exception(), (RaftUnavailable, ValueError)):
        log.warning("replication proposal failed: %r", fut.exception())
