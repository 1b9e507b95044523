"""The claiming node's side of a session hand-over, as a sans-IO state machine.

Client X connects to node B (or B adopts X's session from a leaving node). B keeps one
``ClaimerHandover`` for X from its claim until the session is B's alone:

    CLAIMING --committed--> OPEN       (new session, clean start, held here, none anywhere)
        |                   FETCHING --record--> INSTALLED --move committed--> MOVED --all in--> DONE
        |                      |  |                  |   \\--move refused--> OVERTAKEN
        |                      |  |                  \\--all in--> DONE  (before the verdict)
        |                      |  +--none--> OPEN    (it ended on the holder)
        |                      |  +--stale / busy / holder error--> REFUSED
        |                      |  +--unreachable--> REFUSED or FRESH  (``unreachable_owner``)
        |                      +--retry--> WAITING --holder changed--> FETCHING or OPEN
        |                                     \\--no change in time--> REFUSED or FRESH
        +--not committed--> REFUSED

* CLAIMING: the claim (a new epoch) is proposed to Raft; the answer names the holder.
* WAITING: the holder is handing X to yet another node: wait for the table to change.
* FETCHING: the holder (A) is asked for the session at this epoch.
* INSTALLED: the record is installed here and gated: what a node P forwarded here before
  its barrier was routed with the old routes (A keeps it: dropped here); what P sent after
  its barrier waits ("held") until A's late batch from P is in, and is admitted after it.
  Once the copy is durable here, ``moved`` is proposed (with X's routes on B); CONNACK
  (session present 1) waits for its verdict.
* MOVED: the move committed; the gate keeps ordering until every barrier and every late
  batch arrived, then the gate goes (DONE).
* OVERTAKEN: a newer claim came first: B's copy is dropped (A still has the session).
* FRESH: the holder could not be reached and the policy says start fresh: B proposes
  itself as holder and the client gets session present 0.

The verdict a CONNECT gets is decided here: ``Open`` (go on, with or without a record),
``Refuse`` (a reason code), ``Answer`` (the move's verdict: True, False or None).
Events in, one method each; actions out. No asyncio and no sockets: cluster/takeover.py
runs it in a node, cluster/simulation in a simulated cluster. Items (the messages held
and admitted) are opaque here.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from node.mqtt.codes import ReasonCode

from .messages import RESTART

__all__ = ["ClaimerState", "ClaimerEvent", "TRANSITIONS", "ClaimerHandover", "LocalCopy", "Route",
           "ProposeClaim", "AskSnapshot", "AwaitHolderChange", "Open", "Refuse", "TakeBack",
           "ProposeFresh", "AwaitDurable", "ProposeMove", "Answer", "Admit", "Release",
           "GateOff", "StartExpiryTimer", "INCOMING_LIMIT"]

#: seconds a new holder waits at most for the old holder's late messages (a node that is
#: cut off that long delays the session's messages from it no longer: they are delivered
#: out of order with what the old holder still has)
INCOMING_LIMIT = 60.0


class ClaimerState(enum.Enum):
    CLAIMING = "claiming"
    WAITING = "waiting"
    FETCHING = "fetching"
    INSTALLED = "installed"
    MOVED = "moved"
    DONE = "done"
    OPEN = "open"
    FRESH = "fresh"
    REFUSED = "refused"
    OVERTAKEN = "overtaken"


class ClaimerEvent(enum.Enum):
    COMMITTED = "committed"
    NOT_COMMITTED = "not_committed"
    HOLDER_CHANGED = "holder_changed"
    NO_CHANGE = "no_change"
    RECORD = "record"
    NONE = "none"
    STALE = "stale"
    RETRY = "retry"
    UNREACHABLE = "unreachable"
    HOLDER_ERROR = "holder_error"
    BUSY = "busy"
    HOLDER_DOWN = "holder_down"
    DURABLE = "durable"
    MOVE_COMMITTED = "move_committed"
    MOVE_REFUSED = "move_refused"
    MOVE_UNKNOWN = "move_unknown"
    MESSAGE = "message"
    BARRIER = "barrier"
    LATE = "late"
    PEER_SWITCHED = "peer_switched"
    HOLDER_RESTARTED = "holder_restarted"
    MOVE_APPLIED = "move_applied"
    EXPIRED = "expired"
    FORCE = "force"
    ALL_IN = "all_in"


S, E = ClaimerState, ClaimerEvent
#: Every transition the claiming side can make; anything else is a bug and raises.
TRANSITIONS: dict[tuple[ClaimerState, ClaimerEvent], ClaimerState] = {
    (S.CLAIMING, E.COMMITTED): S.FETCHING,  # or OPEN / WAITING: see ``committed``
    (S.CLAIMING, E.NOT_COMMITTED): S.REFUSED,
    (S.WAITING, E.HOLDER_CHANGED): S.FETCHING,  # or OPEN when the table names us
    (S.WAITING, E.NO_CHANGE): S.REFUSED,  # or FRESH: the unreachable policy
    (S.FETCHING, E.RECORD): S.INSTALLED,
    (S.FETCHING, E.NONE): S.OPEN,
    (S.FETCHING, E.STALE): S.REFUSED,
    (S.FETCHING, E.RETRY): S.WAITING,
    (S.FETCHING, E.UNREACHABLE): S.REFUSED,  # or FRESH
    (S.FETCHING, E.HOLDER_ERROR): S.REFUSED,
    (S.FETCHING, E.BUSY): S.REFUSED,
    (S.FETCHING, E.HOLDER_DOWN): S.REFUSED,
    (S.INSTALLED, E.DURABLE): S.INSTALLED,
    (S.INSTALLED, E.MOVE_COMMITTED): S.MOVED,
    (S.INSTALLED, E.MOVE_REFUSED): S.OVERTAKEN,
    (S.INSTALLED, E.MOVE_UNKNOWN): S.INSTALLED,  # the move may still commit: stay gated
    # the gate finished before the move's verdict reached this coroutine
    (S.DONE, E.MOVE_COMMITTED): S.DONE,
    (S.DONE, E.MOVE_REFUSED): S.OVERTAKEN,
    (S.DONE, E.MOVE_UNKNOWN): S.DONE,
    (S.DONE, E.DURABLE): S.DONE,
}
for _gated in (S.INSTALLED, S.MOVED):
    for _e in (E.MESSAGE, E.BARRIER, E.LATE, E.PEER_SWITCHED, E.HOLDER_RESTARTED,
               E.MOVE_APPLIED, E.EXPIRED, E.FORCE):
        TRANSITIONS[(_gated, _e)] = _gated
    TRANSITIONS[(_gated, E.ALL_IN)] = S.DONE
# late answers, barriers and timers for a hand-over that is over: nothing to do
for _over in (S.DONE, S.OVERTAKEN):
    for _e in (E.MESSAGE, E.BARRIER, E.LATE, E.PEER_SWITCHED, E.HOLDER_RESTARTED,
               E.MOVE_APPLIED, E.EXPIRED, E.FORCE):
        TRANSITIONS[(_over, _e)] = _over
del S, E, _gated, _over, _e

#: the states in which the claim's outcome is known and no gate is up
SETTLED = frozenset({ClaimerState.DONE, ClaimerState.OPEN, ClaimerState.FRESH,
                     ClaimerState.REFUSED, ClaimerState.OVERTAKEN})
GATED = frozenset({ClaimerState.INSTALLED, ClaimerState.MOVED})


class InvalidTransition(RuntimeError):
    pass


class Route(enum.Enum):
    """What the gate does with a message for the session."""
    ADMIT = "admit"  # into the session now
    DROP = "drop"    # the old holder has it (routed with the old routes)
    HOLD = "hold"    # after what the old holder has from the same node: until its batch


class LocalCopy(enum.Enum):
    """What this node knows of its own copy when its claim commits naming itself holder."""
    NONE = "none"  # no copy being handed over here
    HANDED_UNMOVED = "handed_unmoved"  # handed to an older claim whose move never applied
    HANDING = "handing"  # being handed to another node right now


# -- actions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProposeClaim:
    """Propose ``claim(client_id, node, clean_start)`` to Raft; then ``committed`` or
    ``not_committed``."""


@dataclass(frozen=True)
class AskSnapshot:
    """Ask ``holder`` for the session at this epoch; then ``record``, ``none``, ``stale``,
    ``retry``, ``unreachable`` or ``holder_error``."""
    holder: str
    epoch: int


@dataclass(frozen=True)
class AwaitHolderChange:
    """Wait (until the claim's deadline) for the table's holder to differ from
    ``holder``; then ``holder_changed`` or ``no_change``."""
    holder: str


@dataclass(frozen=True)
class TakeBack:
    """This node's own older hand-over (to an unmoved claim) is taken back first."""
    why: str


@dataclass(frozen=True)
class Open:
    """The CONNECT goes on: the session opens from ``record`` (a hand-over), resumes the
    local one, or starts new (``fresh_reason``: a previous session was lost)."""
    epoch: int
    record: dict | None = None
    fresh_reason: str | None = None


@dataclass(frozen=True)
class Refuse:
    """CONNACK with ``reason`` and the connection closed."""
    reason: int
    text: str


@dataclass(frozen=True)
class ProposeFresh:
    """Propose ``moved(client_id, epoch, holder, node)``: the new session lives here."""
    holder: str


@dataclass(frozen=True)
class AwaitDurable:
    """Wait until the installed copy is on disk here; then ``durable``."""


@dataclass(frozen=True)
class ProposeMove:
    """Propose ``moved(client_id, epoch, holder, node)`` (with the session's routes here,
    in the same Raft entry) and wait for it; then ``move_committed``, ``move_refused`` or
    ``move_unknown``."""
    holder: str


@dataclass(frozen=True)
class Answer:
    """The hand-over's verdict for CONNACK: True (moved), False (overtaken: drop this
    copy), None (not known in time: the copy stays, the client retries)."""
    verdict: bool | None


@dataclass(frozen=True)
class Admit:
    """Admit these items into the session, in this order."""
    items: tuple


@dataclass(frozen=True)
class Release:
    """Confirm these held items without admitting them: they were routed with the old
    routes, the old holder has them."""
    items: tuple


@dataclass(frozen=True)
class GateOff:
    """Nothing left to order: messages go to the session directly again."""


@dataclass(frozen=True)
class StartExpiryTimer:
    """Call ``expired`` after ``delay`` seconds."""
    delay: float


# -- the machine -------------------------------------------------------------------------

@dataclass(eq=False)
class ClaimerHandover:
    node_id: str
    client_id: str
    clean_start: bool
    #: what to do when the holder cannot be reached: "refuse" (0x88) or "fresh"
    unreachable_owner: str = "refuse"
    state: ClaimerState = ClaimerState.CLAIMING
    epoch: int = 0
    holder: str | None = None
    #: gate: nodes whose barrier has not arrived here
    pending: set = field(default_factory=set)
    #: gate: nodes whose late batch the old holder has not sent yet
    awaiting: set = field(default_factory=set)
    #: gate: per node, what arrived after its barrier and before its late batch
    held: dict = field(default_factory=dict)
    started: float = 0.0  # when the record was installed (for ``expired``)
    #: nodes that may still send messages routed to this node as the session's holder
    #: of ``early_epoch`` (a hand-over from here that this claim superseded): admitted
    #: until their barrier of that epoch arrives (see ``took_back``)
    early: set = field(default_factory=set)
    early_epoch: int = 0
    early_moved_at: int | None = None  # that hand-over's move position (its table's)
    #: the move's verdict once known: True (committed), False (refused), None (unknown)
    verdict: bool | None = None
    decided: bool = False  # a verdict (even "unknown") was given to the client
    restarted: bool = False  # the old holder restarted: its batch from the store is awaited
    moved_at: int | None = None  # the table position of the move, once applied here
    #: table positions nodes said they route with before the move was applied here
    switched: dict = field(default_factory=dict)
    #: messages from a node whose barrier is not in, routed with a table at a known
    #: position, while the move's position is not known here: [position, via, item]
    #: (kept in arrival order; decided by ``move_applied``)
    undecided: list = field(default_factory=list)
    #: rebuilt by a restart of this node, whose table is not read yet (``move_applied``)
    unread: bool = False
    why: str = ""  # the last reason a path was taken (logs)

    @classmethod
    def restored(cls, node_id: str, client_id: str, unreachable_owner: str, holder: str,
                 epoch: int, pending, awaiting, now: float) -> "ClaimerHandover":
        """A gate a restart of this node brings back (cluster/marks.py ``taking``). The
        move's verdict is not known here (the store cannot tell): a copy the table does
        not give this node is not kept, or is dropped once the gate ends (``stale_copy``).
        This node's own barrier: once its table is read, it routes with the move. The
        move's table position is known once the table is read (``move_applied``)."""
        return cls(node_id, client_id, False, unreachable_owner, ClaimerState.MOVED, epoch,
                   holder, set(pending) - {node_id}, set(awaiting), started=now,
                   verdict=None, decided=True, unread=True)

    @classmethod
    def promoted(cls, node_id: str, client_id: str, unreachable_owner: str, holder: str,
                 epoch: int, awaiting, now: float) -> "ClaimerHandover":
        """The gate of a node that was taking the session over from ``holder`` when it
        was declared down, on the node the session was promoted to from its replica copy
        (cluster/marks.py ``taking``, in the copy): the late batches it still awaited come
        here (the old holder redirects them). Every node applied that move before the
        promotion (it is earlier in the log): no barrier is awaited; what a node routes
        here is held behind its late batch, as it would have been there."""
        return cls(node_id, client_id, False, unreachable_owner, ClaimerState.MOVED, epoch,
                   holder, set(), set(awaiting), started=now, verdict=True, decided=True)

    def _go(self, event: ClaimerEvent, to: ClaimerState | None = None) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidTransition(f"claim of {self.client_id!r} on {self.node_id} (epoch "
                                    f"{self.epoch}): {event.value} not allowed in state "
                                    f"{self.state.value}")
        # a few events have two outcomes; the table names the usual one and the method
        # picks the other one from the same row of the diagram
        self.state = to or new

    @property
    def gated(self) -> bool:
        return self.state in GATED

    @property
    def settled(self) -> bool:
        return self.state in SETTLED

    def stale_copy(self, owner: tuple | None, holder: str | None) -> bool:
        """After the gate: is the copy installed here not the session? Yes when the
        move's verdict was "unknown" and the table has moved on: a newer claim applied and
        another node holds it (``moved`` needs this epoch to be the current claim, so it
        can never apply now)."""
        return (self.decided and self.verdict is None and holder != self.node_id
                and owner is not None and owner[1] > self.epoch)

    def start(self) -> list:
        return [ProposeClaim()]

    # -- claiming ----------------------------------------------------------------------

    def committed(self, epoch: int, holder: str | None, local: LocalCopy) -> list:
        """The claim committed: ``holder`` holds the session (None: nobody)."""
        self.epoch = epoch
        me = self.node_id
        actions: list = []
        if holder == me and not self.clean_start:
            if local is LocalCopy.HANDED_UNMOVED:
                # our claim came first: that older move never will be applied
                actions.append(TakeBack(f"not moved; claimed here with epoch {epoch}"))
            elif local is LocalCopy.HANDING:
                # handed to another node a moment ago: fetch it back from there
                self._go(ClaimerEvent.COMMITTED, ClaimerState.WAITING)
                self.holder = me
                return [AwaitHolderChange(me)]
        if self.clean_start or holder is None or holder == me:
            self._go(ClaimerEvent.COMMITTED, ClaimerState.OPEN)
            return actions + [Open(epoch)]
        self._go(ClaimerEvent.COMMITTED)
        self.holder = holder
        return [AskSnapshot(holder, epoch)]

    def not_committed(self, why: str) -> list:
        self._go(ClaimerEvent.NOT_COMMITTED)
        self.why = why
        return [Refuse(ReasonCode.SERVER_UNAVAILABLE, "no Raft quorum: ClientID cannot be "
                                                      "claimed")]

    def holder_changed(self, holder: str | None) -> list:
        """The table's holder is now ``holder`` (None: nobody holds it)."""
        if holder is None or holder == self.node_id:
            self._go(ClaimerEvent.HOLDER_CHANGED, ClaimerState.OPEN)
            return [Open(self.epoch)]
        self._go(ClaimerEvent.HOLDER_CHANGED)
        self.holder = holder
        return [AskSnapshot(holder, self.epoch)]

    def no_change(self) -> list:
        self._go(ClaimerEvent.NO_CHANGE)
        return self._unreachable("hand-over did not end")

    # -- fetching ----------------------------------------------------------------------

    def record(self, record: dict, now: float, members, expiry_delay: float) -> list:
        """The holder answered with the session: install it, gated."""
        self._go(ClaimerEvent.RECORD)
        self.pending = set(members)
        self.awaiting = set(members)
        self.started = now
        return [Open(self.epoch, record), StartExpiryTimer(expiry_delay)]

    def none(self) -> list:
        """The holder has no session (it ended): a fresh one here."""
        self._go(ClaimerEvent.NONE)
        return [Open(self.epoch)]

    def stale(self) -> list:
        self._go(ClaimerEvent.STALE)
        return [Refuse(ReasonCode.SERVER_BUSY, "a newer connection of this ClientID took "
                                               "over")]

    def retry(self) -> list:
        """The holder is handing the session to someone else."""
        self._go(ClaimerEvent.RETRY)
        return [AwaitHolderChange(self.holder)]

    def busy(self) -> list:
        """The holder's own hand-over of the session is not finished (it waits for late
        messages): try again later."""
        self._go(ClaimerEvent.BUSY)
        return [Refuse(ReasonCode.SERVER_UNAVAILABLE,
                       f"the session's hand-over to {self.holder} is not finished yet")]

    def holder_down(self) -> list:
        """The holder was declared down while this claim waited for it: its session was
        promoted on a replica (or waits for it); a new claim finds where it is now."""
        self._go(ClaimerEvent.HOLDER_DOWN)
        self.why = f"{self.holder} was declared down"
        return [Refuse(ReasonCode.SERVER_UNAVAILABLE,
                       f"the session's node {self.holder} was declared down: connect again")]

    def unreachable(self, why: str) -> list:
        self._go(ClaimerEvent.UNREACHABLE)
        return self._unreachable(why)

    def holder_error(self, why: str) -> list:
        self._go(ClaimerEvent.HOLDER_ERROR)
        self.why = why
        return [Refuse(ReasonCode.SERVER_BUSY, f"session hand-over failed on {self.holder}")]

    def _unreachable(self, why: str) -> list:
        """The policy for a holder that cannot be reached (``unreachable_owner``)."""
        self.why = why
        if self.unreachable_owner == "refuse":
            self.state = ClaimerState.REFUSED
            return [Refuse(ReasonCode.SERVER_UNAVAILABLE,
                           f"node {self.holder} holding the session is unreachable")]
        self.state = ClaimerState.FRESH
        return [ProposeFresh(self.holder),
                Open(self.epoch, None, f"node {self.holder} unreachable")]

    # -- installed: confirming -----------------------------------------------------------

    def opened(self) -> list:
        """The installed session is open here (CONNACK waits): make it durable first."""
        return [AwaitDurable()]

    def durable(self) -> list:
        """The installed copy is on disk here: propose the move."""
        self._go(ClaimerEvent.DURABLE)
        # (also when the gate was forced open meanwhile: only Raft can tell whether this
        # epoch is still the current claim)
        return [ProposeMove(self.holder)]

    def move_committed(self) -> list:
        self._go(ClaimerEvent.MOVE_COMMITTED)
        self.verdict, self.decided = True, True
        return [Answer(True)]

    def move_refused(self) -> list:
        """A newer claim came first: this copy must go."""
        self._go(ClaimerEvent.MOVE_REFUSED)
        self.verdict, self.decided = False, True
        return [Answer(False)]

    def move_unknown(self) -> list:
        """Not known in time: the copy stays (the move may still commit), gated."""
        self._go(ClaimerEvent.MOVE_UNKNOWN)
        self.decided = True
        return [Answer(None)]

    # -- the gate ------------------------------------------------------------------------

    def took_back(self, epoch: int, waiting, moved_at: int | None = None) -> None:
        """This node handed the session away (``epoch``, its move at table position
        ``moved_at``) and takes it back with this claim, before the nodes in ``waiting``
        sent their barrier of that hand-over: they still route with the routes from before
        it, which named this node. What they send here until that barrier (or a table
        with that move) is the session's, and nobody else has it."""
        self.early = set(waiting)
        self.early_epoch = epoch
        self.early_moved_at = moved_at

    def waits_for_holder(self) -> bool:
        """Is the gate waiting for the old holder itself: its batch after a restart, or
        the late messages of a node whose barrier has come here (so the old holder has
        them, or will once that barrier reaches it)?"""
        return self.gated and (self.restarted or bool(self.awaiting - self.pending))

    def message(self, via: str, item, position: int | None = None) -> "Route":
        """A message for the session forwarded by ``via`` (this node's id for a local
        publish; ``position``: the sender's table position when it routed it, if known):
        admit it now, drop it (the old holder has it) or hold it."""
        self._go(ClaimerEvent.MESSAGE)
        if not self.gated:
            return Route.ADMIT
        if via in self.early:
            if position is None or self.early_moved_at is None or \
                    position < self.early_moved_at:
                return Route.ADMIT  # routed here before the hand-over this claim superseded
            self.early.discard(via)  # (routed with that move: as any node's, below)
        if any(u[1] == via for u in self.undecided):
            # behind ``via``'s undecided ones (routed after them: with the move if its
            # barrier or switch has come since)
            at = math.inf if via not in self.pending else max(
                position or 0, max(u[0] for u in self.undecided if u[1] == via))
            self.undecided.append([at, via, item])
            return Route.HOLD
        if via in self.pending:
            at = self.switched.get(via)
            if position is not None and self.moved_at is not None:
                if position < self.moved_at:
                    return Route.DROP  # routed with the old routes: the old holder has it
                # routed with the move: its barrier went to an earlier process of this
                # node (or is on its way behind this)
                self.pending.discard(via)
            elif at is not None or (position is not None and self.unread):
                # it routes with a table at a known position, the move's is not known here
                # yet (this node restarted and has not read its table, or applies the move
                # later than that node): whether it went to the old holder too is decided
                # once the move is applied here
                self.undecided.append([max(at or 0, position or 0), via, item])
                return Route.HOLD
            else:
                return Route.DROP  # routed with the old routes: the old holder keeps it for X
        if via in self.awaiting:
            # after that node's barrier: behind what it sent the old holder before
            self.held.setdefault(via, []).append(item)
            return Route.HOLD
        return Route.ADMIT

    def barrier(self, sender: str, epoch: int) -> list:
        """``sender`` applied the move of ``epoch`` (this claim's, or the superseded
        hand-over's): from now on it routes with the routes after it."""
        self._go(ClaimerEvent.BARRIER)
        if epoch == self.early_epoch:
            self.early.discard(sender)
            return []
        if epoch != self.epoch:
            return []
        self.early.discard(sender)
        self.pending.discard(sender)
        mine = [u for u in self.undecided if u[1] == sender]
        if not mine:
            return self._maybe_done()
        self.undecided = [u for u in self.undecided if u[1] != sender]
        # what it sent before it, held undecided, was routed with the old routes (but
        # not what came after a word that it routes with every move: kept)
        actions: list = [Release(tuple(u[2] for u in mine if u[0] != math.inf)),
                         Admit(tuple(self._behind_batch(
                             [(sender, u[2]) for u in mine if u[0] == math.inf])))]
        return [a for a in actions if a.items] + self._maybe_done()

    def peer_switched(self, peer: str, position: int | None = None) -> list:
        """``peer`` routes with every move applied there (a barrier for all of them) or,
        with ``position``, with those applied up to that table position: a barrier for
        this move if it is in (once the move's position is known here)."""
        self._go(ClaimerEvent.PEER_SWITCHED)
        if position is not None and self.early_moved_at is not None and \
                position >= self.early_moved_at:
            self.early.discard(peer)  # (it routes with the superseded hand-over's move)
        if position is not None and (self.moved_at is None or position < self.moved_at):
            if self.moved_at is None:
                self.switched[peer] = max(position, self.switched.get(peer, 0))
            return []
        self.early.discard(peer)
        self.pending.discard(peer)
        return self._maybe_done()

    def move_applied(self, position: int | None) -> list:
        """The move was applied here, at table ``position``: nodes that switched to a
        table with it in count as their barriers, and the undecided messages are decided
        (routed with a table that has the move: kept, in order; older: the old holder has
        them). ``position`` None: a restored gate whose move is not in the table (it never
        committed, or the session moved on): none of them was routed with it."""
        self._go(ClaimerEvent.MOVE_APPLIED)
        if self.moved_at is not None:
            return []
        self.unread = False
        self.moved_at = position
        moved_at = math.inf if position is None else position
        for node, at in sorted(self.switched.items()):
            if at >= moved_at:
                self.early.discard(node)
                self.pending.discard(node)
        self.switched.clear()
        release = [item for at, _via, item in self.undecided if at < moved_at]
        routed = [(via, item) for at, via, item in self.undecided if at >= moved_at]
        for via, _item in routed:
            self.pending.discard(via)
            self.early.discard(via)
        admit = self._behind_batch(routed)
        self.undecided.clear()
        actions: list = [Release(tuple(release))] if release else []
        if admit:
            actions.append(Admit(tuple(admit)))
        return actions + self._maybe_done()

    def holder_restarted(self, retry_delay: float) -> list:
        """The old holder is a new process. What nodes forwarded to its old one is either
        in its store, and comes in one batch from its restart (``late`` with source
        RESTART), or was never acknowledged (forwards name the process they were routed
        to: its new one drops those). It sends that batch first: wait for it (bounded)."""
        self._go(ClaimerEvent.HOLDER_RESTARTED)
        if not self.gated:
            return []
        self.restarted = True
        return [StartExpiryTimer(retry_delay)]

    def late(self, source: str, items: list, still_pending=None) -> list:
        """The old holder's late batch from ``source`` (the unseen ones): admitted, then
        what ``source`` sent here after its barrier. A restarted holder's batch (source
        RESTART) carries what its store kept from every node: what was held from the
        nodes it names no more (``still_pending``) goes after it; the others' come in
        batches of their own."""
        self._go(ClaimerEvent.LATE)
        if not self.gated:
            return [Admit(tuple(items))] if items else []
        if source == RESTART:
            self.restarted = False
            more = set(still_pending or ())
            actions = [Admit(tuple(items))] if items else []
            for node in sorted(self.awaiting - more):
                actions += self._late_from(node, [])
            return actions + self._maybe_done()
        return self._late_from(source, items) + self._maybe_done()

    def expired(self, now: float, holder_member: bool, retry_delay: float) -> list:
        """The expiry timer: the old holder still waits for a node that is down or cut
        off, or is down or cut off itself: what it keeps comes once it is back (it is
        stored there), unless it left the cluster or this went on for ``INCOMING_LIMIT``
        (then what is held here is let in, before the rest: order given up, not
        messages)."""
        self._go(ClaimerEvent.EXPIRED)
        if not self.gated:
            return []
        if holder_member and now - self.started < INCOMING_LIMIT:
            return [StartExpiryTimer(retry_delay)]
        return self.force("the old holder left the cluster" if not holder_member
                          else f"waited {INCOMING_LIMIT:.0f}s for the old holder")

    def force(self, why: str) -> list:
        """End the gate without the late batches still missing (their node or the old
        holder is gone, or the session moves on): what it holds is admitted."""
        self._go(ClaimerEvent.FORCE)
        if not self.gated:
            return []
        self.why = f"{why}; missing from {sorted(self.awaiting)}"
        self.pending.clear()  # what went to the old holder went with it
        self.early.clear()
        actions: list = []
        for node in sorted(self.awaiting):
            actions += self._late_from(node, [])
        if self.undecided:
            actions.append(Admit(tuple(u[2] for u in self.undecided)))
            self.undecided.clear()
        return actions + self._maybe_done()

    def _behind_batch(self, routed: list) -> list:
        """Messages ``(via, item)`` a node sent after its barrier: held behind the old
        holder's late batch from it while that is awaited; returns the others, to admit."""
        admit = []
        for via, item in routed:
            if via in self.awaiting:
                self.held.setdefault(via, []).append(item)
            else:
                admit.append(item)
        return admit

    def _late_from(self, source: str, items: list) -> list:
        held = self.held.pop(source, [])
        self.awaiting.discard(source)
        both = tuple(items) + tuple(held)
        return [Admit(both)] if both else []

    def _maybe_done(self) -> list:
        if not self.gated or self.awaiting or self.pending or self.undecided:
            return []
        self._go(ClaimerEvent.ALL_IN)
        return [GateOff()]
