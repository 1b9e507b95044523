"""The nemesis of the fault tests: kill -9 of a random node (the Raft leader included when
the draw falls on it), restart after a pause; never more than one node down, and the
cluster formed again before the next kill. Records ``kill``/``restart`` events."""

from __future__ import annotations

import random
import threading

import checker as ev


class KillRestartNemesis:
    def __init__(self, cluster, history, rng: random.Random, every: tuple = (4.0, 6.0),
                 down_for: tuple = (1.0, 2.0), limit: int = 10_000) -> None:
        self.cluster, self.history, self.rng = cluster, history, rng
        self.every, self.down_for, self.limit = every, down_for, limit
        self.stop_event = threading.Event()
        self.errors: list = []
        self.log: list[str] = []
        self.thread = threading.Thread(target=self._guarded, name="nemesis", daemon=True)

    def start(self) -> "KillRestartNemesis":
        self.thread.start()
        return self

    def stop(self, timeout: float = 90.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the nemesis did not stop"

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            self.errors.append(err)

    def _leader_id(self) -> str | None:
        for view in self.cluster.views().values():
            if view.get("leader"):
                return view["leader"]
        return None

    def _run(self) -> None:
        n = len(self.cluster.nodes)
        for _ in range(self.limit):
            if self.stop_event.wait(self.rng.uniform(*self.every)):
                return
            i = self.rng.randrange(1, n + 1)
            node = self.cluster.node(i)
            leader = self._leader_id()
            self.cluster.kill(i)
            self.history.add(ev.kill, node.node_id, leader == node.node_id)
            self.log.append(f"{self.history.now():7.2f} kill -9 {node.node_id}"
                            f"{' (leader)' if leader == node.node_id else ''}")
            # the pause is part of the fault (down time), not a wait for anything;
            # the restart happens even when the run is stopping: leave all nodes up
            self.stop_event.wait(self.rng.uniform(*self.down_for))
            self.cluster.restart(i, timeout=60.0)
            self.history.add(ev.restart, node.node_id)
            self.log.append(f"{self.history.now():7.2f} {node.node_id} ready again")
            self.cluster.wait_formed(timeout=60.0)
            self.log.append(f"{self.history.now():7.2f} cluster formed")
