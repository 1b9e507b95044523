"""Issue 10, acceptance: the Kubernetes rolling update of deploy/kubernetes, replayed three
times in a row on real processes behind a real HAProxy (deploy/haproxy/haproxy.cfg).

Each node in turn does what its pod does: the preStop hook runs ``shoal cluster leave``
(its clients are sent away, its sessions move to the other nodes, it leaves the Raft
voters), the process gets SIGTERM, and it comes back on the same data directory with a
new address (new node-to-node and Raft ports: a new pod IP) and no ``--join`` (what it
stored is enough). Meanwhile a publisher sends numbered QoS 1 messages and three
persistent subscribers stay subscribed, all through HAProxy, reconnecting whenever they are
sent away. Checked: a Raft quorum on every serving node at every sample, the Raft voters
(pysyncobj's own status) equal to the members after every step, no acknowledged message
lost, and every resume of a subscriber with session present = 1.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter

import pytest

from support import (HAPROXY, Balancer, free_port_pair, http_json,
                     probe_until_seen, raft_voters, shoal_cli, wait_for)

pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(400),
    pytest.mark.skipif(HAPROXY is None and not os.environ.get("CI"),
                       reason="haproxy is not installed (apt-get install haproxy; "
                              ".ci/run does it)"),
]

# the scale trial: SHOAL_TEST_ROUNDS=10 SHOAL_TEST_SUBSCRIBERS=30
ROUNDS = int(os.environ.get("SHOAL_TEST_ROUNDS", "3"))
SUBSCRIBERS = int(os.environ.get("SHOAL_TEST_SUBSCRIBERS", "3"))
EXPIRY = 600


class _Background:
    """A loop in a daemon thread (``_run``), ended by ``stop()``, which waits for it."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{type(self).__name__} did not stop"


class Resuming(_Background):
    """A persistent subscriber that reconnects (clean start 0) whenever it is sent away,
    recording the session-present flag of every resume. Bounded by ``stop()``."""

    def __init__(self, lb: Balancer, client_id: str, topic_filter: str) -> None:
        self.client = lb.paho(client_id, clean=True, session_expiry=EXPIRY)
        self.client.connect()
        self.client.subscribe(topic_filter, qos=1)
        self.client.clean = False
        self.presents: list[bool] = []
        self.refused: list[str] = []
        super().__init__()

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stop.wait(0.05):
                return
            if self.client.is_connected():
                continue
            self.client.client.loop_stop()
            try:
                self.presents.append(self.client.connect(clean=False, timeout=5.0))
            except (AssertionError, OSError) as err:  # refused while a node settles
                self.refused.append(repr(err))
                self._stop.wait(0.2)


class Publisher(_Background):
    """Numbered QoS 1 messages through the balancer; a message counts once PUBACKed.
    Sent away, it reconnects and sends the unacknowledged number again."""

    def __init__(self, lb: Balancer, topic: str) -> None:
        self.client = lb.paho(f"rp-pub-{uuid.uuid4().hex[:6]}")
        self.client.connect()
        self.topic = topic
        self.acked: list[int] = []
        self.retries = 0
        super().__init__()

    def _run(self) -> None:
        k = 0
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            try:
                if not self.client.is_connected():
                    self.client.client.loop_stop()
                    self.client.connect(timeout=5.0)
                self.client.publish(self.topic, str(k).encode(), qos=1, wait=True,
                                    timeout=10.0)
            except (AssertionError, OSError, RuntimeError, ValueError):
                self.retries += 1
                self._stop.wait(0.1)
                continue
            self.acked.append(k)
            k += 1
            self._stop.wait(0.01)


class QuorumWatch(_Background):
    """Samples every serving node's Raft quorum (GET /api/v1/cluster) every 0.2 s."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.samples = 0
        self.lost: list[tuple[float, str, dict]] = []
        self.paused: set[str] = set()  # nodes leaving or restarting: not serving
        super().__init__()

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stop.wait(0.2):
                return
            for node in list(self.cluster.running()):
                if node.node_id in self.paused:
                    continue
                try:
                    status, view = http_json("GET", node.admin_url + "/api/v1/cluster", 1.0)
                except OSError:
                    continue
                if status != 200 or view.get("phase") != "member" or \
                        node.node_id in self.paused:
                    continue
                self.samples += 1
                if not view["raft"]["has_quorum"]:
                    self.lost.append((time.monotonic(), node.node_id, view["raft"]))


def test_rolling_update_three_times_through_haproxy(cluster_factory, tmp_path):
    cluster = cluster_factory(3, proxy_protocol=True)
    nodes = [cluster.node(i) for i in (1, 2, 3)]
    lb = Balancer(tmp_path, nodes).start()
    try:
        _rolling_update(cluster, nodes, lb)
    finally:
        lb.stop()


def _rolling_update(cluster, nodes, lb) -> None:
    lb.wait_status({"node1": "UP", "node2": "UP", "node3": "UP"})
    t = uuid.uuid4().hex[:8]
    topic = f"ru/{t}/m"
    subs = [Resuming(lb, f"ru-sub-{t}-{i}", f"ru/{t}/#").start() for i in range(SUBSCRIBERS)]
    publisher = Publisher(lb, topic)
    for sub in subs:
        probe_until_seen(lambda m: publisher.client.publish(f"ru/{t}/probe", m, qos=0),
                         lambda m, sub=sub: m in sub.client.payloads(f"ru/{t}/probe"),
                         what="every subscriber's route on the publisher's node")
    publisher.start()
    watch = QuorumWatch(cluster).start()
    steps = []
    try:
        for rnd in range(ROUNDS):
            for node in nodes:
                t0 = time.monotonic()
                watch.paused.add(node.node_id)
                r = shoal_cli("cluster", "leave", "--admin", node.admin_url, timeout=120)
                assert r.returncode == 0, f"round {rnd} {node.node_id}: {r.stdout}{r.stderr}"
                answer = json.loads(r.stdout.strip().splitlines()[-1])
                assert answer["left"] and answer["sessions_not_moved"] == 0, answer
                others = [n for n in nodes if n is not node]
                want = {f"{n.host}:{n.raft_port}" for n in others}
                for other in others:
                    wait_for(lambda other=other: raft_voters(other) == want, 10.0,
                             message=lambda other=other: f"round {rnd}, {node.node_id} left: "
                             f"{other.node_id} voters {raft_voters(other)} == {want}")
                node.stop()  # SIGTERM: the pod goes
                # the pod comes back with a new IP: new node-to-node and Raft addresses
                node.cluster_port = free_port_pair()
                node.raft_port = node.cluster_port + 1
                node.join = None
                node.start()
                cluster.wait_formed(nodes, timeout=30.0)
                want = {f"{n.host}:{n.raft_port}" for n in nodes}
                for n in nodes:
                    wait_for(lambda n=n: raft_voters(n) == want, 10.0,
                             message=lambda n=n: f"{n.node_id} voters {raft_voters(n)}")
                watch.paused.discard(node.node_id)
                lb.wait_status({"node1": "UP", "node2": "UP", "node3": "UP"}, timeout=20.0)
                steps.append((rnd, node.node_id, answer["sessions_moved"],
                              round(time.monotonic() - t0, 1)))
    finally:
        publisher.stop()
        watch.stop()
    for sub in subs:
        sub.stop()

    want = set(publisher.acked)
    assert len(want) > 200, f"only {len(want)} messages acknowledged"
    for sub in subs:
        if not sub.client.is_connected():
            sub.client.client.loop_stop()
            sub.presents.append(sub.client.connect(clean=False))

        def received(sub=sub) -> Counter:
            return Counter(int(p) for p in sub.client.payloads(topic))
        wait_for(lambda sub=sub: want <= set(received(sub)), 30.0,
                 message=lambda sub=sub: f"every acknowledged message at "
                 f"{sub.client.client._client_id!r}; missing "
                 f"{sorted(want - set(received(sub)))[:20]}")
    print(f"\nsteps (round, node, sessions moved, s): {steps}")
    print(f"acknowledged {len(want)}, publisher retries {publisher.retries}, quorum samples "
          f"{watch.samples}, resumes {[len(s.presents) for s in subs]}, refused "
          f"{[len(s.refused) for s in subs]}")
    assert not watch.lost, f"quorum lost at {watch.lost[:5]}"
    assert watch.samples > 50
    for sub in subs:
        assert sub.presents and all(sub.presents), \
            f"a resume without its session: {sub.presents}"
