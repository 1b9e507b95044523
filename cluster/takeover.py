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
"""

from __future__ import annotations

import asyncio
import logging
import time

from node import failpoints
from node.metrics import Histogram
from node.mqtt.codes import ReasonCode
from node.ownership import Claim, ConnectRefused
from node.session.record import message_from_record, message_to_record
from node.session.session import SessionState

from .routing import RaftUnavailable
from .transport import PeerUnreachable, RemoteError, RequestTimeout

log = logging.getLogger("shoal.takeover")

CHUNK = 2000  # queued messages per snapshot chunk
#: seconds a new holder waits at most for the old holder's late messages (a node that is
#: cut off that long delays the session's messages from it no longer: they are delivered
#: out of order with what the old holder still has)
INCOMING_LIMIT = 60.0
#: seconds an old holder keeps trying to hand its late messages to the new holder
LATE_DELIVERY_LIMIT = 120.0
#: upper bounds (seconds) of the takeover latency histogram (GET /metrics)
TAKEOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Incoming:
    """B side: a snapshot being received, and then the gate of the installed session."""

    __slots__ = ("client_id", "epoch", "holder", "chunks", "pending", "awaiting", "held",
                 "done", "session", "started")

    def __init__(self, client_id: str, epoch: int, holder: str, members: set[str]) -> None:
        self.client_id = client_id
        self.epoch = epoch
        self.holder = holder
        self.chunks: dict[int, list] = {}
        self.pending = set(members)  # nodes whose barrier has not arrived here
        self.awaiting = set(members)  # nodes whose late messages A has not sent yet
        self.held: dict[str, list] = {}  # per node: arrived after its barrier, before late
        self.started = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()  # set when late arrived
        self.session = None


class _Outgoing:
    """A side: a session handed over; per node, what it forwarded here with the old
    routes (``late``) goes to the new holder once that node's barrier arrived."""

    __slots__ = ("client_id", "epoch", "to", "pending", "late", "session", "timer", "moved",
                 "unconfirmed")

    def __init__(self, client_id, epoch, to, members, session) -> None:
        self.client_id = client_id
        self.epoch = epoch
        self.to = to
        self.pending = set(members)
        self.late: dict[str, list] = {}
        self.moved = False  # ``moved`` applied here: the hand-over is certain
        self.unconfirmed = 0  # late batches the new holder has not yet stored
        self.session = session
        self.timer = None


class Takeovers:
    def __init__(self, member) -> None:
        self.member = member
        self.broker = member.broker
        self.config = member.config
        self.node_id = member.node_id
        self.incoming: dict[str, _Incoming] = {}
        self.outgoing: dict[str, _Outgoing] = {}
        self.in_progress: dict[str, asyncio.Future] = {}  # claims being decided here
        self.stats = {"takeovers": 0, "takeovers_fresh": 0, "takeover_ms_total": 0.0,
                      "snapshots_sent": 0, "late_sent": 0, "barrier_timeouts": 0}
        self.latencies: list[float] = []  # seconds, last 1000 takeovers
        self.latency_hist = Histogram(TAKEOVER_BUCKETS)  # seconds, all takeovers: /metrics

    # -- B side: the CONNECT path ------------------------------------------------------------

    async def claim(self, client_id: str, clean_start: bool) -> Claim:
        """Claim ``client_id`` for a CONNECT here. While it is decided, and until the
        session is open, ``in_progress`` marks it: a claim of another node applied
        meanwhile freezes the session only once it exists."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        prev = self.in_progress.get(client_id)
        self.in_progress[client_id] = fut
        t0 = time.monotonic()
        try:
            if prev is not None:
                # the same ClientID is being connected here already: let it settle first
                await asyncio.wait({prev}, timeout=self.config.takeover_timeout)
            claim = await self._claim(client_id, clean_start, t0)
        except BaseException:
            self._settle(client_id, fut)
            # chunks of a snapshot whose answer never came
            for key in [k for k in self._chunks if k[0] == client_id]:
                del self._chunks[key]
            raise
        inner, inner_confirm = claim.opened, claim.confirm
        if inner_confirm is None:
            def opened(session) -> None:
                if inner is not None:
                    inner(session)
                self._settle(client_id, fut)
            claim.opened = opened
        else:
            # a hand-over: the ClientID is decided here once its move is committed (or
            # refused); a claim of another node applied meanwhile freezes it after that
            async def confirm(session):
                try:
                    return await inner_confirm(session)
                finally:
                    self._settle(client_id, fut)
            claim.confirm = confirm
        # bounded: if the session is never opened (a bug, a lost task), do not wait forever
        loop.call_later(self.config.takeover_timeout, self._settle, client_id, fut)
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
            if claim.opened is not None:
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

    def _settle(self, client_id: str, fut: asyncio.Future) -> None:
        if not fut.done():
            fut.set_result(None)
        if self.in_progress.get(client_id) is fut:
            del self.in_progress[client_id]

    async def _claim(self, client_id: str, clean_start: bool, t0: float) -> Claim:
        member = self.member
        timeout = self.config.takeover_timeout
        deadline = time.monotonic() + timeout
        while True:
            fut = member.raft.submit(("claim", client_id, self.node_id, clean_start))
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - time.monotonic()))
            if done and fut.exception() is None:
                break
            if not done:
                # pysyncobj may still commit it later (a minority that heals): give such a
                # claim back at once, so it takes nothing from a client connected elsewhere
                fut.add_done_callback(self._give_back(client_id))
            elif time.monotonic() < deadline - 0.05:
                await asyncio.sleep(0.05)  # refused (leader changing): try again
                continue
            why = "not committed in time" if not done else repr(fut.exception())
            log.warning("claim failed client_id=%s node=%s: %s", client_id, self.node_id, why)
            raise ConnectRefused(ReasonCode.SERVER_UNAVAILABLE,
                                 "no Raft quorum: ClientID cannot be claimed")
        epoch, holder = fut.result()
        if holder == self.node_id and not clean_start:
            local = self.broker.sessions.get(client_id)
            out = self.outgoing.get(client_id)
            if local is not None and local.state is SessionState.HANDING_OVER and \
                    out is not None and out.epoch < epoch and \
                    self.member.view.holders.get(client_id) == self.node_id:
                # handed to an older claim whose move was never applied (our claim came
                # first: it never will be): this copy is still the session
                self._hand_back(out, f"epoch {out.epoch} to {out.to} not moved; claimed "
                                     f"here with epoch {epoch}")
            elif local is not None and local.state is SessionState.HANDING_OVER:
                # handed to another node a moment ago: fetch it back from there
                holder = await self._wait_holder_change(client_id, self.node_id, deadline)
                if holder is None:
                    return self._unreachable(client_id, epoch, self.node_id,
                                             "hand-over did not end")
        if clean_start or holder is None or holder == self.node_id:
            return Claim(epoch)
        # the session is on another node: take it over
        while True:
            try:
                record = await self._fetch(client_id, epoch, holder, deadline)
            except _Retry:
                new_holder = await self._wait_holder_change(client_id, holder, deadline)
                if new_holder is None:
                    return self._unreachable(client_id, epoch, holder, "hand-over did not end")
                if new_holder == self.node_id:
                    return Claim(epoch)
                holder = new_holder
                continue
            except (PeerUnreachable, RequestTimeout) as err:
                return self._unreachable(client_id, epoch, holder, repr(err))
            break
        if record is None:
            return Claim(epoch)  # the holder had no session (it ended): a fresh one
        inc = _Incoming(client_id, epoch, holder, set(member.view.members))
        self.incoming[client_id] = inc

        def opened(session) -> None:
            inc.session = session
            self._take_back_late(client_id, session)
            session.gate = self._incoming_gate(inc)

        async def confirm(session):
            """CONNACK waits for this: the installed session durable here first, then
            ``moved`` committed. Until then the old holder keeps its copy, so a crash of
            this node before it (or a newer claim first) loses nothing. True: moved;
            False: a newer claim came first (this copy must go); None: not known in time
            (the copy stays, the move may still commit)."""
            durable = self.broker.durable_wait()
            if durable is not None:
                await durable
            await failpoints.pause("takeover.before_moved")
            # X's routes here in the same entry as the move (one loop iteration, one
            # batch): the nodes' barriers switch them to routes that are really there
            filters = sorted(session.subscriptions)
            if filters:
                member.raft.submit(("routes", self.node_id, filters, [])).add_done_callback(
                    _retrieve)
            try:
                moved = await member.raft.run(("moved", client_id, epoch, holder, self.node_id),
                                              self.config.takeover_timeout)
            except RaftUnavailable as err:
                log.warning("hand-over not confirmed client_id=%s node=%s from=%s epoch=%d: "
                            "%r (the client is refused; the move may still commit)",
                            client_id, self.node_id, holder, epoch, err)
                return None
            if not moved:
                log.info("hand-over overtaken client_id=%s node=%s from=%s epoch=%d: a newer "
                         "claim came first", client_id, self.node_id, holder, epoch)
                if self.incoming.get(client_id) is inc:
                    del self.incoming[client_id]
                return False
            elapsed = time.monotonic() - t0
            self.stats["takeovers"] += 1
            self.stats["takeover_ms_total"] += elapsed * 1000
            self.latencies.append(elapsed)
            del self.latencies[:-1000]
            self.latency_hist.observe(elapsed)
            log.info("session taken over client_id=%s node=%s from=%s epoch=%d queued=%d "
                     "inflight=%d ms=%.1f", client_id, self.node_id, holder, epoch,
                     len(session.queue), len(session.inflight_out), elapsed * 1000)
            return True

        asyncio.get_running_loop().call_later(
            self.config.takeover_timeout + self.config.barrier_timeout + 5.0,
            self._incoming_expired, inc)
        return Claim(epoch, record, opened=opened, confirm=confirm)

    def _give_back(self, client_id: str):
        def done(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            epoch, _holder = fut.result()
            log.info("late claim given back client_id=%s node=%s epoch=%d", client_id,
                     self.node_id, epoch)
            self.member.raft.submit(("release", client_id, self.node_id, epoch))
        return done

    def _unreachable(self, client_id: str, epoch: int, holder: str, why: str) -> Claim:
        if self.config.unreachable_owner == "refuse":
            log.warning("takeover refused client_id=%s node=%s holder=%s: %s", client_id,
                        self.node_id, holder, why)
            raise ConnectRefused(ReasonCode.SERVER_UNAVAILABLE,
                                 f"node {holder} holding the session is unreachable")
        self.stats["takeovers_fresh"] += 1
        log.warning("previous session lost, starting fresh client_id=%s node=%s holder=%s: %s",
                    client_id, self.node_id, holder, why)
        # the new session lives here now: make this node its holder
        self.member.raft.submit(("moved", client_id, epoch, holder, self.node_id))
        return Claim(epoch, None, fresh_reason=f"node {holder} unreachable")

    async def _fetch(self, client_id: str, epoch: int, holder: str, deadline: float):
        member = self.member
        while True:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                answer = await member.transport.request(
                    holder, "snapshot", {"client_id": client_id, "epoch": epoch}, remaining)
                break
            except PeerUnreachable:
                # down or restarting: it may be back within the takeover timeout
                if time.monotonic() >= deadline - 0.1:
                    raise
                await asyncio.sleep(0.1)
            except RemoteError as err:
                log.error("snapshot failed on holder client_id=%s node=%s holder=%s: %s",
                          client_id, self.node_id, holder, err)
                raise ConnectRefused(ReasonCode.SERVER_BUSY,
                                     f"session hand-over failed on {holder}") from err
        if answer.get("stale"):
            raise ConnectRefused(ReasonCode.SERVER_BUSY,
                                 "a newer connection of this ClientID took over")
        if answer.get("retry"):
            raise _Retry()
        if answer.get("none"):
            return None
        record = answer["record"]
        nchunks = answer.get("chunks", 0)
        if nchunks:
            inc_chunks = self._chunks.pop((client_id, epoch), {})
            if len(inc_chunks) != nchunks:
                raise PeerUnreachable(f"snapshot chunks missing: {len(inc_chunks)}/{nchunks}")
            queue = []
            for i in range(nchunks):
                queue.extend(inc_chunks[i])
            record["queue"] = queue
        return record

    async def _wait_holder_change(self, client_id: str, holder: str, deadline: float):
        view = self.member.view
        while time.monotonic() < deadline:
            h = view.holders.get(client_id)
            if h != holder:
                return h if h is not None else self.node_id
            await asyncio.sleep(0.02)
        return None

    @property
    def _chunks(self) -> dict:
        return self.member.snapshot_chunks

    def _take_back_late(self, client_id: str, session) -> None:
        """This node handed the session away (``out``) and takes it back now, while that
        hand-over still waits for some node's barrier. What that node forwarded here
        before its barrier is in no snapshot (the holder we take the session from gave
        up waiting for it, to hand it on to us): it goes into the session taken back,
        after what the snapshot holds. (Before, a later hand-over from here replaced
        ``out`` and these messages were lost.)"""
        out = self.outgoing.get(client_id)
        if out is None or out.session is session:
            return
        del self.outgoing[client_id]
        if out.timer is not None:
            out.timer.cancel()
        late = [item for source in sorted(out.late) for item in out.late[source]]
        waiting = sorted(out.pending)
        out.late.clear()
        out.pending.clear()
        for item in late:
            session.admit(*_late_message(item))
        if late or waiting:
            log.warning("hand-over of epoch %d to %s superseded before barriers from %s: "
                        "%d late messages kept client_id=%s node=%s", out.epoch, out.to,
                        waiting, len(late), client_id, self.node_id)

    def _relay_late(self, out: _Outgoing, late: list) -> None:
        """Late messages for a copy handed on meanwhile: they follow the session to its
        next holder (kept in this copy's queue, on disk, until it has them)."""
        session = out.session
        items = []
        for msg, q, r, s in late:
            key = session.admit(msg, q, r, s)
            items.append(_late_item(msg, q, r, s, key))
        out.unconfirmed += 1
        self.stats["late_sent"] += len(items)
        asyncio.get_running_loop().create_task(self._deliver_late(out, {
            "client_id": out.client_id, "epoch": out.epoch, "source": "relay",
            "messages": items}))

    def _incoming_gate(self, inc: _Incoming):
        def gate(session, msg, qos, retain, sub_ids) -> None:
            via = msg.via or self.node_id
            if via in inc.pending:
                return  # routed with the old routes: the old holder keeps it for X
            if via in inc.awaiting:
                # after that node's barrier: behind what it sent the old holder before
                inc.held.setdefault(via, []).append((msg, qos, retain, sub_ids))
                return
            session.admit(msg, qos, retain, sub_ids)
        return gate

    def _incoming_expired(self, inc: _Incoming) -> None:
        if self.incoming.get(inc.client_id) is not inc or inc.done.done():
            return
        if self.member.transport.is_up(inc.holder) and inc.holder in self.member.view.members \
                and time.monotonic() - inc.started < INCOMING_LIMIT:
            # the old holder still waits for a node's barrier (one that is down or cut
            # off): its messages come once that node is back
            asyncio.get_running_loop().call_later(self.config.barrier_timeout,
                                                  self._incoming_expired, inc)
            return
        self._force_complete(inc, "the old holder is gone")

    def _force_complete(self, inc: _Incoming, why: str) -> None:
        """End the gate without the late messages still missing (their node or the old
        holder is gone, or the session moves on): what it holds is delivered."""
        log.warning("hand-over completed without all late messages client_id=%s node=%s "
                    "holder=%s: %s; missing from %s", inc.client_id, self.node_id, inc.holder,
                    why, sorted(inc.awaiting))
        inc.pending.clear()  # what went to the old holder went with it
        for node in list(inc.awaiting):
            self._late_from(inc, node, [])
        self._maybe_done(inc)

    async def on_late(self, sender: str, body: dict) -> dict:
        """The old holder's late messages (a request): answered once they are stored
        here, so that it keeps them until then."""
        self._take_late(sender, body)
        durable = self.broker.durable_wait()
        if durable is not None:
            await durable
        return {"stored": True}

    def _take_late(self, sender: str, body: dict) -> None:
        client_id = body["client_id"]
        inc = self.incoming.get(client_id)
        items = body["messages"]
        if inc is None or inc.epoch != body["epoch"] or inc.holder != sender:
            session = self.broker.sessions.get(client_id)
            late = self._unseen(session, sender, body["epoch"], items)
            out = self.outgoing.get(client_id)
            if late and out is not None and out.session is session \
                    and session.state is SessionState.HANDING_OVER:
                # handed on meanwhile (its gate would take them for routed ones and drop
                # them): they follow the session
                log.warning("late messages of an earlier hand-over relayed client_id=%s "
                            "from=%s epoch=%s to=%s count=%d", client_id, sender,
                            body["epoch"], out.to, len(late))
                self._relay_late(out, late)
                return
            if late and session is not None and session.state is not SessionState.ENDED:
                # the hand-over's state went with a restart of this node, or it completed
                # without these: the session is here (or passing through, its gate decides):
                # better late and out of order than lost
                log.warning("late messages of a finished hand-over delivered client_id=%s "
                            "from=%s epoch=%s count=%d", client_id, sender, body["epoch"],
                            len(late))
                for item in late:
                    session.deliver(*item)
                return
            if late:
                log.error("late messages for a session not here client_id=%s from=%s "
                          "epoch=%s count=%d: dropped", client_id, sender, body["epoch"],
                          len(late))
            return
        late = self._unseen(inc.session, sender, body["epoch"], items)
        self._late_from(inc, body["source"], late)

    def _unseen(self, session, sender: str, epoch: int, items: list) -> list:
        """The late messages of ``items`` this session has not taken yet, decoded; their
        keys are remembered with the session (stored, and in its record), so that an old
        holder that restarted before it saw our answer, and sends them again, causes no
        duplicate."""
        seen = session.late_seen.get(sender) if session is not None else None
        known = set(seen[1]) if seen is not None and seen[0] == epoch else set()
        late, keys = [], []
        for item in items:
            key = item[4] if len(item) > 4 else 0  # (a node of an older version: no key)
            if key:
                if key in known:
                    continue
                keys.append(key)
            late.append(_late_message(item))
        if keys and session is not None and session.state is not SessionState.ENDED:
            session.late_seen[sender] = [epoch, sorted(known.union(keys))]
            self.broker.persist(session)
        return late

    def _late_from(self, inc: _Incoming, source: str, late: list) -> None:
        """What ``source`` forwarded to the old holder before its barrier (``late``), then
        what it sent here after it; once every node's are in, the gate goes."""
        session = inc.session
        live = session is not None and session.state is not SessionState.ENDED
        if live:
            for item in late:
                session.admit(*item)
        held = inc.held.pop(source, [])
        inc.awaiting.discard(source)
        if live:
            for item in held:
                session.admit(*item)
        self._maybe_done(inc)

    def _maybe_done(self, inc: _Incoming) -> None:
        """Every node's barrier arrived here and every node's late messages too: the gate
        has nothing left to order."""
        if inc.awaiting or inc.pending or self.incoming.get(inc.client_id) is not inc:
            return
        del self.incoming[inc.client_id]
        session = inc.session
        if session is not None and session.state is not SessionState.ENDED:
            session.gate = None
        if not inc.done.done():
            inc.done.set_result(None)

    # -- every node: Raft events ---------------------------------------------------------------

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
        inc = self.incoming.get(client_id)
        if inc is not None:
            await asyncio.wait({inc.done}, timeout=self.config.barrier_timeout + 1.0)
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
                 ok: bool = True) -> None:
        if not ok:
            return  # refused (an older claim's move, or the holder changed): no switch
        member = self.member
        me = self.node_id
        out = self.outgoing.get(client_id)
        if from_node == me and out is not None and out.epoch == epoch and out.timer is None:
            out.moved = True
            # the move is committed: from now on the missing barriers are waited for a
            # bounded time only (a node that went down sends none)
            out.timer = asyncio.get_running_loop().call_later(
                self.config.barrier_timeout, self._barrier_timeout, out)
        # our barrier: what we forwarded before this point used the old routes. Forwards
        # wait in the outbox until the end of the loop iteration: flush them first, or the
        # barrier overtakes them and the old holder ends the session before they arrive
        # (the message is then lost).
        member.flush_outbox()
        for target in (from_node, to_node):
            if target == me:
                self.on_barrier(me, {"client_id": client_id, "epoch": epoch})
            else:
                member.transport.send(target, "barrier", {"client_id": client_id,
                                                          "epoch": epoch})

    def on_barrier(self, sender: str, body: dict) -> None:
        client_id, epoch = body["client_id"], body["epoch"]
        inc = self.incoming.get(client_id)
        if inc is not None and inc.epoch == epoch:
            inc.pending.discard(sender)
            self._maybe_done(inc)
        out = self.outgoing.get(client_id)
        if out is not None and out.epoch == epoch and sender in out.pending:
            self._send_late(out, sender)
            if not out.pending and not out.unconfirmed:
                self._finish_outgoing(out)

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
        for peer in list(member.view.members):
            if peer != self.node_id:
                member.transport.send(peer, "switched", {})
        self.on_peer_switched(self.node_id)

    def on_peer_switched(self, peer: str) -> None:
        """``peer`` routes with every move applied here (a barrier for all of them)."""
        for out in list(self.outgoing.values()):
            # (before its move is applied a hand-over is not certain: everything stays)
            if out.moved and peer in out.pending:
                self._send_late(out, peer)
                if not out.pending and not out.unconfirmed:
                    self._finish_outgoing(out)
        for inc in list(self.incoming.values()):
            if peer in inc.pending:
                inc.pending.discard(peer)
                self._maybe_done(inc)

    def on_peer_restarted(self, peer: str) -> None:
        """``peer`` is a new process: what its old one forwarded before its barrier has
        arrived or never will, so it counts as arrived for every hand-over waiting."""
        self.on_peer_switched(peer)
        for inc in list(self.incoming.values()):
            if inc.holder == peer and inc.session is not None:
                # the old holder restarted: its late messages went with its old process
                self._force_complete(inc, "the old holder restarted")
            self._maybe_done(inc)

    def resend_after_restart(self, session, holder: str) -> None:
        """A restart found this copy handed over (``session.handed``) and ``holder``
        holding the session: the move committed. Queued messages that reached the copy
        after its snapshot may never have reached the new holder (the crash came before
        it answered that it stored them): they go to ``holder`` now, as the hand-over's
        late messages (named by their keys, so a second copy is recognised there). The
        copy stays, not serving, until the holder has stored them."""
        _to, epoch, first = session.handed
        late = [_late_item(m, q, r, s, key) for m, q, r, s, key in session.queue
                if key >= first]
        session.freeze("restarted during a hand-over")
        session.hand_over(f"late messages to {holder}")
        out = _Outgoing(session.client_id, epoch, holder, set(), session)
        out.moved = True
        self.outgoing[session.client_id] = out
        session.gate = self._outgoing_gate(out)  # (nothing is late any more: no source)
        log.warning("late messages of a hand-over sent again after a restart client_id=%s "
                    "node=%s to=%s epoch=%s count=%d", session.client_id, self.node_id,
                    holder, epoch, len(late))
        out.late["restart"] = late
        out.pending.add("restart")
        self._send_late(out, "restart")

    def _send_late(self, out: _Outgoing, source: str) -> None:
        """``source``'s barrier arrived: everything it forwarded here with the old routes
        did too; hand those messages to the new holder. This copy stays until the new
        holder has stored them (they were acknowledged to their publishers)."""
        out.pending.discard(source)
        late = out.late.pop(source, [])
        out.unconfirmed += 1
        self.stats["late_sent"] += len(late)
        asyncio.get_running_loop().create_task(self._deliver_late(out, {
            "client_id": out.client_id, "epoch": out.epoch, "source": source,
            "messages": late}))

    async def _deliver_late(self, out: _Outgoing, body: dict) -> None:
        """Until the new holder answers that it stored them (bounded: a holder that stays
        away that long has lost the session's newest messages with its disk anyway)."""
        transport = self.member.transport
        deadline = time.monotonic() + LATE_DELIVERY_LIMIT
        try:
            await failpoints.pause("takeover.before_late")
            for attempt in range(10_000):
                try:
                    await transport.request(out.to, "late", body, 10.0)
                    break
                except (PeerUnreachable, RequestTimeout, RemoteError) as err:
                    if time.monotonic() >= deadline:
                        log.error("late messages not delivered client_id=%s node=%s to=%s "
                                  "count=%d after %d attempts: %r", out.client_id,
                                  self.node_id, out.to, len(body["messages"]), attempt + 1,
                                  err)
                        break
                    await asyncio.sleep(0.2)  # the new holder restarting: try again
            await failpoints.pause("takeover.after_late")
        finally:
            out.unconfirmed -= 1
            # (cancelled at shutdown: the copy stays, in the store too)
        if not out.pending and not out.unconfirmed and self.outgoing.get(out.client_id) is out:
            self._finish_outgoing(out)

    # -- A side: handing a session over ----------------------------------------------------

    async def on_snapshot_request(self, sender: str, body: dict) -> dict:
        client_id, epoch = body["client_id"], body["epoch"]
        view = self.member.view
        deadline = time.monotonic() + 2.0
        while True:
            cur = view.owners.get(client_id)
            if cur is not None and cur[1] >= epoch:
                break
            if time.monotonic() >= deadline:
                return {"retry": True}
            await asyncio.sleep(0.01)  # our Raft view is behind: let it catch up
        if cur != (sender, epoch):
            return {"stale": True}
        pending = self.in_progress.get(client_id)
        if pending is not None:
            await asyncio.wait({pending}, timeout=self.config.takeover_timeout)
        inc = self.incoming.get(client_id)
        if inc is not None:
            await asyncio.wait({inc.done}, timeout=self.config.barrier_timeout + 1.0)
            if self.incoming.get(client_id) is inc:
                # our own hand-over still waits for a node's late messages: what it holds
                # goes into the session now, so the record carries it
                self._force_complete(inc, f"handed on to {sender}")
        if view.owners.get(client_id) != (sender, epoch):
            return {"stale": True}  # claimed again while we waited
        session = self.broker.sessions.get(client_id)
        if session is None:
            return {"none": True}
        if session.state is SessionState.HANDING_OVER:
            out = self.outgoing.get(client_id)
            if out is None or out.epoch >= epoch or view.holders.get(client_id) != self.node_id:
                return {"retry": True}
            # handed to an older claim whose move was never applied: it can no longer be
            # (``moved`` needs the current epoch), so this copy is still the session
            self._hand_back(out, f"epoch {out.epoch} to {out.to} not moved; epoch {epoch} asks")
        if session.state is not SessionState.FROZEN:
            # not frozen yet (the claim's listener runs right after the view update)
            self._freeze(client_id, sender, epoch, False)
            session = self.broker.sessions.get(client_id)
            if session is None:
                return {"none": True}
        record = self.broker.snapshot(session)
        session.hand_over(f"snapshot for {sender} epoch {epoch}")
        # on disk before any late message (the log keeps order): after a crash, the
        # queued messages from this key on are the ones the new holder may lack
        session.handed = [sender, epoch, session.seq]
        self.broker.persist(session)
        out = _Outgoing(client_id, epoch, sender, set(view.members), session)
        self.outgoing[client_id] = out
        session.gate = self._outgoing_gate(out)
        # no timer yet: until ``moved`` is applied here this copy is the session (the new
        # node may die before its move commits); on_moved starts the barrier timeout
        queue = record["queue"]
        nchunks = 0
        if len(queue) > CHUNK:
            record["queue"] = []
            for i in range(0, len(queue), CHUNK):
                self.member.transport.send(sender, "snap_chunk", {
                    "client_id": client_id, "epoch": epoch, "i": nchunks,
                    "items": queue[i:i + CHUNK]})
                nchunks += 1
        self.stats["snapshots_sent"] += 1
        return {"record": record, "chunks": nchunks}

    def _outgoing_gate(self, out: _Outgoing):
        def gate(session, msg, qos, retain, sub_ids) -> None:
            via = msg.via or self.node_id
            if via in out.pending:
                # into this copy's queue, on disk: until the new holder has them (or the
                # hand-over is taken back) they exist nowhere else; the store key names
                # the message for the new holder (a resend after a restart is recognised)
                key = session.admit(msg, qos, retain, sub_ids)
                out.late.setdefault(via, []).append(_late_item(msg, qos, retain, sub_ids,
                                                               key))
            # else: routed with the new routes, the new holder has it
        return gate

    def _hand_back(self, out: _Outgoing, why: str) -> None:
        """The hand-over ``out`` will never complete: the session is frozen here again,
        with what arrived for it meanwhile appended to its queue."""
        del self.outgoing[out.client_id]
        if out.timer is not None:
            out.timer.cancel()
        session = out.session
        session.gate = None
        session.hand_back(why)
        session.handed = None
        self.broker.persist(session)
        # the late messages are in the queue already (the gate put them there too)
        late = sum(len(items) for items in out.late.values())
        out.late.clear()
        log.warning("hand-over taken back client_id=%s node=%s: %s (%d late messages "
                    "kept in the queue)", out.client_id, self.node_id, why, late)

    def _barrier_timeout(self, out: _Outgoing) -> None:
        """Barriers still missing ``barrier_timeout`` after the move: a node that left the
        cluster sends none (its late messages, if any, go now). A member that is down or
        cut off is waited for: what it forwarded here before its barrier is still to come,
        and the new holder already has everything from the other nodes."""
        if self.outgoing.get(out.client_id) is not out:
            return
        gone = [n for n in out.pending if n not in self.member.view.members]
        if gone:
            self.stats["barrier_timeouts"] += 1
            log.warning("barriers missing client_id=%s node=%s from=%s: nodes left the "
                        "cluster", out.client_id, self.node_id, sorted(gone))
            for node in gone:
                self._send_late(out, node)
            if not out.pending and not out.unconfirmed:
                self._finish_outgoing(out)
                return
        out.timer = asyncio.get_running_loop().call_later(self.config.barrier_timeout,
                                                          self._barrier_timeout, out)

    def _finish_outgoing(self, out: _Outgoing) -> None:
        del self.outgoing[out.client_id]
        if out.timer is not None:
            out.timer.cancel()
        session = out.session
        if session.state is not SessionState.ENDED:
            session.gate = None
            self.broker.end_session(session, f"moved to {out.to}", release=False, will=False)

    def status(self) -> dict:
        lat = sorted(self.latencies)
        return dict(self.stats, incoming=len(self.incoming), outgoing=len(self.outgoing),
                    takeover_ms_p50=round(lat[len(lat) // 2] * 1000, 2) if lat else None)


def _late_item(msg, qos: int, retain: bool, sub_ids, key: int) -> list:
    """A late message on the wire: [message record, qos, retain, sub_ids, store key on
    the old holder (0: not stored there)]."""
    return [message_to_record(msg), qos, retain, list(sub_ids) if sub_ids else None, key]


def _late_message(item: list) -> tuple:
    """(msg, qos, retain, sub_ids) of a ``_late_item``."""
    m, qos, retain, sub_ids = item[:4]
    return message_from_record(m), qos, retain, tuple(sub_ids) if sub_ids else None


def _retrieve(fut: asyncio.Future) -> None:
    """The routes proposed with a move: the move's own outcome is what is looked at (the
    reconciliation loop repairs routes either way)."""
    if not fut.cancelled():
        fut.exception()


class _Retry(Exception):
    """The holder is handing the session to someone else: wait for the holder to change."""
