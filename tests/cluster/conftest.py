"""Fixtures of the multi-node suite: a Shoal cluster as real processes.

How it works
------------
* ``Cluster`` starts nodes with ``python -m cluster run`` (cwd = repository root,
  PYTHONPATH = repository root), each on free ports (MQTT, admin, node-to-node C and Raft
  C + 1) with its own data directory and log file. Node 1 (``n1``) founds the cluster; every
  later node joins through a running member (``--join``). All nodes of a test share one
  secret and a cluster name unique to the test (so mDNS tests never meet other clusters).
* ``cluster.node(i)`` is node i (1-based, ``n<i>``): ``.port`` (MQTT), ``.admin_port``,
  ``.paho()``, ``.raw()``, ``.api(path)``, ``.cluster_view()``, ``.session_view(id)``.
  ``cluster.leader()``, ``cluster.kill(i)`` (kill -9), ``cluster.restart(i)``,
  ``cluster.add_node()``, ``cluster.wait_formed()``.
* The cluster is *formed* when every running node's ``GET /api/v1/cluster`` lists exactly the
  running nodes, all ``up``, and names the same leader.
* Failing tests get the log tail of every node that ran in them (like tests/integration).
* Nothing sleeps to synchronise: waits are conditions with deadlines (support.wait_for).

Run from the repository root: ``.venv/bin/pytest tests/cluster -q``
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from support import LIVE_NODES, ClusterNodeProcess, wait_for

SECRET = "test-secret-0123456789"


class Cluster:
    """A set of cluster nodes started by one test (or module)."""

    def __init__(self, workdir, secret: str = SECRET, name: str | None = None,
                 id_prefix: str = "", **options) -> None:
        self.workdir = workdir
        self.secret = secret
        self.name = name or f"t-{uuid.uuid4().hex[:10]}"
        #: node ids are ``<id_prefix>n<i>``; mDNS tests use a unique prefix because node
        #: ids must be unique on the whole LAN (loopback here), whatever the cluster name
        self.id_prefix = id_prefix
        self.options = options
        self.nodes: list[ClusterNodeProcess] = []

    # -- membership
    def add_node(self, join: bool | str = True, wait: bool = True, timeout: float = 30.0,
                 **options) -> ClusterNodeProcess:
        """Start one more node. ``join``: True joins through the first running node, a
        string is the ``--join`` value itself, False starts without ``--join``. With ``wait``
        the call returns when the node is ready (health ok and it lists itself)."""
        node_id = f"{self.id_prefix}n{len(self.nodes) + 1}"
        if join is True:
            running = self.running()
            join = running[0].address if running else None
        node = self._make_node(node_id, join or None, {**self.options, **options})
        self.nodes.append(node)
        LIVE_NODES.append(node)
        if wait:
            node.start(timeout)
        else:
            self._spawn(node)
        return node

    def _make_node(self, node_id: str, join: str | None, options: dict) -> ClusterNodeProcess:
        """The process object of the next node (a subclass may place it elsewhere)."""
        return ClusterNodeProcess(self.workdir, node_id, self.secret, self.name, join=join,
                                  options=options)

    @staticmethod
    def _spawn(node: ClusterNodeProcess) -> None:
        """Start the process without waiting for readiness (several at once)."""
        import subprocess
        from support import REPO_ROOT
        cmd, env = node.command()
        node._log = open(node.log_path, "ab")
        node.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=node._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, n: int = 3, timeout: float = 60.0) -> "Cluster":
        for _ in range(n):
            self.add_node()
        self.wait_formed(timeout=timeout)
        return self

    def node(self, i: int) -> ClusterNodeProcess:
        """Node i, counting from 1 (node_id ``n<i>``, after the id prefix if any)."""
        return self.nodes[i - 1]

    def running(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.alive()]

    # -- views
    def api(self, i: int, path: str, method: str = "GET"):
        return self.node(i).api(path, method)

    def views(self, nodes=None) -> dict:
        """node_id -> that node's GET /api/v1/cluster (nodes that do not answer: missing)."""
        out = {}
        for node in nodes if nodes is not None else self.running():
            try:
                status, body = node.api("/api/v1/cluster", timeout=2.0)
            except OSError:
                continue
            if status == 200:
                out[node.node_id] = body
        return out

    def formed_problem(self, nodes=None) -> str | None:
        """None when ``nodes`` (default: the running ones) form a cluster; else why not."""
        nodes = list(nodes if nodes is not None else self.running())
        want = {n.node_id for n in nodes}
        views = self.views(nodes)
        if set(views) != want:
            return f"no answer from {sorted(want - set(views))}"
        leaders = set()
        for node_id, view in views.items():
            listed = {n["id"]: n for n in view.get("nodes", [])}
            if not want <= set(listed):
                return f"{node_id} lists {sorted(listed)}, not all of {sorted(want)}"
            down = [i for i in want if listed[i]["status"] != "up"]
            if down:
                return f"{node_id} shows {down} not up: {[listed[i]['status'] for i in down]}"
            leaders.add(view.get("leader"))
        if len(leaders) != 1 or None in leaders or not leaders <= want:
            return f"leaders named: {sorted(map(str, leaders))}"
        return None

    def wait_formed(self, nodes=None, timeout: float = 30.0) -> dict:
        """Wait until ``nodes`` form a cluster; return their views."""
        last = {"why": "not checked"}

        def formed():
            last["why"] = self.formed_problem(nodes)
            return last["why"] is None
        wait_for(formed, timeout, interval=0.1,
                 message=lambda: f"cluster formed ({last['why']})")
        return self.views(nodes)

    def leader(self, nodes=None) -> ClusterNodeProcess:
        """The node every running node names as leader (waits until they agree)."""
        views = self.wait_formed(nodes)
        leader_id = next(iter(views.values()))["leader"]
        return next(n for n in self.nodes if n.node_id == leader_id)

    # -- faults
    def kill(self, i: int, sig: int = signal.SIGKILL) -> ClusterNodeProcess:
        node = self.node(i)
        node.kill(sig)
        return node

    def restart(self, i: int, timeout: float = 30.0) -> ClusterNodeProcess:
        """Start node i again on its ports and data directory, joining a running member."""
        node = self.node(i)
        if node.alive():
            node.stop()
        others = [n for n in self.running() if n is not node]
        if others:
            node.join = others[0].address
        return node.start(timeout)

    def start_together(self, nodes, timeout: float = 30.0) -> float:
        """Start ``nodes`` at once (new ones are added to the cluster), each with its own
        ``join``; return the seconds until they are ready and formed."""
        t0 = time.monotonic()
        for node in nodes:
            if node not in self.nodes:
                self.nodes.append(node)
            with open(node.log_path, "ab") as f:
                f.write(f"---- test harness: starting {node.node_id} (together, "
                        f"join={node.join}) ----\n".encode())
            self._spawn(node)
            if node not in LIVE_NODES:
                LIVE_NODES.append(node)
        for node in nodes:
            wait_for(node._ready, timeout, interval=0.1,
                     message=lambda node=node: f"{node.node_id} ready\n{node.log_tail()}")
        self.wait_formed(timeout=timeout)  # with the nodes already running
        return time.monotonic() - t0

    def restart_together(self, nodes=None, timeout: float = 30.0) -> float:
        """Start ``nodes`` (default: all) again at once, without ``--join``: they find each
        other through the membership they stored."""
        nodes = list(nodes if nodes is not None else self.nodes)
        for node in nodes:
            if node.alive():
                node.stop()
            node.join = None
        return self.start_together(nodes, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            for client in node.clients:
                client.close()
            node.clients = []
        for node in self.nodes:
            node.stop()
            if node in LIVE_NODES:
                LIVE_NODES.remove(node)


@pytest.fixture
def cluster_factory(tmp_path):
    """Factory: ``cluster_factory(n=3, id_prefix="", **node_options)`` -> a formed Cluster
    of n nodes (n=0: nothing started, add nodes yourself). Stopped after the test."""
    made = []

    def make(n: int = 3, id_prefix: str = "", **options) -> Cluster:
        workdir = tmp_path / f"c{len(made)}"
        workdir.mkdir(parents=True, exist_ok=True)
        c = Cluster(workdir, id_prefix=id_prefix, **options)
        made.append(c)
        if n:
            c.start(n)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def cluster(cluster_factory) -> Cluster:
    """A fresh, formed 3-node cluster with default settings."""
    return cluster_factory(3)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A 3-node cluster shared by the tests of one module (each test uses its own
    ClientIDs and topics and must leave the membership as it found it)."""
    c = Cluster(tmp_path_factory.mktemp("shared-cluster"))
    try:
        c.start(3)
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


