"""The workload of the fault tests: numbered publishers and hopping persistent subscribers,
each on its own thread, recording what they see in a shared History (checker events).

Every loop is bounded (a stop event and an iteration limit); the sleeps here are pacing
of the workload, never synchronisation."""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import checker as ev
from support import PahoClient

EXPIRY = 3600


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects when not straight to a node: e.g. a toxiproxy proxy in front
    of one (``node_id`` then names both, say ``n1~px``). Workers take nodes and endpoints
    alike: all they use is ``node_id``, ``host`` and ``port``."""
    node_id: str
    host: str
    port: int


class History:
    """Thread-safe list of checker events on one clock (seconds since the start)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, make: Callable, *args, **kw) -> None:
        e = make(self.now(), *args, **kw)
        with self._lock:
            self.events.append(e)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.events)


def _close(client: PahoClient | None) -> None:
    if client is None:
        return
    try:
        client.close()
    except Exception:  # noqa: BLE001 - a dead connection: nothing left to close
        pass


class _Worker:
    def __init__(self, name: str, history: History, nodes: list, rng: random.Random) -> None:
        self.name, self.history, self.nodes, self.rng = name, history, nodes, rng
        self.stop_event = threading.Event()
        self.errors: list = []
        self.connect_failures = 0
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.name} did not stop"

    def _guarded(self) -> None:
        try:
            self.run()
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            self.errors.append(err)

    def _connect(self, make: Callable[[object], PahoClient], resume: bool,
                 attempts: int = 200) -> PahoClient | None:
        """Connect to a random running node (any node: a dead one refuses at once);
        None when stopped first. Records connected/disconnected events."""
        why: collections.Counter = collections.Counter()
        for _ in range(attempts):
            if self.stop_event.is_set() and not resume:
                return None
            node = self.rng.choice(self.nodes)
            client = make(node)
            try:
                present = client.connect(clean=not resume, timeout=15.0)
            except (OSError, AssertionError) as err:
                self.connect_failures += 1
                why[f"{node.node_id}: {type(err).__name__}: {str(err)[:60]}"] += 1
                self.history.add(ev.disconnected, self.name, f"connect to {node.node_id}: "
                                 f"{type(err).__name__}: {str(err)[:80]}")
                _close(client)
                self.stop_event.wait(0.05)
                continue
            self.history.add(ev.connected, self.name, node.node_id, present, resume)
            return client
        raise AssertionError(f"{self.name}: no connection in {attempts} attempts: "
                             f"{why.most_common(6)}")


class Publisher(_Worker):
    """Publishes seq 0, 1, 2... on ``topic`` at ``qos``, ``pace`` s apart, each waited for.
    A message not acknowledged within ``ack_timeout`` is abandoned (never re-sent under
    its number) and the publisher reconnects (clean, to a random node)."""

    def __init__(self, name, history, nodes, rng, topic: str, qos: int, pace: float,
                 ack_timeout: float = 5.0, limit: int = 1_000_000) -> None:
        super().__init__(name, history, nodes, rng)
        self.topic, self.qos, self.pace = topic, qos, pace
        self.ack_timeout, self.limit = ack_timeout, limit
        self.acked = 0
        self.abandoned = 0

    def _make(self, node) -> PahoClient:
        return PahoClient(node, self.name, 5, connect=False)

    def run(self) -> None:
        client = None
        for seq in range(self.limit):
            if self.stop_event.is_set():
                break
            if client is None or not client.is_connected():
                _close(client)
                client = self._connect(self._make, resume=False)
                if client is None:
                    break
            self.history.add(ev.sent, self.name, self.topic, seq, self.qos)
            ok = False
            try:
                info = client.client.publish(self.topic, str(seq).encode(), self.qos)
                info.wait_for_publish(self.ack_timeout)
                ok = info.is_published()
            except (RuntimeError, ValueError, OSError):
                ok = False
            if ok:
                self.history.add(ev.acked, self.name, self.topic, seq, self.qos)
                self.acked += 1
            else:
                self.abandoned += 1
                self.history.add(ev.disconnected, self.name, f"#{seq} not acknowledged")
                _close(client)
                client = None
            self.stop_event.wait(self.pace)
        _close(client)


class Subscriber(_Worker):
    """A persistent session (v5, Session Expiry ``EXPIRY``) on ``topic_filter`` at ``qos``
    that disconnects and reconnects to a random node every ``dwell`` seconds (a range).
    A resume answered with session present = 0 is recorded and subscribed again.

    A QoS 1 subscriber makes some of its hops (``overlap``) without closing the old
    connection first, as a client behind a dead NAT entry or a half-open link does: the
    broker must end the old one (takeover). What the old connection still receives after
    the new one's CONNACK is recorded as ``stale_received`` (two live owners when the
    message was sent after that CONNACK)."""

    def __init__(self, name, history, nodes, rng, topic_filter: str, qos: int,
                 dwell: tuple = (0.05, 0.2), limit: int = 1_000_000,
                 overlap: float = 0.3) -> None:
        super().__init__(name, history, nodes, rng)
        self.topic_filter, self.qos, self.dwell, self.limit = topic_filter, qos, dwell, limit
        self.overlap = overlap if qos == 1 else 0.0
        self.client: PahoClient | None = None
        self.moves = 0
        self.overlaps = 0
        self.hopping = True
        self._paho = None
        self._old: PahoClient | None = None   # an overlap hop's old connection, left open
        self.other_payloads: set = set()

    def _make(self, node) -> PahoClient:
        client = PahoClient(node, self.name, 5, connect=False, session_expiry=EXPIRY)
        if self.qos == 2:
            # one paho Client for the whole life: it keeps incoming QoS 2 state (PUBREC
            # sent, PUBREL awaited) across reconnects, as a real persistent client does
            if self._paho is not None:
                client.client = self._paho
            else:
                self._paho = client.client
        # QoS 1 keeps no client state across connections: a paho Client per connection,
        # so an overlap hop can keep the old one open beside the new one
        client.superseded_at = None
        client.client.on_connect = client._on_connect
        client.client.on_disconnect = client._on_disconnect
        client.client.on_subscribe = client._on_subscribe
        client.client.on_unsubscribe = client._on_unsubscribe
        client.client.on_message = lambda _c, _u, msg, conn=client: self._on_message(conn, msg)
        return client

    def _on_message(self, conn, msg) -> None:
        try:
            seq = int(msg.payload)
        except ValueError:
            self.other_payloads.add(msg.payload)   # probes
            return
        self.history.add(ev.received, self.name, msg.topic, seq, msg.qos, bool(msg.dup))
        if conn.superseded_at is not None:
            self.history.add(ev.stale_received, self.name, msg.topic, seq, conn.superseded_at)

    def _subscribe(self) -> None:
        self.client.subscribe(self.topic_filter, qos=self.qos, timeout=15.0)
        self.history.add(ev.subscribed, self.name, self.topic_filter, self.qos)

    def start_session(self) -> None:
        """First connection (clean start) and SUBACK, on the caller's thread."""
        self.client = self._connect(self._make, resume=False)
        self._subscribe()

    def run(self) -> None:
        for _ in range(self.limit):
            if self.stop_event.is_set():
                return
            self.stop_event.wait(self.rng.uniform(*self.dwell))
            if self.stop_event.is_set():
                return
            self._hop()

    def _hop(self, overlap: bool | None = None) -> None:
        if overlap is None:
            overlap = self.rng.random() < self.overlap
        _close(self._old)  # the previous overlap hop's old connection: done with it
        self._old = None
        old = self.client
        reason = "hop" if old.is_connected() else f"lost connection {old.disconnects[-1:]}"
        if overlap and old.is_connected():
            self.overlaps += 1
            self.history.add(ev.disconnected, self.name, "overlap hop: the old connection "
                             "stays open")
        else:
            overlap = False
            _close(old)
            self.history.add(ev.disconnected, self.name, reason)
        self.client = self._connect(self._make, resume=True)
        if overlap:
            old.superseded_at = self.history.now()  # after the new connection's CONNACK
            self._old = old
        self.moves += 1
        if not self.client.session_present:
            self._subscribe()

    def settle(self) -> None:
        """After the run (hopping stopped): reconnect once more so that what the session
        still holds is delivered."""
        self._hop(overlap=False)

    def close(self) -> None:
        _close(self._old)
        self._old = None
        _close(self.client)
