"""The holding side of a session hand-over, as the node runs it (A in cluster/takeover.py's
description): the driver of ``HolderHandover`` (cluster/holder.py).

A holds X's session; B claimed it. A answers B's ``snapshot`` request with the record and
from then on keeps, through the copy's gate (``_outgoing_gate``), what nodes still route
to it with the old routes; it sends each node's late messages to B when that node's
barrier arrives (``_deliver_late``, retried until B stored them), ends its copy when every
barrier is in and every batch stored, or takes the session back when the move can never
apply (``_hand_back``). A restart in the middle of a hand-over rebuilds it from the store
(``restore_handed``) and goes on once the table is read (``judged``).

``HoldingSide`` is a part of ``Takeovers`` (cluster/takeover.py), which adds the claiming
side and the events every node handles (barriers, switches, Raft events); the state both
share is set up there. The helpers at the end are the late messages' wire form, used by
both sides.
"""

from __future__ import annotations

import asyncio
import logging

from node import failpoints
from node.session.record import message_from_record, message_to_record
from node.session.session import SessionState

from . import holder as H
from .holder import HolderHandover, HolderState
from .marks import Handed, HandoverMark
from .messages import RESTART, LateBatch, SnapChunk, SnapshotRequest, encode
from .transport import PeerUnreachable, RemoteError, RequestTimeout

log = logging.getLogger("shoal.takeover")

CHUNK = 2000  # queued messages per snapshot chunk
#: seconds an old holder keeps trying to hand its late messages to the new holder
LATE_DELIVERY_LIMIT = 120.0


class HoldingSide:
    """The holding side of ``Takeovers``: snapshots, the outgoing gate, late batches."""

    def restore_handed(self) -> None:
        """At start, before any link is up: a copy the store brought back handed over
        (its mark's ``handed``) goes on with its hand-over at once: what it kept after the
        snapshot goes to the node it was handed to in one batch, and it keeps what the
        nodes whose barrier may not have come still send it (cluster/holder.py
        ``after_restart``). Whether the move committed is known once the table is read:
        if it did not, the copy is the session again (``judged``)."""
        resumed = []
        for client_id, session in list(self.broker.sessions.items()):
            mark = HandoverMark.of(session)
            handed = mark.handed
            if handed is None or client_id in self.outgoing:
                continue
            stale, relayed = _stale_late(session, mark)
            session.freeze("restarted during a hand-over")
            session.hand_over(f"restarted: handed to {handed.to}")
            # keys go on from the mark: what is kept from now on is late too
            session.seq = max(session.seq, handed.first)
            # (this node too: until its table shows the move, its own publishes route here)
            pending = set(handed.members) | {self.node_id}
            out = HolderHandover.restored(
                client_id, handed.epoch, handed.to, pending, copy=session,
                stored=stale + [i for _e, items in sorted(relayed.items()) for i in items])
            self.outgoing[client_id] = out
            session.gate = self._outgoing_gate(out)
            resumed.append([client_id, handed.epoch])
            log.warning("hand-over resumed after a restart client_id=%s node=%s to=%s "
                        "epoch=%s waiting_for=%s", client_id, self.node_id, handed.to,
                        handed.epoch, sorted(pending))
        # named in this node's handshake: each peer says, before it routes anything here,
        # which of these moves it applied (``on_peer_restarted``, ``Switched.moved_from``)
        self.member.info["handed"] = resumed

    def restored_handed(self, client_id: str) -> bool:
        """Is this a copy resumed handed over at the start, the table not read yet?"""
        out = self.outgoing.get(client_id)
        return out is not None and out.state is HolderState.RESTORED

    def _decide(self, out: HolderHandover, moved_at: int | None, into=None,
                via: str | None = None) -> list:
        """Messages held undecided (a restored copy's, or from a node that switched to a
        table whose position was not comparable yet): those routed with a table older than
        the move (or all, ``moved_at`` None: the move never committed, or the session is
        taken back into ``into``, or ``via``'s barrier came after them) are kept; the
        others reached the new holder too. ``via``: only that node's. Returns those taken
        into ``into`` (wire items)."""
        items = self._undecided.pop(out, [])
        if via is not None:
            rest = [i for i in items if i[1] != via]
            items = [i for i in items if i[1] == via]
            if rest:
                self._undecided[out] = rest
        if not items:
            return []
        session = into if into is not None else out.copy
        held, taken = [], []
        for position, frm, item, fut in items:
            if moved_at is None or position < moved_at:
                key = session.admit(*item)
                if into is None:
                    out.kept(frm, _late_item(*item, key))
                else:
                    taken.append(_late_item(*item, key))
            held.append(fut)
        _decided(held)
        return taken

    def judged(self, client_id: str, holder: str | None) -> None:
        """The table is read after a restart: a copy resumed handed over goes to the
        session's holder with what its store kept, or is the session again (the move
        never committed)."""
        gate = self.incoming.get(client_id)
        if gate is not None and gate.machine.unread:
            # a gate this restart rebuilt: the move's position decides the messages held
            # undecided (None: the table has no move of it to this node)
            self._run_gate(gate, gate.machine.move_applied(
                self.member.view.tables.moved_at.get(client_id)
                if holder == self.node_id else None))
        out = self.outgoing.get(client_id)
        if out is None or out.state is not HolderState.RESTORED:
            return
        if holder == self.node_id and \
                tuple(self.member.view.owners.get(client_id) or ()) == (out.to, out.epoch):
            # the claim it was handed to is still the current one: its move may still
            # commit (it was proposed while this node was down). Judged again when it is
            # applied here (on_moved), or taken back when a newer claim asks (or this
            # node claims it again)
            log.info("hand-over resumed after a restart waits for its move client_id=%s "
                     "node=%s to=%s epoch=%d", client_id, self.node_id, out.to, out.epoch)
            return
        if holder == self.node_id and self.member.replication.promoted_copy(client_id):
            # moved, then promoted back here from a replica of the node it went to: that
            # copy is the session (``adopt_promoted`` installs it, and this copy's late
            # messages go into it: ``fold_outgoing``)
            log.warning("hand-over resumed after a restart superseded by a promotion "
                        "client_id=%s node=%s epoch=%d", client_id, self.node_id, out.epoch)
            return
        session = out.copy
        promoted = self.member.view.promoted.get(client_id, {})
        if holder not in (None, self.node_id) and \
                promoted.get(self.node_id, -1) > out.epoch:
            # promoted from this node while it was down: its replica had this copy's
            # every acknowledged change, late messages included; what came since was
            # routed with a table from before that, and its senders sent it again to the
            # promoted session (or it was never acknowledged): nothing goes from here
            self.abandon(client_id, f"the session was promoted on {holder} meanwhile")
            self.broker.end_session(session, "promoted elsewhere while this node was down",
                                    release=False, will=False)
            return
        moved_at = self._left_at(client_id)
        self._decide(out, None if holder in (None, self.node_id) else moved_at)
        mark = HandoverMark.of(session)
        late, relayed = _stale_late(session, mark) if mark.handed is not None else ([], {})
        actions = out.judged(holder, self.node_id, late, moved_at)
        if out.state is HolderState.TAKEN_BACK:
            del self.outgoing[client_id]
            self._run_holder(out, actions)
            self.broker.unfreeze(session, "hand-over never moved: held here")
            return
        log.warning("late messages of a hand-over sent after a restart client_id=%s "
                    "node=%s to=%s epoch=%s count=%d still_from=%s", client_id,
                    self.node_id, holder, out.epoch, len(late), sorted(out.pending))
        self._run_holder(out, actions)
        # those an earlier hand-over's old holder passed on through here: again, under
        # the name they came with (the new holder skips those it has)
        for epoch, items in sorted(relayed.items()):
            self._run_holder(out, out.relay(items, 1, epoch))

    def _left_at(self, client_id: str) -> int | None:
        """The table position of the session's move away from this node (the last one;
        its last move of all in a table of an older version)."""
        tables = self.member.view.tables
        left = getattr(tables, "left_at", {}).get(client_id, {}).get(self.node_id)
        return left if left is not None else tables.moved_at.get(client_id)

    async def on_snapshot_request(self, sender: str, req: SnapshotRequest) -> dict:
        client_id, epoch = req.client_id, req.epoch
        view = self.member.view
        deadline = _now() + 2.0
        while True:
            cur = view.owners.get(client_id)
            if cur is not None and cur[1] >= epoch:
                break
            if _now() >= deadline:
                return {"retry": True}
            await asyncio.sleep(0.01)  # our Raft view is behind: let it catch up
        if cur != (sender, epoch):
            return {"stale": True}
        pending = self.in_progress.get(client_id)
        if pending is not None:
            await asyncio.wait({pending}, timeout=self.config.takeover_timeout)
        gate = self.incoming.get(client_id)
        if gate is not None:
            await asyncio.wait({gate.done}, timeout=self.config.barrier_timeout + 1.0)
            if self.incoming.get(client_id) is gate:
                if gate.machine.waits_for_holder() and gate.machine.holder in view.members:
                    # our own hand-over still waits for late messages its old holder has
                    # (stored, acknowledged): what is held here must follow them, so the
                    # session moves on once they are in (the gate lets go by itself after
                    # INCOMING_LIMIT); the client is told to try again. (A gate that waits
                    # for another node's barrier is let go: that node sends nothing now.)
                    return {"busy": True}
                # what it holds goes into the session now, so the record carries it
                self._force(gate, f"handed on to {sender}")
        if view.owners.get(client_id) != (sender, epoch):
            return {"stale": True}  # claimed again while we waited
        session = self.broker.sessions.get(client_id)
        if session is None:
            if not self.member.promotions_in():
                # restarting: a session promoted here while this node was down is
                # installed from its replica copy once the table is caught up
                return {"retry": True}
            return {"none": True}
        if session.state is SessionState.HANDING_OVER:
            out = self.outgoing.get(client_id)
            if out is None or out.epoch >= epoch or \
                    out.state not in (HolderState.HANDED, HolderState.RESTORED) \
                    or view.holders.get(client_id) != self.node_id:
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
        record["handover"] = HandoverMark.for_receiver(record.get("handover"))
        session.hand_over(f"snapshot for {sender} epoch {epoch}")
        # on disk before any late message (the log keeps order): after a crash, the
        # queued messages from this key on are the ones the new holder may lack
        mark = HandoverMark.of(session)
        mark.handed = Handed(sender, epoch, session.seq, tuple(sorted(view.members)))
        mark.save(session)
        self.broker.persist(session)
        out = HolderHandover(client_id, epoch, sender, set(view.members), copy=session)
        self.outgoing[client_id] = out
        session.gate = self._outgoing_gate(out)
        # HANDED: until ``moved`` is applied here this copy is the session (the new node
        # may die before its move commits); on_moved starts the barrier timer
        queue = record["queue"]
        nchunks = 0
        if len(queue) > CHUNK:
            record["queue"] = []
            for i in range(0, len(queue), CHUNK):
                self.member.transport.send(sender, *encode(SnapChunk(
                    client_id, epoch, nchunks, queue[i:i + CHUNK])))
                nchunks += 1
        self.stats["snapshots_sent"] += 1
        # the mark on disk before the answer: a restart of this node then always knows
        # it handed the session over, and tells the new holder what it kept since
        durable = self.broker.durable_wait()
        if durable is not None:
            await durable
        return {"record": record, "chunks": nchunks}

    def _outgoing_gate(self, out: HolderHandover):
        me = self.node_id

        view = self.member.view

        def keep_or_drop(session, msg, qos, retain, sub_ids) -> None:
            via = msg.via or me
            # (a forward's sender table position: compared with the move's)
            position = self.member.forward_position if msg.via else None
            if via == me and out.state is HolderState.RESTORED:
                # published here after a restart: routed to the new holder too once this
                # node's table shows the move, else only here
                keep = view.holders.get(out.client_id) in (None, me)
            elif position is not None and out.moved_at is not None and \
                    position >= out.moved_at:
                keep = False  # routed with the move (its barrier went elsewhere)
            elif out.keeps(via) and position is not None and (
                    out.state is HolderState.RESTORED
                    or (out.state is HolderState.HANDED and via in out.switched)):
                # from a node whose barrier is not known here, routed with a table whose
                # position cannot be compared with the move's yet (this node restarted and
                # has not read its table, or that node switched to a table before this
                # node applied the move): decided once it can (``_decide``), the new
                # holder's gate holding its copy the same way; unacknowledged until then
                held = self.member.loop.create_future()
                self._undecided.setdefault(out, []).append(
                    (position, via, (msg, qos, retain, sub_ids), held))
                self.member.held_wait(held, out.client_id)
                return
            else:
                keep = out.keeps(via)
            if keep:
                # into this copy's queue, on disk: until the new holder has them (or the
                # hand-over is taken back) they exist nowhere else; the store key names
                # the message for the new holder (a resend after a restart is recognised)
                key = session.admit(msg, qos, retain, sub_ids)
                out.kept(via, _late_item(msg, qos, retain, sub_ids, key))
            # else: routed with the new routes, the new holder has it
        return keep_or_drop

    def _run_holder(self, out: HolderHandover, actions: list) -> None:
        """Perform a holder machine's actions."""
        for action in actions:
            if isinstance(action, H.SendLate):
                self.stats["late_sent"] += len(action.batch.messages)
                asyncio.get_running_loop().create_task(self._deliver_late(out, action))
            elif isinstance(action, H.StartBarrierTimer):
                self._cancel_timer(out)
                self._timers[out] = asyncio.get_running_loop().call_later(
                    self.config.barrier_timeout, self._barrier_timeout, out)
            elif isinstance(action, H.EndCopy):
                self._finish_outgoing(out, action.to)
            elif isinstance(action, H.HandBack):
                self._cancel_timer(out)
                session = out.copy
                session.gate = None
                session.hand_back(action.why)
                mark = HandoverMark.of(session)
                mark.handed = None
                mark.relayed.clear()  # (the session's own messages again)
                mark.save(session)
                self.broker.persist(session)
                log.warning("hand-over taken back client_id=%s node=%s: %s (%d late "
                            "messages kept in the queue)", out.client_id, self.node_id,
                            action.why, action.late)
            else:
                raise AssertionError(f"unexpected action {action!r}")

    async def _deliver_late(self, out: HolderHandover, send: H.SendLate) -> None:
        """Until the new holder answers that it stored them (bounded: a holder that stays
        away that long has lost the session's newest messages with its disk anyway)."""
        answered = False
        # one batch at a time, in the order the machine made them (a restarted holder's
        # RESTART batch before the batches of single nodes that follow it)
        lock = self._late_locks.setdefault(out, asyncio.Lock())
        try:
            await lock.acquire()
            await failpoints.pause("takeover.before_late")
            await self._request_late(send.to, send.batch, out)
            await failpoints.pause("takeover.after_late")
            answered = True
        finally:
            if lock.locked():
                lock.release()
            if not answered:
                # cancelled at shutdown: the copy stays, in the store too
                out.unconfirmed -= 1
            if not out.unconfirmed:
                self._late_locks.pop(out, None)
        if answered:
            actions = out.late_stored()
            if self.outgoing.get(out.client_id) is out:
                self._run_holder(out, actions)

    def pass_on_late(self, client_id: str, dead: str, epoch: int, holder: str,
                     late: list, relayed: dict) -> None:
        """The late messages of ``dead``'s hand-over of epoch ``epoch``, from its copy
        here (``Replication._pass_on_late``): to the session's holder, as ``dead``'s own
        restart would send them (named by ``origin``), then those it had relayed."""
        batches = [LateBatch(client_id, epoch, RESTART, late, still_pending=[], origin=dead)]
        for e, items in sorted(relayed.items()):
            batches.append(LateBatch(client_id, e, "relay", items, hops=1, origin=dead))
        asyncio.get_running_loop().create_task(self._pass_on(holder, batches))

    async def _pass_on(self, holder: str, batches: list) -> None:
        for batch in batches:
            if not batch.messages:
                continue
            if holder == self.node_id:
                try:
                    await self.on_late(batch.origin, batch)
                except RuntimeError as err:  # (starting: no session here to take them)
                    log.error("late messages of a node declared down not taken "
                              "client_id=%s node=%s count=%d: %s", batch.client_id,
                              self.node_id, len(batch.messages), err)
            else:
                await self._request_late(holder, batch)

    async def _request_late(self, to: str, batch, out: HolderHandover | None = None) -> None:
        """Send a late batch until ``to`` answers that it stored it (bounded: a node that
        stays away that long has lost the session's newest messages with its disk anyway);
        given up with an error in the log, or when its hand-over ``out`` is abandoned."""
        deadline = _now() + LATE_DELIVERY_LIMIT
        view = self.member.view
        for attempt in range(10_000):
            if out is not None and out in self._abandoned:
                return
            holder = view.holders.get(batch.client_id)
            if (to in view.down or to not in view.members) and \
                    holder not in (None, to, self.node_id):
                # the new holder was declared down (or forgotten) and the session
                # promoted from its replica, which never had these: they go there
                log.warning("late messages redirected client_id=%s node=%s from=%s "
                            "to=%s epoch=%d count=%d: %s is down", batch.client_id,
                            self.node_id, to, holder, batch.epoch, len(batch.messages), to)
                to = holder
            try:
                await self._request_unless_down(to, batch)
                return
            except (PeerUnreachable, RequestTimeout, RemoteError) as err:
                if to in view.down and \
                        view.holders.get(batch.client_id) not in (None, to, self.node_id):
                    continue  # (redirected at once)
                if _now() >= deadline:
                    log.error("late messages not delivered client_id=%s node=%s to=%s "
                              "epoch=%d source=%s count=%d after %d attempts: %r",
                              batch.client_id, self.node_id, to, batch.epoch, batch.source,
                              len(batch.messages), attempt + 1, err)
                    return
                await asyncio.sleep(0.2)  # the node restarting: try again

    async def _request_unless_down(self, to: str, batch) -> None:
        """One late batch to ``to``; raises PeerUnreachable as soon as ``to`` is declared
        down (``on_node_down``), not after the request's timeout."""
        signal = self._down_signals.get(to)
        if signal is None:
            signal = self._down_signals[to] = asyncio.get_running_loop().create_future()
        req = asyncio.ensure_future(self.member.transport.request(to, *encode(batch), 10.0))
        try:
            await asyncio.wait({req, signal}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down = not req.done()
            if down:
                req.cancel()
        if down:
            raise PeerUnreachable(f"{to} was declared down")
        req.result()

    def on_node_down(self, node: str) -> None:
        """``node`` was declared down: the late batches this node was delivering to it go
        at once to where its sessions were promoted (``_request_unless_down``); there a
        gate kept from its copy holds what the nodes route after them."""
        signal = self._down_signals.pop(node, None)
        if signal is not None and not signal.done():
            signal.set_result(None)

    def _hand_back(self, out: HolderHandover, why: str) -> None:
        """The hand-over ``out`` will never complete: the session is frozen here again,
        with what arrived for it meanwhile appended to its queue."""
        del self.outgoing[out.client_id]
        self._decide(out, None)  # (every message held undecided is this copy's)
        self._run_holder(out, out.hand_back(why))

    def abandon(self, client_id: str, why: str) -> None:
        """This node's hand-over of ``client_id`` is void (the session was promoted on
        another node while this one was declared down: its replica had every change this
        node acknowledged): nothing more is sent for it, the forwards its gate held are
        not confirmed (their senders sent them again to the promoted session)."""
        out = self._end_outgoing(client_id)
        if out is None:
            return
        held = self._undecided.pop(out, [])
        for _p, _v, _item, fut in held:
            if not fut.done():
                fut.cancel()
        log.warning("hand-over abandoned client_id=%s node=%s to=%s epoch=%d: %s (%d held "
                    "forwards not confirmed)", client_id, self.node_id, out.to, out.epoch,
                    why, len(held))

    def _end_outgoing(self, client_id: str) -> HolderHandover | None:
        """This node's hand-over of ``client_id`` ends without finishing: no timer, and
        nothing more sent for it (``_request_late`` stops). Returns it, if there was one."""
        out = self.outgoing.pop(client_id, None)
        if out is not None:
            self._cancel_timer(out)
            self._abandoned.add(out)
        return out

    def _barrier_timeout(self, out: HolderHandover) -> None:
        self._timers.pop(out, None)
        if self.outgoing.get(out.client_id) is not out:
            return
        before = set(out.pending)
        actions = out.barrier_timeout(set(self.member.view.members))
        gone = sorted(before - out.pending)
        if gone:
            self.stats["barrier_timeouts"] += 1
            log.warning("barriers missing client_id=%s node=%s from=%s: nodes left the "
                        "cluster", out.client_id, self.node_id, gone)
        self._run_holder(out, actions)

    def _cancel_timer(self, out: HolderHandover) -> None:
        timer = self._timers.pop(out, None)
        if timer is not None:
            timer.cancel()

    def _finish_outgoing(self, out: HolderHandover, to: str) -> None:
        if self.outgoing.get(out.client_id) is out:
            del self.outgoing[out.client_id]
        self._cancel_timer(out)
        for _p, _v, _item, fut in self._undecided.pop(out, []):
            fut.cancel()  # (never stored here: their publishers send them again)
        session = out.copy
        if session.state is not SessionState.ENDED:
            session.gate = None
            self.broker.end_session(session, f"moved to {to}", release=False, will=False)


# -- helpers of both sides: the clock, late messages in their wire form ---------------

def _now() -> float:
    """The loop's clock (monotonic in a node; simulated in cluster/simulation.py)."""
    return asyncio.get_running_loop().time()


def _stale_late(session, mark: HandoverMark) -> tuple[list, dict]:
    """The late messages of a copy handed over: the queued ones from its mark on, in
    wire form; those passed on through it (``relayed``) apart, per epoch they came
    with, under their keys there."""
    late, relayed = [], {}
    for m, q, r, s, key in session.queue:
        if key < mark.handed.first:
            continue
        name = mark.relayed.get(key)
        if name is None:
            late.append(_late_item(m, q, r, s, key))
        else:
            relayed.setdefault(name[0], []).append(_late_item(m, q, r, s, name[1]))
    return late, relayed


def _late_item(msg, qos: int, retain: bool, sub_ids, key: int) -> list:
    """A late message on the wire: [message record, qos, retain, sub_ids, store key on
    the old holder (0: not stored there)]."""
    return [message_to_record(msg), qos, retain, list(sub_ids) if sub_ids else None, key]


def _late_message(item: list) -> tuple:
    """(msg, qos, retain, sub_ids) of a ``_late_item``."""
    m, qos, retain, sub_ids = item[:4]
    return message_from_record(m), qos, retain, tuple(sub_ids) if sub_ids else None


def _decided(held: list) -> None:
    """Held messages decided (admitted into the session, or left to the other copy): their
    waiters go on, and wait for the store from there (``ClusterMember.held_wait``): a
    forward's replica mark follows its messages in the replica stream at once, so a
    replica that has them has the mark too (``ClusterMember._stored_wait``)."""
    for h in held:
        if not h.done():
            h.set_result(None)
