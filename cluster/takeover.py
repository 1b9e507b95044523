"""Session hand-over between nodes (DESIGN.md, "Session takeover").

Client X connects to B; A holds X's session.

1. B claims X through Raft: a new epoch; the answer names the holder (A).
2. Every node applies the claim; A closes X's connection there (0x8E) and FREEZES the
   session (no delivery; messages still append to its queue).
3. B asks A for the session at that epoch (``snapshot``). A answers with the record
   (queue streamed in chunks first when it is long), moves to HANDING_OVER, and from now
   on keeps what still arrives for X in a ``late`` list, through a gate.
4. B installs the record and stores it (durable), then proposes ``moved(X, epoch, A, B)``
   in the same Raft entry as the routes of X's filters on B, and only once that entry is
   committed sends CONNACK (session present 1), re-sends inflight messages, then the
   queue. ``moved`` applies only while ``epoch`` is the current claim: if B dies before
   it commits, or a newer claim comes first, A's copy is still the session and A hands
   it over again (``_hand_back``) to the newer claim; B's copy is dropped.
5. Each node P, applying ``moved``, sends a ``barrier`` to A and to B on the same ordered
   link its forwarded PUBLISHes travel. So a message P forwarded before its barrier was
   routed with the old routes (A keeps it for X), and one after it with the new routes
   (B delivers it). Per node P: A's gate keeps what P forwarded before its barrier in
   ``late[P]`` and, when P's barrier arrives, sends it to B; B's gate drops X's messages
   from P until P's barrier arrives (A has them), then holds them until ``late[P]`` is
   in, and delivers them after it. A node that is down or cut off delays only its own
   messages; A deletes its copy once every node's barrier arrived (a node that left the
   cluster is not waited for). Each message reaches X once, and in the order its
   publisher's node forwarded it.

Every message about X carries the epoch; an older epoch is refused (``stale``). Two claims
racing for X both ask the holder: it hands the session only to the current owner's epoch;
the loser's connection is closed when the winner's claim is applied on its node.

The decisions and the states are in two sans-IO machines: B's side in cluster/claimer.py
(``ClaimerHandover``), A's side in cluster/holder.py (``HolderHandover``). This module is
their driver: it performs their actions (Raft proposals, node messages and requests with
their retries, timers, the broker's sessions through node/ownership.BrokerSeam) and feeds
them the outcomes, on the loop's clock (so cluster/simulation.py runs it unchanged).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from dataclasses import replace

from node import failpoints
from node.metrics import Histogram
from node.mqtt.codes import ReasonCode
from node.ownership import Claim, ConnectRefused
from node.session.session import SessionState

from . import claimer as C
from .claimer import ClaimerHandover, LocalCopy
from .holder import HolderHandover, HolderState
from .holding import HoldingSide, _decided, _late_item, _late_message, _now
from .marks import HandoverMark, Taking
from .messages import Barrier, LateBatch, SnapshotRequest, Switched, encode
from .routing import RaftUnavailable
from .transport import PeerUnreachable, RemoteError, RequestTimeout

log = logging.getLogger("shoal.takeover")

#: how many times a late batch is passed on after a session that left its receiver
RELAY_HOPS = 3
#: how long a hand-over waits for its replicas to store the session before its move is
#: proposed (they are then its in-sync set from the move on; a slower one is recorded
#: once it answers, and the session has no promotable replica until then)
SEED_WAIT = 0.5
#: upper bounds (seconds) of the takeover latency histogram (GET /metrics)
TAKEOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Gate:
    """A claimer-side hand-over whose session is installed here: the machine, the session
    it gates, and a future set once the gate is gone."""

    __slots__ = ("machine", "session", "done", "opened", "restored", "carry")

    def __init__(self, machine: ClaimerHandover, restored: bool = False) -> None:
        self.machine = machine
        self.restored = restored  # rebuilt from the store at a restart
        #: (epoch, node): this claim took the session back from a hand-over of that epoch
        #: to that node, which still waited for barriers: what it kept goes there too
        self.carry: tuple[int, str] | None = None
        self.session = None
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.opened = loop.create_future()  # set once the session is open here


class _Ticket:
    """What a CONNECT (or an adopt) holds while its claim is decided here: the claim's
    ``opened`` and ``confirm`` hooks (node/ownership.py) are its methods. ``in_progress``
    marks the ClientID until the session is open (or, for a hand-over, until the move's
    verdict): a claim of another node applied meanwhile freezes the session only then."""

    __slots__ = ("takeovers", "client_id", "fut", "gate", "t0")

    def __init__(self, takeovers: "Takeovers", client_id: str, fut: asyncio.Future,
                 t0: float) -> None:
        self.takeovers = takeovers
        self.client_id = client_id
        self.fut = fut
        self.gate: _Gate | None = None
        self.t0 = t0

    def settle(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)
        in_progress = self.takeovers.in_progress
        if in_progress.get(self.client_id) is self.fut:
            del in_progress[self.client_id]

    def opened(self, session) -> None:
        """A session opened for a claim without a hand-over."""
        self.settle()

    def opened_installed(self, session) -> None:
        """The handed-over session is installed here: its gate goes up."""
        t = self.takeovers
        self.gate.session = session
        if not self.gate.opened.done():
            self.gate.opened.set_result(None)
        t._take_back_late(self.gate, session)
        session.gate = t._incoming_gate(self.gate)
        t._save_gate(self.gate)  # (durable before the move is proposed)

    async def confirm(self, session) -> bool | None:
        """CONNACK waits for this: the installed session durable here first, then
        ``moved`` committed. Until then the old holder keeps its copy, so a crash of this
        node before it (or a newer claim first) loses nothing."""
        try:
            return await self.takeovers._confirm(self, session)
        finally:
            self.settle()


class Takeovers(HoldingSide):
    """Runs the two hand-over state machines (cluster/claimer.py, cluster/holder.py) in a
    node: performs their actions (Raft proposals, node messages, timers, the broker's
    sessions) and feeds them the outcomes as events. The claiming side is here, the
    holding side in cluster/holding.py (``HoldingSide``)."""

    def __init__(self, member) -> None:
        self.member = member
        self.broker = member.broker
        self.config = member.config
        self.node_id = member.node_id
        self.incoming: dict[str, _Gate] = {}
        self.outgoing: dict[str, HolderHandover] = {}
        self.in_progress: dict[str, asyncio.Future] = {}  # claims being decided here
        self._timers: dict[HolderHandover, asyncio.TimerHandle] = {}
        self._late_locks: dict[HolderHandover, asyncio.Lock] = {}
        #: per node a late batch waits on: set when it is declared down
        self._down_signals: dict[str, asyncio.Future] = {}
        #: hand-overs given up without sending anything more (``abandon``)
        self._abandoned: weakref.WeakSet = weakref.WeakSet()
        #: the last send of messages a take-back carries, per (ClientID, epoch)
        self._carrying: dict[tuple[str, int], asyncio.Task] = {}
        self._carry_names = itertools.count(1)
        #: restored copies' messages not yet known to be late: (position, via, item, wait)
        self._undecided: dict[HolderHandover, list] = {}
        self.stats = {"takeovers": 0, "takeovers_fresh": 0, "takeover_ms_total": 0.0,
                      "snapshots_sent": 0, "late_sent": 0, "barrier_timeouts": 0}
        self.latencies: list[float] = []  # seconds, last 1000 takeovers
        self.latency_hist = Histogram(TAKEOVER_BUCKETS)  # seconds, all takeovers: /metrics

    # -- the claiming side ---------------------------------------------------------------

    async def claim(self, client_id: str, clean_start: bool, owner: str | None = None) -> Claim:
        """Claim ``client_id`` for a CONNECT here (ClaimerHandover's CLAIMING, WAITING and
        FETCHING states; the returned Claim carries the verdict's hooks)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        prev = self.in_progress.get(client_id)
        self.in_progress[client_id] = fut
        ticket = _Ticket(self, client_id, fut, _now())
        try:
            if prev is not None:
                # the same ClientID is being connected here already: let it settle first
                await asyncio.wait({prev}, timeout=self.config.takeover_timeout)
            claim = await self._claim(ticket, clean_start, owner)
        except BaseException:
            ticket.settle()
            # chunks of a snapshot whose answer never came
            for key in [k for k in self._chunks if k[0] == client_id]:
                del self._chunks[key]
            raise
        # bounded: if the session is never opened (a bug, a lost task), do not wait forever
        loop.call_later(self.config.takeover_timeout, ticket.settle)
        return claim

    async def adopt(self, client_id: str) -> str:
        """Take ``client_id``'s session over without its client: its holder is leaving
        the cluster (evacuation). The same claim, snapshot and move as for a CONNECT; the
        session is installed OFFLINE here. Returns ``moved``, ``gone`` (it had ended), or
        why it did not move."""
        try:
            claim = await self.claim(client_id, False)
        except ConnectRefused as err:
            return f"refused: {err}"
        if claim.record is None:
            claim.opened(None)  # settles the claim
            if claim.fresh_reason is not None or client_id not in self.broker.sessions:
                # nothing to hold here (it ended meanwhile): give the ClientID back
                self.member.session_ended(client_id, claim.epoch)
                return "gone" if claim.fresh_reason is None else f"lost: {claim.fresh_reason}"
            return "moved"
        verdict = await self.broker.confirm_claim(claim, self.broker.adopt_session(claim))
        if verdict:
            return "moved"
        return "overtaken by a newer claim" if verdict is False else "move not confirmed in time"

    async def _claim(self, ticket: _Ticket, clean_start: bool, owner: str | None) -> Claim:
        client_id = ticket.client_id
        m = ClaimerHandover(self.node_id, client_id, clean_start,
                            self.config.unreachable_owner)
        deadline = _now() + self.config.takeover_timeout
        actions = m.start()
        while True:
            following: list = []
            for action in actions:
                if isinstance(action, C.ProposeClaim):
                    following = await self._propose_claim(m, deadline, owner)
                elif isinstance(action, C.AskSnapshot):
                    following = await self._ask_snapshot(m, action, deadline)
                elif isinstance(action, C.AwaitHolderChange):
                    holder = await self._wait_holder_change(client_id, action.holder,
                                                            deadline)
                    following = m.no_change() if holder is False else \
                        m.holder_changed(holder)
                elif isinstance(action, C.TakeBack):
                    out = self.outgoing[client_id]
                    self._hand_back(out, f"epoch {out.epoch} to {out.to} {action.why}")
                elif isinstance(action, C.ProposeFresh):
                    self.stats["takeovers_fresh"] += 1
                    log.warning("previous session lost, starting fresh client_id=%s node=%s "
                                "holder=%s: %s", client_id, self.node_id, action.holder, m.why)
                    # the new session lives here now: make this node its holder
                    self.member.raft.submit(("moved", client_id, m.epoch, action.holder,
                                             self.node_id))
                elif isinstance(action, C.StartExpiryTimer):
                    asyncio.get_running_loop().call_later(action.delay, self._expired,
                                                          ticket.gate)
                elif isinstance(action, C.Refuse):
                    log.warning("claim refused client_id=%s node=%s holder=%s state=%s: %s",
                                client_id, self.node_id, m.holder, m.state.value,
                                m.why or action.text)
                    raise ConnectRefused(action.reason, action.text)
                elif isinstance(action, C.Open):
                    if action.record is None:
                        self._reclaim_handing(client_id, action.epoch)
                        return Claim(action.epoch, None, action.fresh_reason,
                                     opened=ticket.opened)
                    ticket.gate = gate = _Gate(m)
                    self.incoming[client_id] = gate
                    following = [a for a in actions if isinstance(a, C.StartExpiryTimer)]
                    for timer in following:
                        asyncio.get_running_loop().call_later(timer.delay, self._expired,
                                                              gate)
                    return Claim(action.epoch, action.record, opened=ticket.opened_installed,
                                 confirm=ticket.confirm)
                else:
                    raise AssertionError(f"unexpected action {action!r}")
            actions = following

    def _reclaim_handing(self, client_id: str, epoch: int) -> None:
        """The session opens here from the local copy: a copy still being handed over
        (the table came back to this node meanwhile: a promotion, a release of the node
        it went to) is taken back first, its hand-over can never move (``moved`` needs
        the current claim); one the table does not give back refuses the CONNECT."""
        local = self.broker.sessions.get(client_id)
        if local is None or local.state is not SessionState.HANDING_OVER:
            return
        out = self.outgoing.get(client_id)
        view = self.member.view
        if out is not None and out.copy is local and \
                out.state in (HolderState.HANDED, HolderState.RESTORED) and \
                view.holders.get(client_id) in (None, self.node_id) and \
                tuple(view.owners.get(client_id) or ()) == (self.node_id, epoch):
            self._hand_back(out, f"claimed here with epoch {epoch}")
            return
        raise ConnectRefused(ReasonCode.SERVER_UNAVAILABLE, "the session is being handed "
                             "over: connect again")

    async def _propose_claim(self, m: ClaimerHandover, deadline: float,
                             owner: str | None) -> list:
        client_id = m.client_id
        op = ("claim", client_id, self.node_id, m.clean_start)
        if owner is not None:
            op += (owner,)  # (bind_client_id: the table refuses another owner's claim)
        while True:
            fut = self.member.raft.submit(op)
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - _now()))
            if done and fut.exception() is None:
                break
            if not done:
                # pysyncobj may still commit it later (a minority that heals): give such a
                # claim back at once, so it takes nothing from a client connected elsewhere
                fut.add_done_callback(self._give_back(client_id))
            elif _now() < deadline - 0.05:
                await asyncio.sleep(0.05)  # refused (leader changing): try again
                continue
            return m.not_committed("not committed in time" if not done
                                   else repr(fut.exception()))
        epoch, holder = fut.result()
        if epoch is None:
            # (nothing was claimed: no session moves, the connected client stays)
            log.warning("claim refused client_id=%s node=%s: the session belongs to another "
                        "user (bind_client_id)", client_id, self.node_id)
            raise ConnectRefused(ReasonCode.NOT_AUTHORIZED, "this ClientID belongs to another "
                                 "user (bind_client_id)")
        return m.committed(epoch, holder, self._local_copy(client_id, epoch))

    def _local_copy(self, client_id: str, epoch: int) -> LocalCopy:
        local = self.broker.sessions.get(client_id)
        if local is None or local.state is not SessionState.HANDING_OVER:
            return LocalCopy.NONE
        out = self.outgoing.get(client_id)
        if out is not None and out.state in (HolderState.HANDED, HolderState.RESTORED) \
                and out.epoch < epoch and \
                self.member.view.holders.get(client_id) == self.node_id:
            return LocalCopy.HANDED_UNMOVED
        return LocalCopy.HANDING

    async def _ask_snapshot(self, m: ClaimerHandover, ask: C.AskSnapshot,
                            deadline: float) -> list:
        client_id, holder = m.client_id, ask.holder
        transport = self.member.transport
        request = SnapshotRequest(client_id, ask.epoch)
        while True:
            remaining = max(0.1, deadline - _now())
            if not transport.is_up(holder):
                # (in short steps: the holder may be declared down meanwhile)
                remaining = min(remaining, 0.5)
            try:
                answer = await transport.request(holder, *encode(request), remaining)
                break
            except PeerUnreachable as err:
                # down or restarting: it may be back within the takeover timeout
                if holder in self.member.view.down:
                    return m.holder_down()  # (declared down: its sessions moved on)
                if _now() >= deadline - 0.1:
                    return m.unreachable(repr(err))
                await asyncio.sleep(0.1)
            except RequestTimeout as err:
                return m.unreachable(repr(err))
            except RemoteError as err:
                log.error("snapshot failed on holder client_id=%s node=%s holder=%s: %s",
                          client_id, self.node_id, holder, err)
                return m.holder_error(str(err))
        if answer.get("stale"):
            return m.stale()
        if answer.get("retry"):
            return m.retry()
        if answer.get("busy"):
            return m.busy()
        if answer.get("none"):
            return m.none()
        owner = self.member.view.owners.get(client_id)
        if owner is not None and owner[1] > ask.epoch:
            # a newer claim, or a promotion from the holder's replica, came first while
            # the snapshot was on its way (the holder had not applied it): this copy must
            # not replace what the table gives to that one
            return m.stale()
        record = answer["record"]
        nchunks = answer.get("chunks", 0)
        if nchunks:
            chunks = self._chunks.pop((client_id, ask.epoch), {})
            if len(chunks) != nchunks:
                return m.unreachable(f"snapshot chunks missing: {len(chunks)}/{nchunks}")
            record["queue"] = [item for i in range(nchunks) for item in chunks[i]]
        return m.record(record, _now(), set(self.member.view.members),
                        self.config.takeover_timeout + self.config.barrier_timeout + 5.0)

    async def _wait_holder_change(self, client_id: str, holder: str, deadline: float):
        """The table's new holder (this node when nobody holds it), or False when it did
        not change before ``deadline``."""
        view = self.member.view
        while _now() < deadline:
            h = view.holders.get(client_id)
            if h != holder:
                return h if h is not None else self.node_id
            await asyncio.sleep(0.02)
        return False

    async def _confirm(self, ticket: _Ticket, session) -> bool | None:
        """INSTALLED: durable here, then ``moved`` (with the session's routes) proposed;
        the machine turns the outcome into the CONNACK's verdict."""
        gate = ticket.gate
        m = gate.machine
        member = self.member
        for action in m.opened():
            assert isinstance(action, C.AwaitDurable), action
            durable = self.broker.durable_wait()
            if durable is not None:
                await durable
        await failpoints.pause("takeover.before_moved")
        (propose,) = m.durable()
        # X's routes here in the same entry as the move (one loop iteration, one batch):
        # the nodes' barriers switch them to routes that are really there
        filters = sorted(session.subscriptions)
        if filters:
            member.raft.submit(("routes", self.node_id, filters, [])).add_done_callback(
                _retrieve)
        # the replicas that stored the session's seed become its in-sync set with the move
        replicas = await member.replication.seeds_stored(m.client_id, SEED_WAIT)
        try:
            moved = await member.raft.run(("moved", m.client_id, m.epoch, propose.holder,
                                           self.node_id, replicas),
                                          self.config.takeover_timeout)
        except RaftUnavailable as err:
            log.warning("hand-over not confirmed client_id=%s node=%s from=%s epoch=%d: %r "
                        "(the client is refused; the move may still commit)", m.client_id,
                        self.node_id, m.holder, m.epoch, err)
            (answer,) = m.move_unknown()
            if self.incoming.get(m.client_id) is not gate:
                self._drop_if_stale(gate)  # (the gate is down already)
            return answer.verdict
        if not moved:
            log.info("hand-over overtaken client_id=%s node=%s from=%s epoch=%d: a newer "
                     "claim came first", m.client_id, self.node_id, m.holder, m.epoch)
            (answer,) = m.move_refused()
            if self.incoming.get(m.client_id) is gate:
                del self.incoming[m.client_id]
            return answer.verdict
        (answer,) = m.move_committed()
        elapsed = _now() - ticket.t0
        self.stats["takeovers"] += 1
        self.stats["takeover_ms_total"] += elapsed * 1000
        self.latencies.append(elapsed)
        del self.latencies[:-1000]
        self.latency_hist.observe(elapsed)
        log.info("session taken over client_id=%s node=%s from=%s epoch=%d queued=%d "
                 "inflight=%d ms=%.1f", m.client_id, self.node_id, m.holder, m.epoch,
                 len(session.queue), len(session.inflight_out), elapsed * 1000)
        return answer.verdict

    def _give_back(self, client_id: str):
        def done(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            epoch, holder = fut.result()
            if holder == self.node_id:
                # the session is here: a release would drop it from the table (its next
                # connect elsewhere would start fresh); the claim takes nothing from
                # anyone (no other node has a copy), the next claim simply follows it
                log.info("late claim kept client_id=%s node=%s epoch=%d: the session is "
                         "held here", client_id, self.node_id, epoch)
                return
            log.info("late claim given back client_id=%s node=%s epoch=%d", client_id,
                     self.node_id, epoch)
            # the claim only: when another node held the session then, this node may hold
            # it by now (a promotion from that node's replica here), and keeps it
            op = ("release", client_id, self.node_id, epoch)
            self.member.raft.submit(op if holder is None else op + (False,))
        return done

    @property
    def _chunks(self) -> dict:
        return self.member.snapshot_chunks

    # -- the claiming side: the gate -------------------------------------------------------

    def _incoming_gate(self, gate: _Gate):
        m, me = gate.machine, self.node_id

        def admit_or_hold(session, msg, qos, retain, sub_ids) -> None:
            item = [msg, qos, retain, sub_ids]
            early = gate.carry is not None and (msg.via or me) in m.early
            # (a forward's sender table position: after a restart of this node, whether it
            # routed with the move is decided by it once the table is read)
            route = m.message(msg.via or me, item,
                              self.member.forward_position if msg.via else None)
            if route is C.Route.ADMIT:
                key = session.admit(msg, qos, retain, sub_ids)
                if early:  # (routed here with the routes from before our hand-over)
                    self._carry(gate, session, [_late_item(msg, qos, retain, sub_ids, key)])
            elif route is C.Route.HOLD:
                # held in memory until the old holder's late batch: its publisher's
                # PUBACK (or the forward's confirmation) waits until it is stored (the
                # wait rides with the held item; made only for the few held ones)
                held = self.member.loop.create_future()
                item.append(held)
                self.member.held_wait(held, m.client_id)
        return admit_or_hold

    def _run_gate(self, gate: _Gate, actions: list) -> None:
        """Perform a gated machine's actions (admit messages, take the gate down), then
        store what the gate still waits for."""
        self._perform_gate(gate, actions)
        self._save_gate(gate)

    def _save_gate(self, gate: _Gate) -> None:
        """The gate's waits, stored with the session (its mark's ``taking``), so that a
        restart of this node rebuilds the gate (``restore_gates``) instead of letting
        the old holder's late messages in after newer ones."""
        session, m = gate.session, gate.machine
        if session is None or session.state is SessionState.ENDED or \
                self.broker.sessions.get(m.client_id) is not session:
            return
        taking = Taking(m.holder, m.epoch, tuple(sorted(m.pending)),
                        tuple(sorted(m.awaiting))) if m.gated else None
        mark = HandoverMark.of(session)
        if mark.taking != taking:
            mark.taking = taking
            mark.save(session)
            self.broker.persist(session)

    def _perform_gate(self, gate: _Gate, actions: list) -> None:
        session = gate.session
        live = session is not None and session.state is not SessionState.ENDED
        for action in actions:
            if isinstance(action, C.Admit):
                held = []
                for item in action.items:
                    if live:
                        session.admit(*item[:4])
                    if len(item) > 4:
                        held.append(item[4])
                if held:
                    _decided(held)
            elif isinstance(action, C.Release):
                _decided([item[4] for item in action.items if len(item) > 4])
            elif isinstance(action, C.GateOff):
                if self.incoming.get(gate.machine.client_id) is gate:
                    del self.incoming[gate.machine.client_id]
                if live and session.gate is not None:
                    session.gate = None
                if not gate.done.done():
                    gate.done.set_result(None)
                self._drop_if_stale(gate)
            elif isinstance(action, C.StartExpiryTimer):
                asyncio.get_running_loop().call_later(action.delay, self._expired, gate)
            else:
                raise AssertionError(f"unexpected action {action!r}")

    def restore_gates(self) -> None:
        """At start, before any link is up: a session the store brought back with its
        gate still up (``taking``) gets it back, waiting for the same barriers and late
        batches (the old holder sends them again until this node answers that they are
        stored). Only this node's own barrier is known: its table, once read, has the
        move (or the session is not kept here). Peers that see this restart tell which
        moves they applied (``Switched.moves``)."""
        now = _now()
        for client_id, session in list(self.broker.sessions.items()):
            taking = HandoverMark.of(session).taking
            if taking is None or client_id in self.incoming:
                continue
            m = ClaimerHandover.restored(self.node_id, client_id, self.config.unreachable_owner,
                                         taking.holder, taking.epoch, taking.pending,
                                         taking.awaiting, now)
            gate = _Gate(m, restored=True)
            gate.session = session
            gate.opened.set_result(None)
            self.incoming[client_id] = gate
            session.gate = self._incoming_gate(gate)
            asyncio.get_running_loop().call_later(
                self.config.takeover_timeout + self.config.barrier_timeout + 5.0,
                self._expired, gate)
            log.warning("hand-over gate restored client_id=%s node=%s holder=%s epoch=%d "
                        "barriers=%s late=%s", client_id, self.node_id, taking.holder,
                        taking.epoch, sorted(m.pending), sorted(m.awaiting))

    def gate_promoted(self, session, taking: Taking) -> None:
        """``session`` was promoted here from the copy of a node that was taking it over
        from ``taking.holder``, its gate up: the gate goes on here (``promoted``), so that
        the old holder's late messages, which it redirects here, still come before what
        the nodes routed after them."""
        client_id = session.client_id
        view = self.member.view
        if not taking.awaiting or taking.holder == self.node_id or \
                taking.holder not in view.members or taking.holder in view.down or \
                client_id in self.incoming:
            return
        m = ClaimerHandover.promoted(self.node_id, client_id, self.config.unreachable_owner,
                                     taking.holder, taking.epoch, taking.awaiting, _now())
        gate = _Gate(m)
        gate.session = session
        gate.opened.set_result(None)
        self.incoming[client_id] = gate
        session.gate = self._incoming_gate(gate)
        self._save_gate(gate)
        asyncio.get_running_loop().call_later(self.config.barrier_timeout, self._expired, gate)
        log.warning("hand-over gate kept for a promoted session client_id=%s node=%s "
                    "holder=%s epoch=%d late=%s", client_id, self.node_id, taking.holder,
                    taking.epoch, sorted(m.awaiting))

    def claim_current(self, client_id: str) -> bool:
        """Is there a gate here whose claim is still the table's current one (its move
        may still commit)?"""
        gate = self.incoming.get(client_id)
        return gate is not None and tuple(self.member.view.owners.get(client_id) or ()) \
            == (self.node_id, gate.machine.epoch)

    def forget_gates(self) -> None:
        """Gates whose session is gone (a restart dropped a copy the table does not
        give this node)."""
        for client_id, gate in list(self.incoming.items()):
            session = gate.session
            if session is not None and (session.state is SessionState.ENDED or
                                        self.broker.sessions.get(client_id) is not session):
                del self.incoming[client_id]
                if not gate.done.done():
                    gate.done.set_result(None)

    def _drop_if_stale(self, gate: _Gate) -> None:
        """A copy installed for a hand-over whose move was never confirmed, once the
        table moved on: it is not the session (it would stay frozen here for good)."""
        m, session = gate.machine, gate.session
        view = self.member.view
        if session is None or self.broker.sessions.get(m.client_id) is not session or \
                session.state is SessionState.ENDED or session.client is not None or \
                not m.stale_copy(view.owners.get(m.client_id), view.holders.get(m.client_id)):
            return
        log.warning("stale copy dropped client_id=%s node=%s holder=%s epoch=%d", m.client_id,
                    self.node_id, view.holders.get(m.client_id), m.epoch)
        self.broker.end_session(session, "stale copy (its move never committed)",
                                release=False, will=False)

    def _expired(self, gate: _Gate) -> None:
        m = gate.machine
        if self.incoming.get(m.client_id) is not gate:
            return
        actions = m.expired(_now(), m.holder in self.member.view.members,
                            self.config.barrier_timeout)
        if m.state is C.ClaimerState.DONE:
            self._log_forced(m)
        self._run_gate(gate, actions)

    def _force(self, gate: _Gate, why: str) -> None:
        m = gate.machine
        actions = m.force(why)
        self._log_forced(m)
        self._run_gate(gate, actions)

    def _log_forced(self, m: ClaimerHandover) -> None:
        log.warning("hand-over completed without all late messages client_id=%s node=%s "
                    "holder=%s: %s", m.client_id, self.node_id, m.holder, m.why)

    def _take_back_late(self, gate: _Gate, session) -> None:
        """This node handed the session away and takes it back now, while that hand-over
        still waits for some node's barrier. What that node forwarded here before its
        barrier is in no snapshot (the holder we take the session from gave up waiting
        for it, to hand it on to us): it goes into the session taken back, after what the
        snapshot holds; and what it still forwards here before that barrier is admitted
        by the new gate (``ClaimerHandover.took_back``)."""
        client_id = gate.machine.client_id
        out = self.outgoing.get(client_id)
        if out is None or out.copy is session:
            return
        self._end_outgoing(client_id)  # (what it still sends goes into the session here)
        late, waiting = out.supersede()
        # (not those the session took already: a late batch it stored before it came back
        # here, whose answer a restart of this node may have lost)
        late = self._unseen(session, self.node_id, out.epoch, late)
        gate.machine.took_back(out.epoch, waiting, out.moved_at)
        for item in late:
            session.admit(*_late_message(item))
        # (they came after the kept ones; not those routed with its move: the node it went
        # to had them)
        moved_at = out.moved_at if out.moved_at is not None else self._left_at(client_id)
        late += self._decide(out, moved_at, into=session)
        if late or waiting:
            log.warning("hand-over of epoch %d to %s superseded before barriers from %s: "
                        "%d late messages kept client_id=%s node=%s", out.epoch, out.to,
                        waiting, len(late), client_id, self.node_id)
            gate.carry = (out.epoch, out.to)
            self._carry(gate, session, late)

    def _carry(self, gate: _Gate, session, items: list) -> None:
        """Messages routed to this node with the routes from before its hand-over of epoch
        ``gate.carry`` (kept by it, or arriving before a node's barrier of it), taken into
        the session this claim took back: they also go, as late messages of that epoch, to
        the node it was handed to, which holds the session should this claim's move not
        commit (else that node passes them back here, where they are known and skipped:
        ``late_seen`` under this node's name)."""
        if not items:
            return
        epoch, to = gate.carry
        me = self.node_id
        # each named, to be known when it comes back: by its store key, or (one the session
        # took without storing it yet) by a name of this process's own, below zero
        items = [i if i[4] else i[:4] + [-next(self._carry_names)] for i in items]
        self._unseen(session, me, epoch, items)  # (their names remembered, stored)
        batch = LateBatch(gate.machine.client_id, epoch, "relay", items, hops=1)
        key = (batch.client_id, epoch)
        task = asyncio.get_running_loop().create_task(
            self._send_carried(to, batch, self._carrying.get(key)))
        self._carrying[key] = task

        def done(t: asyncio.Task) -> None:
            if self._carrying.get(key) is t:
                del self._carrying[key]
        task.add_done_callback(done)

    async def _send_carried(self, to: str, batch: LateBatch, before) -> None:
        if before is not None:
            await asyncio.wait({before})  # (in the order they came)
        await self._request_late(to, batch)

    async def on_late(self, sender: str, batch: LateBatch) -> dict:
        """The old holder's late messages (a request): answered once they are stored
        here (or where the session went), so that it keeps them until then. A replica
        sends those of an old holder declared down in its name (``origin``)."""
        if batch.origin is not None:
            sender = batch.origin
        gate = self.incoming.get(batch.client_id)
        if gate is not None and gate.session is None and gate.machine.epoch == batch.epoch:
            # the session is being opened here (the CONNECT goes on in its own task): its
            # late messages go into it, not before it
            await asyncio.wait({gate.opened}, timeout=self.config.takeover_timeout)
        target = self._take_late(sender, batch)
        if target is not None:
            # the session left this node meanwhile: they follow it (the answer waits)
            log.warning("late messages for a session that left passed on client_id=%s "
                        "node=%s from=%s to=%s count=%d", batch.client_id, self.node_id,
                        sender, target, len(batch.messages))
            await self.member.transport.request(
                target, *encode(replace(batch, hops=batch.hops + 1)), 10.0)
            return {"stored": True}
        durable = self.broker.durable_wait()
        if durable is not None:
            await durable
        return {"stored": True}

    def _take_late(self, sender: str, batch: LateBatch) -> str | None:
        """Take a late batch; returns the node to pass it on to when the session is no
        longer here."""
        client_id = batch.client_id
        gate = self.incoming.get(client_id)
        if gate is None or gate.machine.epoch != batch.epoch or gate.machine.holder != sender:
            session = self.broker.sessions.get(client_id)
            raw = self._unseen(session, sender, batch.epoch, batch.messages)
            late = [_late_message(item) for item in raw]
            out = self.outgoing.get(client_id)
            if late and out is not None and out.copy is session \
                    and session.state is SessionState.HANDING_OVER:
                # handed on meanwhile (its gate would take them for routed ones and drop
                # them): they follow the session, kept in this copy's queue until then
                log.warning("late messages of an earlier hand-over relayed client_id=%s "
                            "from=%s epoch=%s to=%s count=%d", client_id, sender,
                            batch.epoch, out.to, len(late))
                mark = HandoverMark.of(session)
                for item, wire in zip(late, raw):
                    key = session.admit(*item)
                    if key and len(wire) > 4 and wire[4]:
                        mark.relayed[key] = (batch.epoch, wire[4])
                mark.save(session)
                self.broker.persist(session)
                # (as they came: the old holder's epoch and store keys name them wherever
                # they arrive, and a copy that has them already skips them)
                if batch.hops < RELAY_HOPS:
                    self._run_holder(out, out.relay(raw, batch.hops + 1, batch.epoch))
                return None
            if late and session is not None and session.state is not SessionState.ENDED:
                # the hand-over's state went with a restart of this node, or it completed
                # without these: the session is here (or passing through, its gate decides):
                # better late and out of order than lost
                log.warning("late messages of a finished hand-over delivered client_id=%s "
                            "from=%s epoch=%s count=%d", client_id, sender, batch.epoch,
                            len(late))
                if gate is not None and gate.session is session:
                    # a newer hand-over to here is gated: its gate orders what nodes route
                    # here (it would take these for a local publish routed with the old
                    # routes, and drop them); these are the old holder's, not routed
                    for item in late:
                        session.admit(*item)
                    return None
                for item in late:
                    session.deliver(*item)
                return None
            holder = self.member.view.holders.get(client_id)
            if late and session is None and holder not in (None, self.node_id) \
                    and batch.hops < RELAY_HOPS:
                return holder
            if late and session is None and not self.member.promotions_in():
                # restarting: the session may be promoted here, installed from its
                # replica copy once the table is caught up; the sender tries again
                raise RuntimeError(f"late messages for {client_id!r}: this node is still "
                                   "starting")
            if late:
                log.error("late messages for a session not here client_id=%s from=%s "
                          "epoch=%s count=%d: dropped", client_id, sender, batch.epoch,
                          len(late))
            return None
        late = [_late_message(item)
                for item in self._unseen(gate.session, sender, batch.epoch, batch.messages)]
        self._run_gate(gate, gate.machine.late(batch.source, late, batch.still_pending))
        return None

    def fold_outgoing(self, client_id: str, session) -> int:
        """The copy this node was handing over was replaced by ``session``, promoted here
        from the node it was handed to (declared down): what the hand-over kept for that
        node (late messages, forwards held undecided) goes into ``session``, since that
        node's replica never had it, and the hand-over ends. Returns how many."""
        out = self._end_outgoing(client_id)
        if out is None:
            return 0
        late, _waiting = out.supersede()
        late = self._unseen(session, self.node_id, out.epoch, late)
        for item in late:
            session.admit(*_late_message(item))
        taken = self._decide(out, None, into=session)
        if late or taken:
            log.warning("late messages of a hand-over to a node declared down kept in the "
                        "promoted session client_id=%s node=%s epoch=%d count=%d", client_id,
                        self.node_id, out.epoch, len(late) + len(taken))
        return len(late) + len(taken)

    def _unseen(self, session, sender: str, epoch: int, items: list) -> list:
        """The late messages of ``items`` this session has not taken yet (wire items); their
        keys are remembered with the session (stored, and in its record), so that an old
        holder that restarted before it saw our answer, and sends them again, causes no
        duplicate."""
        mark = HandoverMark.of(session) if session is not None else HandoverMark()
        # (under the old holder that sent them first: a batch passed on by a node the
        # session left names that node; the epoch names the old holder)
        sender = next((node for node, (e, _keys) in sorted(mark.late_seen.items())
                       if e == epoch), sender)
        seen = mark.late_seen.get(sender)
        known = set(seen[1]) if seen is not None and seen[0] == epoch else set()
        late, keys = [], []
        for item in items:
            key = item[4] if len(item) > 4 else 0  # (a node of an older version: no key)
            if key:
                if key in known:
                    continue
                keys.append(key)
            late.append(item)
        if keys and session is not None and session.state is not SessionState.ENDED:
            mark.late_seen[sender] = (epoch, sorted(known.union(keys)))
            mark.save(session)
            self.broker.persist(session)
        return late

    # -- every node: barriers and switches -------------------------------------------------

    def on_barrier(self, sender: str, barrier: Barrier) -> None:
        client_id, epoch = barrier.client_id, barrier.epoch
        gate = self.incoming.get(client_id)
        if gate is not None:
            self._run_gate(gate, gate.machine.barrier(sender, epoch))
        out = self.outgoing.get(client_id)
        if out is not None and out.epoch == epoch:
            self._decide(out, None, via=sender)  # (what came before its barrier is kept)
            self._run_holder(out, out.barrier(sender))

    def on_reset(self) -> None:
        """A Raft snapshot replaced this node's view (it lagged behind a log compaction,
        e.g. after a partition): the ``moved`` events inside it never came, so this node
        sent no barriers for them, and the hand-overs waiting for them would wait until
        it restarts. Its forwards from now on use the new routes: it tells every node so,
        on the same ordered links, after what it forwarded so far."""
        member = self.member
        member.flush_outbox()
        log.warning("routing table replaced by a Raft snapshot node=%s: barriers for every "
                    "hand-over sent", self.node_id)
        view, me = member.view, self.node_id
        position = view.tables.position
        # the moves inside it: hand-overs from and to here whose move is in the new table
        # (the position of the session's move away from here, or of the move to here)
        for client_id, out in list(self.outgoing.items()):
            if out.state is HolderState.HANDED and view.holders.get(client_id) not in (
                    None, me):
                moved_at = self._left_at(client_id)
                self._decide(out, moved_at)
                self._run_holder(out, out.move_applied(moved_at))
        for client_id, gate in list(self.incoming.items()):
            m = gate.machine
            if m.gated and m.moved_at is None and not m.unread and \
                    view.holders.get(client_id) == me and \
                    tuple(view.owners.get(client_id) or ()) == (me, m.epoch):
                self._run_gate(gate, m.move_applied(view.tables.moved_at.get(client_id)))
        for peer in list(view.members):
            if peer != self.node_id:
                # (and which of the hand-overs its restart resumed this table has moved:
                # a copy that moved on since cannot compare positions with that move's)
                member.transport.send(peer, *encode(Switched(
                    moved_from=self._moved_from(peer), position=position)))
        self.on_peer_switched(self.node_id, position=position)

    def on_peer_switched(self, peer: str, moves: dict | None = None,
                         moved_from: dict | None = None, position: int | None = None) -> None:
        """``peer`` routes with every move applied there (``moves`` None: a barrier for
        all of them, or those up to table ``position``), or with the moves to and from
        this node it names."""
        for out in list(self.outgoing.values()):
            if moved_from and moved_from.get(out.client_id, -1) >= out.epoch:
                self._run_holder(out, out.barrier(peer))
            elif moves is None:
                self._run_holder(out, out.peer_switched(peer, position))
        for gate in list(self.incoming.values()):
            m = gate.machine
            if moves is None:
                self._run_gate(gate, m.peer_switched(peer, position))
            elif moves.get(m.client_id, -1) >= m.epoch:
                self._run_gate(gate, m.peer_switched(peer))

    def on_peer_process(self, peer: str) -> None:
        """The first link with a process of ``peer`` (a new node, or one that restarted,
        or this node is new): it may have taken this node's barriers with an earlier
        process, or this node's earlier process sent them. It is told, before anything
        else this node routes to it, which moves to it and which of the hand-overs its
        handshake names (resumed after its restart) this node has applied: its restored
        gates and hand-overs wait for those."""
        view = self.member.view
        moves = {cid: view.owners[cid][1] for cid, holder in view.holders.items()
                 if holder == peer and cid in view.owners}
        self.member.transport.send(peer, *encode(Switched(moves, self._moved_from(peer))))

    def _moved_from(self, peer: str) -> dict:
        """The hand-overs ``peer``'s restart resumed (its handshake names them) whose move
        this node applied: another holder in its table, at that epoch or later."""
        view = self.member.view
        info = self.member.transport.peer_info(peer) or {}
        moved_from = {}
        for cid, epoch in info.get("handed") or ():
            owner = view.owners.get(cid)
            holder = view.holders.get(cid)
            if owner is not None and owner[1] >= epoch and holder != peer:
                moved_from[cid] = owner[1]
            elif owner is None and holder not in (None, peer):
                # (the claim given back since: another node holds it, so the session
                # moved from the peer at that epoch or later)
                moved_from[cid] = epoch
        return moved_from

    def on_peer_restarted(self, peer: str) -> None:
        """``peer`` is a new process: what its old one forwarded before its barrier has
        arrived or never will, so it counts as arrived for every hand-over waiting."""
        self.on_peer_switched(peer)
        for gate in list(self.incoming.values()):
            if gate.machine.holder == peer and gate.session is not None:
                # the old holder restarted: what it stored comes in one batch
                self._run_gate(gate, gate.machine.holder_restarted(
                    self.config.barrier_timeout))

    # -- every node: Raft events -------------------------------------------------------------

    def waiting_for(self, node: str) -> list[str]:
        """ClientIDs whose hand-over from ``node`` to here still waits for its late
        messages (what it held back for them is with it)."""
        return [cid for cid, gate in self.incoming.items() if gate.machine.holder == node]

    def on_claimed(self, client_id: str, owner: str, epoch: int, holder, clean: bool) -> None:
        if owner == self.node_id:
            return
        session = self.broker.sessions.get(client_id)
        if session is None:
            return
        pending = self.in_progress.get(client_id)
        if pending is not None:
            # a connect of this ClientID is being decided here: freeze once it settled
            asyncio.get_running_loop().create_task(self._freeze_after(pending, client_id,
                                                                      owner, epoch, clean))
            return
        self._freeze(client_id, owner, epoch, clean)

    async def _freeze_after(self, pending, client_id, owner, epoch, clean) -> None:
        await asyncio.wait({pending}, timeout=self.config.takeover_timeout)
        gate = self.incoming.get(client_id)
        if gate is not None:
            await asyncio.wait({gate.done}, timeout=self.config.barrier_timeout + 1.0)
        self._freeze(client_id, owner, epoch, clean)

    def _freeze(self, client_id: str, owner: str, epoch: int, clean: bool) -> None:
        view = self.member.view
        cur = view.owners.get(client_id)
        if cur is not None and cur[0] == self.node_id:
            return  # we claimed it again meanwhile
        session = self.broker.sessions.get(client_id)
        if session is not None and view.holders.get(client_id) != self.node_id \
                and client_id not in self.incoming \
                and session.state in (SessionState.ONLINE, SessionState.OFFLINE):
            # a copy installed for a hand-over whose move never committed: the table says
            # another node holds the session, and a move to here can no longer be applied
            # (it needs the current epoch), so this copy is not the session
            log.warning("stale copy dropped client_id=%s node=%s holder=%s", client_id,
                        self.node_id, view.holders.get(client_id))
            self.broker.end_session(session, f"stale copy (claimed by {owner} epoch {epoch})",
                                    release=False, will=False)
            return
        session = self.broker.freeze_session(client_id, f"claimed by {owner} epoch {epoch}")
        if session is not None and clean:
            # clean start elsewhere: this copy ends here (a pending will goes out from here)
            self.broker.end_session(session, f"clean start on {owner}", release=False)

    def on_released(self, client_id: str, node_id: str) -> None:
        """The owner gave the ClientID back: a session frozen for it here stays here."""
        if node_id == self.node_id or self.member.view.owners.get(client_id) is not None:
            return
        session = self.broker.sessions.get(client_id)
        if session is not None and session.state is SessionState.FROZEN \
                and self.member.view.holders.get(client_id) == self.node_id:
            self.broker.unfreeze(session, f"claim of {node_id} given back")

    def on_moved(self, client_id: str, epoch: int, from_node: str, to_node: str,
                 ok: bool = True, position: int | None = None) -> None:
        if not ok:
            return  # refused (an older claim's move, or the holder changed): no switch
        member = self.member
        me = self.node_id
        out = self.outgoing.get(client_id)
        if from_node == me and out is not None and out.epoch == epoch and \
                out.state is HolderState.RESTORED:
            self.judged(client_id, to_node)  # (its move, awaited since the restart)
        elif from_node == me and out is not None and out.epoch == epoch:
            if out.state is HolderState.HANDED:
                self._decide(out, position)  # (into the late batches the move sends)
            self._run_holder(out, out.move_applied(position))
        gate = self.incoming.get(client_id)
        if to_node == me and gate is not None and gate.machine.epoch == epoch \
                and position is not None:
            self._run_gate(gate, gate.machine.move_applied(position))
        # our barrier: what we forwarded before this point used the old routes. Forwards
        # wait in the outbox until the end of the loop iteration: flush them first, or the
        # barrier overtakes them and the old holder ends the session before they arrive
        # (the message is then lost).
        member.flush_outbox()
        barrier = Barrier(client_id, epoch)
        for target in (from_node, to_node):
            if target == me:
                self.on_barrier(me, barrier)
            else:
                member.transport.send(target, *encode(barrier))

    def status(self) -> dict:
        lat = sorted(self.latencies)
        return dict(self.stats, incoming=len(self.incoming), outgoing=len(self.outgoing),
                    takeover_ms_p50=round(lat[len(lat) // 2] * 1000, 2) if lat else None)


def _retrieve(fut: asyncio.Future) -> None:
    """The routes proposed with a move: the move's own outcome is what is looked at (the
    reconciliation loop repairs routes either way)."""
    if not fut.cancelled():
        fut.exception()
