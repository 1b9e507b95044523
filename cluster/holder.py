"""The holding node's side of a session hand-over, as a sans-IO state machine.

Node A holds client X's session; node B claimed X (a Raft ``claim``, epoch E) and asked
A for the session (``snapshot``). A answered with the record and, from then on, keeps
a ``HolderHandover`` for X until the hand-over ends one way or the other:

    HANDED --move_applied--> MOVED --(every barrier in, every late batch stored)--> FINISHED
       |                        |
       |                        +--superseded--> SUPERSEDED  (this node took X back)
       +--hand_back--> TAKEN_BACK  (E's move can never apply: a newer claim came first)
       +--(every barrier in, every late batch stored)--> FINISHED

    RESTORED --judged(another node holds it)--> MOVED   (a restart; the table read)
             --judged(this node holds it)--> TAKEN_BACK

* HANDED: the snapshot went to B, B's ``moved`` is not applied here yet. Until it is,
  this copy is the session (B may die before its move commits).
* MOVED: the move is applied here. A's copy waits for every node's barrier (DESIGN.md):
  what a node P forwarded here before its barrier was routed with the old routes, so A
  keeps it for X ("late", also appended to the copy's queue, on disk) and, when P's
  barrier arrives, sends it to B. A node that left the cluster sends no barrier: the
  barrier timer stops waiting for it.
* FINISHED: every barrier arrived and B stored every late batch: the copy ends.
* TAKEN_BACK: the move of epoch E can no longer apply (a newer claim asks, and the table
  still names A the holder): the copy is frozen again, with the late messages in its
  queue, and is handed over once more.
* SUPERSEDED: this node claimed X itself and took the session back from B while this
  hand-over still waited for barriers: the late messages go into the session taken back.

Events in (one method each): ``kept`` (a message routed with the old routes arrived),
``barrier``, ``move_applied``, ``late_stored``, ``peer_switched``, ``barrier_timeout``
(the time and the members passed in), ``hand_back``, ``supersede``, ``relay``,
``judged`` (a RESTORED copy, once the table is read after a restart). Actions
out: ``SendLate``, ``StartBarrierTimer``, ``EndCopy``, ``HandBack``. No asyncio and no
sockets here: cluster/takeover.py runs it in a node, cluster/simulation in a simulated
cluster.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .messages import RESTART, LateBatch

__all__ = ["HolderState", "HolderEvent", "TRANSITIONS", "HolderHandover", "SendLate",
           "StartBarrierTimer", "EndCopy", "HandBack", "InvalidTransition"]


class HolderState(enum.Enum):
    HANDED = "handed"          # snapshot given; the move not applied here: still the session
    MOVED = "moved"            # the move applied: waiting for barriers and late batches stored
    FINISHED = "finished"      # all delivered: the copy ends
    TAKEN_BACK = "taken_back"  # the move can never apply: the copy is the session again
    SUPERSEDED = "superseded"  # this node took the session back first
    RESTORED = "restored"      # brought back by a restart: the table not read yet


class HolderEvent(enum.Enum):
    KEPT = "kept"
    BARRIER = "barrier"
    MOVE_APPLIED = "move_applied"
    LATE_STORED = "late_stored"
    PEER_SWITCHED = "peer_switched"
    BARRIER_TIMEOUT = "barrier_timeout"
    RELAY = "relay"
    ALL_IN = "all_in"
    HAND_BACK = "hand_back"
    SUPERSEDE = "supersede"
    JUDGED = "judged"


S, E = HolderState, HolderEvent
#: Every transition the holder's side can make; anything else is a bug and raises.
TRANSITIONS: dict[tuple[HolderState, HolderEvent], HolderState] = {
    (S.HANDED, E.KEPT): S.HANDED,
    (S.MOVED, E.KEPT): S.MOVED,
    # a barrier proves the move committed, even before it is applied here
    (S.HANDED, E.BARRIER): S.HANDED,
    (S.MOVED, E.BARRIER): S.MOVED,
    (S.HANDED, E.MOVE_APPLIED): S.MOVED,
    (S.MOVED, E.MOVE_APPLIED): S.MOVED,
    (S.HANDED, E.LATE_STORED): S.HANDED,
    (S.MOVED, E.LATE_STORED): S.MOVED,
    # a late batch answered after the hand-over was given up: nothing left to do
    (S.TAKEN_BACK, E.LATE_STORED): S.TAKEN_BACK,
    (S.SUPERSEDED, E.LATE_STORED): S.SUPERSEDED,
    (S.HANDED, E.PEER_SWITCHED): S.HANDED,
    (S.MOVED, E.PEER_SWITCHED): S.MOVED,
    (S.MOVED, E.BARRIER_TIMEOUT): S.MOVED,
    (S.HANDED, E.RELAY): S.HANDED,
    (S.MOVED, E.RELAY): S.MOVED,
    (S.HANDED, E.ALL_IN): S.FINISHED,
    (S.MOVED, E.ALL_IN): S.FINISHED,
    (S.HANDED, E.HAND_BACK): S.TAKEN_BACK,
    # a restart found the copy handed over: it keeps what pending nodes send until the
    # table says who holds the session (this node: the move never committed)
    (S.RESTORED, E.KEPT): S.RESTORED,
    (S.RESTORED, E.BARRIER): S.RESTORED,
    (S.RESTORED, E.PEER_SWITCHED): S.RESTORED,
    (S.RESTORED, E.MOVE_APPLIED): S.RESTORED,
    (S.RESTORED, E.RELAY): S.RESTORED,
    (S.RESTORED, E.JUDGED): S.MOVED,
    (S.RESTORED, E.HAND_BACK): S.TAKEN_BACK,
    (S.RESTORED, E.SUPERSEDE): S.SUPERSEDED,
    (S.HANDED, E.SUPERSEDE): S.SUPERSEDED,
    (S.MOVED, E.SUPERSEDE): S.SUPERSEDED,
}
del S, E

#: the states in which the hand-over is over (nothing more is sent)
ENDED = frozenset({HolderState.FINISHED, HolderState.TAKEN_BACK, HolderState.SUPERSEDED})


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class SendLate:
    """Send ``batch`` to the new holder as a request, again until it answers that it
    stored it (bounded); then call ``late_stored``."""
    to: str
    batch: LateBatch


@dataclass(frozen=True)
class StartBarrierTimer:
    """Call ``barrier_timeout`` after ``barrier_timeout`` seconds."""


@dataclass(frozen=True)
class EndCopy:
    """The hand-over is complete: end this node's copy (no will, the ClientID stays)."""
    to: str


@dataclass(frozen=True)
class HandBack:
    """The copy is the session again: frozen, its hand-over mark cleared and stored."""
    why: str
    late: int  # late messages kept in its queue


@dataclass(eq=False)
class HolderHandover:
    client_id: str
    epoch: int
    to: str  # the claiming node
    #: nodes whose barrier has not arrived here (whose old-route forwards may still come)
    pending: set[str]
    state: HolderState = HolderState.HANDED
    #: per node: what it forwarded here with the old routes (wire items, store keys in)
    late: dict[str, list] = field(default_factory=dict)
    #: late batches sent that the new holder has not yet answered as stored
    unconfirmed: int = 0
    #: their messages, per batch in the order sent (a superseded hand-over takes them
    #: back into the session with those not sent yet: the batch may never arrive)
    sending: list = field(default_factory=list)
    #: the driver's handle on the copy (the session object); never looked into here
    copy: object = None
    #: the table position of the move (once applied here)
    moved_at: int | None = None
    #: table positions nodes said they route with before the move was applied here (or,
    #: RESTORED, before the table was read)
    switched: dict[str, int] = field(default_factory=dict)
    #: RESTORED: what the store kept after the snapshot, as the restart found it (wire
    #: items); taken back with the session if it is superseded before it is judged
    stored: list = field(default_factory=list)

    @classmethod
    def restored(cls, client_id: str, epoch: int, to: str, pending,
                 copy=None, stored=()) -> "HolderHandover":
        """This node restarted with this copy handed over (to ``to``): RESTORED until the
        table is read (``judged``). Which barriers its previous process saw is not stored:
        it keeps what every node in ``pending`` sends, until that node's barrier or its
        word that it applied the move (``Switched.moved_from``) arrives."""
        return cls(client_id, epoch, to, set(pending), HolderState.RESTORED, copy=copy,
                   stored=list(stored))

    def judged(self, holder: str | None, me: str, stored_late: list,
               moved_at: int | None = None) -> list:
        """The table is read: ``holder`` holds the session. This node: the move never
        committed, the copy is the session again. Another node: what the store kept after
        the snapshot (``stored_late``: every node's, in arrival order, what was kept since
        the restart included) goes to it in one batch (source RESTART) naming the nodes
        whose messages may still come here (their batches follow, one each)."""
        if holder is None or holder == me:
            return self.hand_back(f"epoch {self.epoch} to {self.to} never moved")
        self._go(HolderEvent.JUDGED)
        self.to = holder
        self.late.clear()  # (all in ``stored_late``)
        self.stored = []
        # this node's table has the move now; so have the nodes that said they route with
        # a table at least as new (``moved_at``: the position of the session's last move)
        self.pending.discard(me)
        self.moved_at = moved_at
        if moved_at is not None:
            for node, at in self.switched.items():
                if at >= moved_at:
                    self.pending.discard(node)
        self.switched.clear()
        self.unconfirmed += 1
        self.sending.append(list(stored_late))
        return [SendLate(holder, LateBatch(self.client_id, self.epoch, RESTART, stored_late,
                                           still_pending=sorted(self.pending))),
                StartBarrierTimer()] + self._maybe_finish()

    # -- queries -----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def keeps(self, via: str) -> bool:
        """Does a message forwarded by ``via`` (this node's own id for a local publish)
        belong to this copy? Yes while ``via``'s barrier has not arrived: it was routed
        with the old routes, and the new holder does not get it from elsewhere."""
        return via in self.pending and not self.ended

    # -- events ------------------------------------------------------------------------

    def _go(self, event: HolderEvent) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidTransition(f"hand-over of {self.client_id!r} (epoch {self.epoch}): "
                                    f"{event.value} not allowed in state {self.state.value}")
        self.state = new

    def kept(self, via: str, item: list) -> None:
        """A message ``keeps(via)`` admitted into the copy's queue: it goes to the new
        holder with ``via``'s late batch (``item`` is its wire form, store key included)."""
        self._go(HolderEvent.KEPT)
        self.late.setdefault(via, []).append(item)

    def barrier(self, sender: str) -> list:
        """``sender`` applied the move and routes with the new routes from now on."""
        self._go(HolderEvent.BARRIER)
        if sender not in self.pending:
            return []
        if self.state is HolderState.RESTORED:
            self.pending.discard(sender)  # (what it sent is stored: in the RESTART batch)
            return []
        return self._send_late(sender) + self._maybe_finish()

    def move_applied(self, position: int | None = None) -> list:
        """The move was applied here (at table ``position``): the hand-over is certain.
        From now on the missing barriers are waited for a bounded time only (a node that
        left sends none). Nodes that switched to a table with the move in it count as
        their barriers."""
        first = self.state is HolderState.HANDED
        self._go(HolderEvent.MOVE_APPLIED)
        if not first:
            return []  # (RESTORED: judged starts the timer)
        self.moved_at = position
        actions: list = [StartBarrierTimer()]
        if position is not None:
            for node, at in sorted(self.switched.items()):
                if at >= position and node in self.pending:
                    actions += self._send_late(node)
        self.switched.clear()
        return actions + self._maybe_finish()

    def late_stored(self) -> list:
        """The new holder answered a late batch (stored, or given up on)."""
        self._go(HolderEvent.LATE_STORED)
        self.unconfirmed -= 1
        if self.sending:
            self.sending.pop(0)
        return self._maybe_finish()

    def peer_switched(self, peer: str, position: int | None = None) -> list:
        """``peer`` routes with every move applied there (its table was replaced by a Raft
        snapshot at ``position``, or it restarted: None): as good as its barrier, once the
        move is certain, if its table has the move."""
        self._go(HolderEvent.PEER_SWITCHED)
        if self.state is HolderState.RESTORED:
            # (whether the move committed is not known yet: a new process of ``peer``
            # routes with its table, which may not have it; its first message says which
            # moves it applied, and its switches name a table position)
            if position is not None:
                self.switched[peer] = max(position, self.switched.get(peer, 0))
            return []
        if peer not in self.pending:
            return []
        if self.state is HolderState.HANDED:
            if position is not None:
                self.switched[peer] = max(position, self.switched.get(peer, 0))
            return []
        if position is not None and self.moved_at is not None and position < self.moved_at:
            return []  # its table is older than the move: its barrier is still to come
        return self._send_late(peer) + self._maybe_finish()

    def barrier_timeout(self, members) -> list:
        """Barriers still missing after ``barrier_timeout``: a node that is no longer a
        member sends none (its late messages go now). A member that is down or cut off is
        waited for: what it forwarded before its barrier is still to come."""
        self._go(HolderEvent.BARRIER_TIMEOUT)
        gone = sorted(n for n in self.pending if n not in members)
        actions: list = []
        for node in gone:
            actions += self._send_late(node)
        finished = self._maybe_finish()
        return actions + (finished or [StartBarrierTimer()])

    def relay(self, items: list, hops: int, epoch: int) -> list:
        """Late messages of an earlier hand-over (``epoch``) to this node arrived after this
        copy was handed on: they follow the session (already admitted to the copy's queue),
        named as they came (that hand-over's epoch, its old holder's store keys). A
        RESTORED copy keeps them: they go in its RESTART batch."""
        self._go(HolderEvent.RELAY)
        if self.state is HolderState.RESTORED:
            return []
        self.unconfirmed += 1
        self.sending.append([])  # (in the copy's queue already: nothing to take back)
        return [SendLate(self.to, LateBatch(self.client_id, epoch, "relay", items,
                                            hops=hops))]

    def hand_back(self, why: str) -> list:
        """The move of this epoch can never apply: the copy is the session again."""
        self._go(HolderEvent.HAND_BACK)
        late = sum(len(items) for items in self.late.values())
        self.late.clear()  # (they are in the copy's queue already)
        return [HandBack(why, late)]

    def supersede(self) -> tuple[list, list[str]]:
        """This node took the session back (a newer claim of its own) while the hand-over
        still waited: returns the late messages (in source order) for the session taken
        back, and the nodes whose barrier never came."""
        self._go(HolderEvent.SUPERSEDE)
        late = self.stored + [item for batch in self.sending for item in batch] + \
            [item for source in sorted(self.late) for item in self.late[source]]
        self.sending = []
        waiting = sorted(self.pending)
        self.stored = []
        self.late.clear()
        self.pending.clear()
        return late, waiting

    # -- internals -----------------------------------------------------------------------

    def _send_late(self, source: str) -> list:
        self.pending.discard(source)
        items = self.late.pop(source, [])
        self.unconfirmed += 1
        self.sending.append(items)
        return [SendLate(self.to, LateBatch(self.client_id, self.epoch, source, items))]

    def _maybe_finish(self) -> list:
        if self.pending or self.unconfirmed or self.ended or \
                self.state is HolderState.RESTORED:
            return []
        self._go(HolderEvent.ALL_IN)
        return [EndCopy(self.to)]
