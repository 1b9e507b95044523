"""The one seam between the broker core and the cluster, declared in both directions.

``node`` never imports ``cluster``. The cluster uses a broker only through
``BrokerSeam``; the broker talks to whatever implements ``ClusterHooks``: "claim this ClientID", "this session ended", "these filters are now
(no longer) subscribed here", "forward this message", "this retained topic changed".
A single node uses ``LocalCluster``: it owns every ClientID, claims complete at once, and
there is nobody to forward to. The cluster (``cluster/member.py``) implements the same
hooks over Raft and the node-to-node transport.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Protocol


class Claim:
    """The outcome of claiming a ClientID for a new connection on this node."""

    __slots__ = ("epoch", "record", "fresh_reason", "opened", "confirm")

    def __init__(self, epoch: int, record: dict | None = None,
                 fresh_reason: str | None = None, opened=None, confirm=None) -> None:
        self.epoch = epoch
        # called with the session once it is opened for this claim (resumed, installed from
        # ``record`` or new), before CONNACK
        self.opened = opened
        # async, called with the opened session; CONNACK waits for it. True: go on; False:
        # the claim was overtaken (the session is dropped, CONNACK 0x89); None: not
        # decided in time (the session stays, CONNACK 0x88 so the client retries)
        self.confirm = confirm
        # the session record handed over by the previous owner (another node), if any
        self.record = record
        # set when a previous session existed elsewhere but could not be taken over and the
        # policy says to start fresh (the CONNACK then says session present = 0)
        self.fresh_reason = fresh_reason


class ConnectRefused(Exception):
    """CONNECT answered with a CONNACK carrying ``reason`` (an error), then the close:
    a bad CONNECT, or a ClientID that cannot be claimed now."""

    def __init__(self, reason: int, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


class ClusterHooks(Protocol):
    node_id: str

    def claim(self, client_id: str, clean_start: bool,
              owner: str | None = None) -> Claim | Awaitable[Claim]:
        """Claim ``client_id`` for this node. A ``Claim`` means done now; an awaitable
        means the connection waits (reading paused) for it. Raises ``ConnectRefused``.
        ``owner`` (``bind_client_id``): the login claiming it; a session that exists
        under another login is not taken (ConnectRefused 0x87)."""

    def session_ended(self, client_id: str, epoch: int) -> None:
        """The session of ``client_id`` (claimed with ``epoch``) ended on this node."""

    def routes_changed(self, added: list[str], removed: list[str]) -> Awaitable | None:
        """Filters that got their first / lost their last subscriber on this node. An
        awaitable: done when the other nodes know (SUBACK waits for it)."""

    def forward(self, msg, handled_groups) -> int:
        """Send ``msg`` to the other nodes with matching subscribers; shared groups in
        ``handled_groups`` (their ``$share/...`` filter) were served here. Returns the
        number of nodes it went to."""

    def take_forward_waits(self) -> list:
        """Futures of the QoS 1/2 messages ``forward`` sent since the last call: each is
        done once the receiving node has stored what the message changed there (its
        persistent sessions' queues). A PUBACK / PUBREC waits for them."""

    def retained_changed(self, topic: str, msg) -> None:
        """A retained message was set (``msg``) or cleared (``None``) by a local client."""

    def not_ready_reason(self) -> str | None:
        """Why this node should not take new clients now (joining, leaving, in a Raft
        minority), or None when it can: ``GET /readyz``."""


class BrokerSeam(Protocol):
    """What the cluster (cluster/) may use of a broker: the one declared way in. A test
    (tests/unit/test_seam.py) holds every ``broker.<name>`` in cluster/ to this list; the
    simulation (cluster/simulation.py) drives the real Broker through it too.

    Sessions: the cluster reads ``sessions`` (ClientID -> node.session.Session) and, while
    a session moves, sets its ``gate`` (the one hook: messages for it go to the gate
    instead of ``deliver``) and its ``handover`` mark (stored with it, shaped by
    cluster/marks.py). Everything else it does to sessions goes through the methods here.
    """

    config: Any
    sessions: Mapping[str, Any]
    counters: Any
    clients: set
    retained: Any
    filter_refs: Mapping[str, int]

    def attach_cluster(self, cluster: "ClusterHooks") -> None: ...

    # hand-overs
    def snapshot(self, session) -> dict: ...
    def freeze_session(self, client_id: str, why: str): ...
    def unfreeze(self, session, why: str) -> None: ...
    def adopt_session(self, claim: Claim): ...
    async def confirm_claim(self, claim: Claim, session) -> bool | None: ...
    def end_session(self, session, why: str, release: bool = True,
                    will: bool = True) -> None: ...
    def keep_sessions(self, keep: Callable[[str], bool], why: str) -> int: ...

    # the store
    def persist(self, session) -> None: ...
    def durable_wait(self) -> Awaitable | None: ...
    def all_done(self, *waits) -> Awaitable: ...

    # replication (cluster/replication.py)
    def has_store(self) -> bool: ...
    def attach_replication(self, tap, tap_wait) -> None: ...
    def stored_changes(self, session) -> list: ...

    # messages from other nodes, retained messages, connections
    def route_remote(self, msg, normal: bool, groups, only=None) -> int: ...
    def set_retained(self, topic: str, msg) -> None: ...
    def kick(self, client_id: str, reason: int = ...) -> bool: ...
    def kick_all(self, reason: int, send_will: bool) -> None: ...


class LocalCluster:
    """A node alone: every ClientID is ours; epochs still increase per claim so code
    written against them behaves as it will in a cluster."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._epoch = 0

    def claim(self, client_id: str, clean_start: bool, owner: str | None = None) -> Claim:
        # (the owner of a local session was checked against the session itself)
        self._epoch += 1
        return Claim(self._epoch)

    def session_ended(self, client_id: str, epoch: int) -> None:
        return None

    def routes_changed(self, added: list[str], removed: list[str]) -> None:
        return None

    def forward(self, msg, handled_groups) -> int:
        return 0

    def take_forward_waits(self) -> list:
        return []

    def retained_changed(self, topic: str, msg) -> None:
        return None

    def not_ready_reason(self) -> str | None:
        return None
