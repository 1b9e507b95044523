"""Session hand-over between nodes (DESIGN.md, "Session takeover").

Client X connects to B; A holds X's session.

1. B claims X through Raft: a new epoch; the answer names the holder (A).
2. Every node applies the claim; A closes X's connection there (0x8E) and FREEZES the
   session (no delivery; messages still append to its queue).
3. B asks A for the session at that epoch (``snapshot``). A answers with the record
   (queue streamed in chunks first when it is long), moves to HANDING_OVER, and from now
   on keeps what still arrives for X in a ``late`` list, through a gate.
4. B installs the record, sends CONNACK (session present 1), re-sends inflight messages,
   then the queue, and proposes ``moved(X, epoch, A, B)`` in the same Raft entry as the
   routes of X's filters on B.
5. Each node P, applying ``moved``, sends a ``barrier`` to A and to B on the same ordered
   link its forwarded PUBLISHes travel. So a message P forwarded before its barrier was
   routed with the old routes (A keeps it for X), and one after it with the new routes
   (B delivers it). B's gate drops X's messages from nodes whose barrier has not arrived
   (A has them) and holds the others; A's gate appends to ``late`` only messages from
   nodes whose barrier has not arrived. When A has every barrier (or after
   ``barrier_timeout`` for an unreachable node) it sends ``late`` to B and deletes its copy;
   B delivers ``late``, then what it held, and removes its gate. Each message reaches X
   once, and in the order its publisher's node forwarded it.

Every message about X carries the epoch; an older epoch is refused (``stale``). Two claims
racing for X both ask the holder: it hands the session only to the current owner's epoch;
the loser's connection is closed when the winner's claim is applied on its node.
"""

from __future__ import annotations

import asyncio
import logging
import time

from node.metrics import Histogram
from node.mqtt.codes import ReasonCode
from node.ownership import Claim, ConnectRefused
from node.session.record import message_from_record, message_to_record
from node.session.session import SessionState

from .transport import PeerUnreachable, RemoteError, RequestTimeout

log = logging.getLogger("shoal.takeover")

CHUNK = 2000  # queued messages per snapshot chunk
#: upper bounds (seconds) of the takeover latency histogram (GET /metrics)
TAKEOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Incoming:
    """B side: a snapshot being received, and then the gate of the installed session."""

    __slots__ = ("client_id", "epoch", "holder", "chunks", "pending", "held", "done", "session")

    def __init__(self, client_id: str, epoch: int, holder: str, members: set[str]) -> None:
        self.client_id = client_id
        self.epoch = epoch
        self.holder = holder
        self.chunks: dict[int, list] = {}
        self.pending = set(members)  # nodes whose barrier has not arrived here
        self.held: list = []
        self.done = asyncio.get_running_loop().create_future()  # set when late arrived
        self.session = None


class _Outgoing:
    """A side: a session handed over, waiting for barriers before sending ``late``."""

    __slots__ = ("client_id", "epoch", "to", "pending", "late", "session", "timer")

    def __init__(self, client_id, epoch, to, members, session) -> None:
        self.client_id = client_id
        self.epoch = epoch
        self.to = to
        self.pending = set(members)
        self.late: list = []
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
        inner = claim.opened

        def opened(session) -> None:
            if inner is not None:
                inner(session)
            self._settle(client_id, fut)

        claim.opened = opened
        # bounded: if the session is never opened (a bug, a lost task), do not wait forever
        loop.call_later(self.config.takeover_timeout, self._settle, client_id, fut)
        return claim

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
            if local is not None and local.state is SessionState.HANDING_OVER:
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
            session.gate = self._incoming_gate(inc)
            # X's routes on this node are proposed while the record is installed; "moved"
            # joins them in the same Raft entry (one loop iteration, one batch).
            member.raft.submit(("moved", client_id, epoch, holder, self.node_id))
            elapsed = time.monotonic() - t0
            self.stats["takeovers"] += 1
            self.stats["takeover_ms_total"] += elapsed * 1000
            self.latencies.append(elapsed)
            del self.latencies[:-1000]
            self.latency_hist.observe(elapsed)
            log.info("session taken over client_id=%s node=%s from=%s epoch=%d queued=%d "
                     "inflight=%d ms=%.1f", client_id, self.node_id, holder, epoch,
                     len(session.queue), len(session.inflight_out), elapsed * 1000)

        asyncio.get_running_loop().call_later(
            self.config.takeover_timeout + self.config.barrier_timeout + 5.0,
            self._incoming_expired, inc)
        return Claim(epoch, record, opened=opened)

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

    def _incoming_gate(self, inc: _Incoming):
        def gate(session, msg, qos, retain, sub_ids) -> None:
            via = msg.via or self.node_id
            if via in inc.pending:
                return  # routed with the old routes: the old holder keeps it for X
            inc.held.append((msg, qos, retain, sub_ids))
        return gate

    def _incoming_expired(self, inc: _Incoming) -> None:
        if self.incoming.get(inc.client_id) is inc and not inc.done.done():
            log.warning("no late messages from old holder client_id=%s node=%s holder=%s: "
                        "completing without them", inc.client_id, self.node_id, inc.holder)
            self._complete_incoming(inc, [])

    def on_late(self, sender: str, body: dict) -> None:
        inc = self.incoming.get(body["client_id"])
        if inc is None or inc.epoch != body["epoch"] or inc.holder != sender:
            log.warning("late messages for an unknown hand-over client_id=%s from=%s epoch=%s",
                        body["client_id"], sender, body["epoch"])
            return
        late = [(message_from_record(m), q, r, tuple(s) if s else None)
                for m, q, r, s in body["messages"]]
        self._complete_incoming(inc, late)

    def _complete_incoming(self, inc: _Incoming, late: list) -> None:
        del self.incoming[inc.client_id]
        session = inc.session
        if session is not None and session.state is not SessionState.ENDED:
            session.gate = None
            for item in late:
                session.deliver(*item)
            for item in inc.held:
                session.deliver(*item)
        inc.held = []
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
        cur = self.member.view.owners.get(client_id)
        if cur is not None and cur[0] == self.node_id:
            return  # we claimed it again meanwhile
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

    def on_moved(self, client_id: str, epoch: int, from_node: str, to_node: str) -> None:
        member = self.member
        me = self.node_id
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
        out = self.outgoing.get(client_id)
        if out is not None and out.epoch == epoch:
            out.pending.discard(sender)
            if not out.pending:
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
        if view.owners.get(client_id) != (sender, epoch):
            return {"stale": True}  # claimed again while we waited
        session = self.broker.sessions.get(client_id)
        if session is None:
            return {"none": True}
        if session.state is SessionState.HANDING_OVER:
            return {"retry": True}
        if session.state is not SessionState.FROZEN:
            # not frozen yet (the claim's listener runs right after the view update)
            self._freeze(client_id, sender, epoch, False)
            session = self.broker.sessions.get(client_id)
            if session is None:
                return {"none": True}
        record = self.broker.snapshot(session)
        session.hand_over(f"snapshot for {sender} epoch {epoch}")
        out = _Outgoing(client_id, epoch, sender, set(view.members), session)
        self.outgoing[client_id] = out
        session.gate = self._outgoing_gate(out)
        out.timer = asyncio.get_running_loop().call_later(
            self.config.takeover_timeout + self.config.barrier_timeout,
            self._barrier_timeout, out)
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
                out.late.append([message_to_record(msg), qos, retain,
                                 list(sub_ids) if sub_ids else None])
            # else: routed with the new routes, the new holder has it
        return gate

    def _barrier_timeout(self, out: _Outgoing) -> None:
        if self.outgoing.get(out.client_id) is out:
            self.stats["barrier_timeouts"] += 1
            log.warning("barriers missing client_id=%s node=%s from=%s: completing hand-over",
                        out.client_id, self.node_id, sorted(out.pending))
            self._finish_outgoing(out)

    def _finish_outgoing(self, out: _Outgoing) -> None:
        del self.outgoing[out.client_id]
        if out.timer is not None:
            out.timer.cancel()
        self.member.transport.send(out.to, "late", {"client_id": out.client_id,
                                                    "epoch": out.epoch,
                                                    "messages": out.late})
        self.stats["late_sent"] += len(out.late)
        session = out.session
        if session.state is not SessionState.ENDED:
            session.gate = None
            self.broker.end_session(session, f"moved to {out.to}", release=False, will=False)

    def status(self) -> dict:
        lat = sorted(self.latencies)
        return dict(self.stats, incoming=len(self.incoming), outgoing=len(self.outgoing),
                    takeover_ms_p50=round(lat[len(lat) // 2] * 1000, 2) if lat else None)


class _Retry(Exception):
    """The holder is handing the session to someone else: wait for the holder to change."""
