"""The nemesis of the fault tests: one run mixes node faults and link faults.

Node faults (one thread, one fault at a time, never more than one node down or cut off,
and the cluster formed again before the next one):

* ``kill``: kill -9 of a node (the Raft leader when the slot asks for it, or when the draw
  falls on it), restart after a pause of ``down_for`` seconds; events ``kill``/``restart``.
* ``lose`` (with ``lose_one``): kill -9 of a random node that is never restarted, once the
  required faults are done and ``lose_at`` of the run has passed (at once if the run is
  shorter than that); the survivors must declare it down (issue 12: its sessions are
  promoted on their replicas). No node fault follows it (two nodes left: another would
  take the Raft majority); the link faults go on. Event ``kill``; ``lost`` names the node.
* ``partition`` (needs ``lab``, a tests/faults/netns.py NetnsLab): node i cut off from the
  other nodes for ``isolate_for`` seconds (clients still reach it: it is a minority of
  one), then healed; events ``partition``/``heal``. While it lasts, the nemesis watches the
  cluster views and logs what they show (the minority losing its leader and its quorum,
  the majority's leader, whether the majority shows the node down).

The schedule starts with the faults a run must have, in random order: ``min_kills`` kills
(the first of them aimed at the leader), ``min_partitions`` partitions and
``min_link_faults`` of each node link fault; then random
faults until stopped. While some of the required faults are still to come and the time
left (``seconds``) gets short, the pause between faults shrinks so that they fit.

* ``reset`` / ``slow`` (need ``lab``): node i's TCP connections to the other nodes reset
  (iptables REJECT with tcp-reset) for 0.5-1.5 s, or node i's egress to nodes and clients
  slowed (tc tbf: 256 kbit/s, up to 300 ms queued) for 2-4 s; events ``toxic``/
  ``toxic_end`` with the types ``tcp_reset`` and ``slow_link``.

Link faults (a second thread, needs ``proxies``: toxiproxy-python Proxy objects that some
clients go through): every ``toxic_every`` seconds a ``latency`` toxic (100-300 ms, both
directions) or a ``reset_peer`` toxic on one proxy for ``toxic_for`` seconds, then removed;
the first two are one of each. Events ``toxic``/``toxic_end``.

Every loop is bounded (count ``limit`` and the stop event); the pauses are Event.wait
pacing (the length of a fault), never synchronisation: what must be true before the next
step (a node ready, the cluster formed) is waited for as a condition with a deadline.
"""

from __future__ import annotations

import random
import threading
import time

import checker as ev
from support import wait_for

KILL, KILL_LEADER, PARTITION, LOSE = "kill", "kill-leader", "partition", "lose"
RESET, SLOW = "reset", "slow"  # node-to-node connections reset; a node's links slowed
#: rough seconds one node fault takes (pause + fault + recovery), to fit the schedule
FAULT_SECONDS = 8.0


class Nemesis:
    name = "nemesis"   # reported next to the workers' names when it fails

    def __init__(self, cluster, history, rng: random.Random, *, lab=None, proxies=(),
                 seconds: float | None = None, every: tuple = (1.5, 3.0),
                 down_for: tuple = (1.0, 2.0), isolate_for: tuple = (2.0, 4.0),
                 min_kills: int = 3, min_partitions: int = 1, min_link_faults: int = 1,
                 toxic_every: tuple = (2.0, 4.0), toxic_for: tuple = (1.5, 3.0),
                 latency_ms: tuple = (100, 300), reset_share: float = 0.3,
                 lose_one: bool = False, lose_at: float = 0.7,
                 limit: int = 10_000) -> None:
        self.cluster, self.history, self.rng = cluster, history, rng
        self.lab, self.proxies = lab, list(proxies)
        self.seconds = seconds
        self.every, self.down_for, self.isolate_for = every, down_for, isolate_for
        self.toxic_every, self.toxic_for = toxic_every, toxic_for
        self.latency_ms, self.reset_share, self.limit = latency_ms, reset_share, limit
        required = [KILL_LEADER] + [KILL] * (min_kills - 1) if min_kills else []
        if lab is not None:
            required += [PARTITION] * min_partitions + [RESET, SLOW] * min_link_faults
        rng.shuffle(required)
        self.required = required
        self.counts = {KILL: 0, PARTITION: 0, "toxic": 0, RESET: 0, SLOW: 0, LOSE: 0}
        self.lose_one, self.lose_at = lose_one, lose_at
        self.lost: str | None = None  # the node killed for good
        self.stop_event = threading.Event()
        self.errors: list = []
        self.log: list[str] = []
        self._log_lock = threading.Lock()
        self._started = 0.0
        self.threads = [threading.Thread(target=self._guarded, args=(self._node_faults,),
                                         name="nemesis", daemon=True)]
        if self.proxies:
            self.threads.append(threading.Thread(target=self._guarded,
                                                 args=(self._link_faults,),
                                                 name="nemesis-toxics", daemon=True))

    # -- life cycle
    def start(self) -> "Nemesis":
        self._started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    @property
    def thread(self) -> threading.Thread:
        """The node-fault thread (the one the run's length depends on)."""
        return self.threads[0]

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def stop(self, timeout: float = 120.0) -> None:
        """Stop after the fault in progress: a killed node is restarted, a partition healed,
        a toxic removed, and the cluster formed again."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        assert not any(t.is_alive() for t in self.threads), "the nemesis did not stop"

    def _guarded(self, body) -> None:
        try:
            body()
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            self.errors.append(err)

    def _log(self, text: str) -> None:
        with self._log_lock:
            self.log.append(f"{self.history.now():7.2f} {text}")

    def _leader_id(self) -> str | None:
        """The leader the running nodes name (the most named; None if none names one)."""
        named: dict = {}
        for view in self.cluster.views().values():
            if view.get("leader"):
                named[view["leader"]] = named.get(view["leader"], 0) + 1
        return max(named, key=named.get) if named else None

    # -- node faults
    def _next_fault(self, i: int) -> str:
        if i < len(self.required):
            return self.required[i]
        if self.lose_one and (self.seconds is None or time.monotonic() - self._started
                              >= self.lose_at * self.seconds):
            return LOSE
        return self.rng.choice([KILL, KILL, PARTITION, RESET, SLOW] if self.lab is not None
                               else [KILL])

    def _pause(self, i: int) -> float:
        """Seconds before fault i: ``every``, less while required faults must still fit."""
        pause = self.rng.uniform(*self.every)
        left = len(self.required) - i
        if self.seconds is not None and left > 0:
            time_left = self.seconds - (time.monotonic() - self._started)
            if time_left < left * FAULT_SECONDS:
                pause = self.rng.uniform(0.2, 0.5)
        return pause

    def _node_faults(self) -> None:
        for i in range(self.limit):
            if self.stop_event.wait(self._pause(i)):
                return
            fault = self._next_fault(i)
            if fault == LOSE:
                self._lose()
                self.stop_event.wait()  # (bounded by stop(): the run's end)
                return
            if fault == PARTITION:
                self._partition()
            elif fault in (RESET, SLOW):
                self._node_link_fault(fault)
            else:
                self._kill(aim_at_leader=fault == KILL_LEADER)

    def _kill(self, aim_at_leader: bool) -> None:
        n = len(self.cluster.nodes)
        leader = self._leader_id()
        ids = [node.node_id for node in self.cluster.nodes]
        if aim_at_leader and leader in ids:
            i = ids.index(leader) + 1
        else:
            i = self.rng.randrange(1, n + 1)
        node = self.cluster.node(i)
        self.cluster.kill(i)
        self.history.add(ev.kill, node.node_id, leader == node.node_id)
        self.counts[KILL] += 1
        self._log(f"kill -9 {node.node_id}{' (leader)' if leader == node.node_id else ''}"
                  f"{' [aimed at the leader: none known]' if aim_at_leader and not leader else ''}")
        # the pause is part of the fault (down time), not a wait for anything; the
        # restart happens even when the run is stopping: leave all nodes up
        self.stop_event.wait(self.rng.uniform(*self.down_for))
        self.cluster.restart(i, timeout=60.0)
        self.history.add(ev.restart, node.node_id)
        self._log(f"{node.node_id} ready again")
        self.cluster.wait_formed(timeout=60.0)
        self._log("cluster formed")

    def _lose(self) -> None:
        n = len(self.cluster.nodes)
        i = self.rng.randrange(1, n + 1)
        node = self.cluster.node(i)
        # the guarantee (README, what survives what): a node lost while every session it
        # holds has an in-sync replica; its sessions hop every few dozen milliseconds, and
        # each hand-over records the replicas the new holder seeded in its move
        under = {}

        def replicated() -> bool:
            view = self.cluster.views([node]).get(node.node_id) or {}
            mine = [m for m in view.get("nodes", ()) if m["id"] == node.node_id]
            under["n"] = mine[0].get("under_replicated") if mine else None
            return under["n"] == 0
        wait_for(replicated, 15.0, interval=0.05,
                 message=lambda: f"{node.node_id} without under-replicated sessions (last "
                 f"seen: {under.get('n')})")
        leader = self._leader_id()
        self.cluster.kill(i)
        self.history.add(ev.kill, node.node_id, leader == node.node_id)
        self.counts[LOSE] += 1
        self.lost = node.node_id
        self._log(f"kill -9 {node.node_id} for good"
                  f"{' (leader)' if leader == node.node_id else ''}")
        survivors = self.cluster.running()
        wait_for(lambda: all(
            any(m["id"] == node.node_id and m.get("declared_down") for m in v["nodes"])
            for v in self.cluster.views(survivors).values()), 30.0, interval=0.1,
            message=f"{node.node_id} declared down by {[m.node_id for m in survivors]}")
        self._log(f"{node.node_id} declared down")
        self.cluster.wait_formed(timeout=60.0)
        self._log("the survivors formed")

    def _partition(self) -> None:
        n = len(self.cluster.nodes)
        i = self.rng.randrange(1, n + 1)
        node = self.cluster.node(i)
        others = [m for m in self.cluster.nodes if m is not node]
        leader = self._leader_id()
        hold = self.rng.uniform(*self.isolate_for)
        start = time.monotonic()
        try:
            self.lab.isolate(i)   # inside: a half-made cut is removed too
            self.history.add(ev.partition, node.node_id, leader == node.node_id)
            self.counts[PARTITION] += 1
            self._log(f"partition: {node.node_id}"
                      f"{' (leader)' if leader == node.node_id else ''} cut off from "
                      f"{[m.node_id for m in others]} for {hold:.1f} s")
            seen = self._watch_partition(node, others, start + hold)
            self._log(f"during the partition: {seen}")
        finally:
            self.lab.heal(i)
        self.history.add(ev.heal, node.node_id)
        self._log(f"heal {node.node_id} after {time.monotonic() - start:.1f} s")
        self.cluster.wait_formed(timeout=60.0)
        self._log("cluster formed")

    def _node_link_fault(self, kind: str) -> None:
        """``reset``: node i's TCP connections to the other nodes answered with RST for
        0.5-1.5 s (every link breaks and is dialled again); ``slow``: node i's egress, to
        nodes and clients, through a 256 kbit/s token bucket (up to 300 ms of queueing)
        for 2-4 s. Recorded as ``toxic`` events (type ``tcp_reset`` / ``slow_link``)."""
        i = self.rng.randrange(1, len(self.cluster.nodes) + 1)
        node = self.cluster.node(i)
        if kind == RESET:
            hold = self.rng.uniform(0.5, 1.5)
            detail = f"tcp_reset node-to-node links of {node.node_id}"
            apply, undo = (lambda: self.lab.isolate(i, reset=True)), (lambda: self.lab.heal(i))
        else:
            hold = self.rng.uniform(2.0, 4.0)
            detail = f"slow_link {node.node_id}: 256kbit/s, up to 300 ms queued"
            apply, undo = (lambda: self.lab.slow(i)), (lambda: self.lab.unslow(i))
        try:
            apply()
            self.history.add(ev.toxic, node.node_id, detail)
            self.counts[kind] += 1
            self._log(f"{detail} for {hold:.1f} s")
            self.stop_event.wait(hold)   # the fault's length
        finally:
            undo()
        self.history.add(ev.toxic_end, node.node_id, kind)
        self._log(f"{kind} on {node.node_id} removed")
        self.cluster.wait_formed(timeout=60.0)
        self._log("cluster formed")

    def _watch_partition(self, node, others, until: float) -> str:
        """Poll the views until ``until`` (or the stop): when the cut-off node lost its
        leader and its quorum, which leader the majority has, whether it shows the node
        down. Returns a summary for the log."""
        start = time.monotonic()
        no_leader = no_quorum = shown_down = None
        majority_leaders: set = set()
        for _ in range(1000):
            now = time.monotonic()
            if now >= until:
                break
            views = self.cluster.views([node, *others])
            mine = views.get(node.node_id)
            if mine is not None:
                if no_leader is None and not mine.get("leader"):
                    no_leader = now - start
                if no_quorum is None and mine.get("has_quorum") is False:
                    no_quorum = now - start
            for other in others:
                view = views.get(other.node_id)
                if view is None:
                    continue
                if view.get("leader"):
                    majority_leaders.add(view["leader"])
                status = {m["id"]: m["status"] for m in view.get("nodes", [])}
                if shown_down is None and status.get(node.node_id) == "down":
                    shown_down = now - start
            if self.stop_event.wait(min(0.2, max(until - time.monotonic(), 0.0))):
                break

        def when(t):
            return f"after {t:.1f} s" if t is not None else "never"
        return (f"{node.node_id} without leader {when(no_leader)}, without quorum "
                f"{when(no_quorum)}; majority leader(s) {sorted(majority_leaders)}; "
                f"majority shows {node.node_id} down {when(shown_down)}")

    # -- link faults
    def _link_faults(self) -> None:
        first = ["latency", "reset_peer"]
        self.rng.shuffle(first)
        for i in range(self.limit):
            if self.stop_event.wait(self.rng.uniform(*self.toxic_every)):
                return
            kind = first[i] if i < len(first) else (
                "reset_peer" if self.rng.random() < self.reset_share else "latency")
            proxy = self.rng.choice(self.proxies)
            if kind == "latency":
                ms = self.rng.randint(*self.latency_ms)
                toxics = [(f"nemesis_latency_{stream}", "latency", stream,
                           {"latency": ms, "jitter": ms // 5})
                          for stream in ("upstream", "downstream")]
                detail = f"latency {ms}ms +-{ms // 5}ms both ways"
            else:
                timeout = self.rng.choice([0, 200, 500])
                toxics = [("nemesis_reset_peer", "reset_peer", "downstream",
                           {"timeout": timeout})]
                detail = f"reset_peer timeout={timeout}ms"
            hold = self.rng.uniform(*self.toxic_for)
            added = []
            try:
                for name, type_, stream, attributes in toxics:
                    proxy.add_toxic(name=name, type=type_, stream=stream,
                                    attributes=attributes)
                    added.append(name)
                self.history.add(ev.toxic, proxy.name, detail)
                self.counts["toxic"] += 1
                self._log(f"toxic on {proxy.name}: {detail} for {hold:.1f} s")
                self.stop_event.wait(hold)   # the fault's length
            finally:
                for name in added:
                    proxy.destroy_toxic(name)
            self.history.add(ev.toxic_end, proxy.name, kind)
            self._log(f"toxic removed from {proxy.name}: {kind}")
