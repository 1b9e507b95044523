"""Issue 5, part 1: Shoal behind a real HAProxy (Debian's haproxy 2.6; .ci/run installs it).

* deploy/haproxy/haproxy.cfg is valid (``haproxy -c``) as shipped and with test ports.
* Three real nodes with ``proxy_protocol`` on, HAProxy started with that same file (ports
  through its environment variables), run in the foreground as a child of the test. A
  persistent subscriber (clean start 0, session expiry 300 s, QoS 1) disconnects and
  reconnects through HAProxy 30 times, landing on every node in turn (round robin), while
  a publisher publishes numbered QoS 1 messages through HAProxy the whole time. It never
  misses an acknowledged message (QoS 1 duplicates are allowed and counted), and the admin
  API of the node it is on shows its own address (its socket's local port: PROXY
  protocol), never HAProxy's.
* Draining: after ``shoal cluster leave`` on node 1, its GET /readyz answers 503, HAProxy
  marks it down, and new connections through HAProxy all land on nodes 2 and 3.

Where a client is: each node's ``GET /api/v1/clients/<id>`` (200 only where it is
connected). HAProxy's view: its stats socket (``show stat``)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest

from support import (REPO_ROOT, NumberedPublisher, PahoClient, http_json, poll_until,
                     probe_until_seen, unique_free_port, wait_for)

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
    None)
CONFIG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"

pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(300),
    pytest.mark.skipif(HAPROXY is None and not os.environ.get("CI"),
                       reason="haproxy is not installed (apt-get install haproxy; "
                              ".ci/run does it)"),
]

RECONNECTS = 30
EXPIRY = 300


class Balancer:
    """HAProxy with deploy/haproxy/haproxy.cfg in the foreground (``-db``), its ports
    filled in through the environment variables the file documents. Duck-types as a
    node for PahoClient (``host``, ``port``)."""

    def __init__(self, workdir: Path, nodes) -> None:
        assert HAPROXY is not None, "haproxy is not installed (CI installs it: .ci/run)"
        self.host = "127.0.0.1"
        self.port = unique_free_port()
        self.stats_port = unique_free_port()
        # a unix socket path must stay under 108 bytes: not below pytest's tmp_path
        self.sockdir = tempfile.mkdtemp(prefix="shoal-lb-")
        self.stats_socket = os.path.join(self.sockdir, "stats.sock")
        self.log_path = workdir / "haproxy.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        self.env.update(SHOAL_LB_HOST=self.host, SHOAL_LB_PORT=str(self.port),
                        SHOAL_LB_STATS_PORT=str(self.stats_port),
                        SHOAL_LB_STATS_SOCKET=self.stats_socket)
        for i, node in enumerate(nodes, 1):
            self.env[f"SHOAL_NODE{i}_HOST"] = node.host
            self.env[f"SHOAL_NODE{i}_MQTT"] = str(node.port)
            self.env[f"SHOAL_NODE{i}_ADMIN"] = str(node.admin_port)
        self.proc: subprocess.Popen | None = None
        self.clients: list = []

    def check_config(self) -> subprocess.CompletedProcess:
        return subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def start(self) -> "Balancer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._listening, 10.0, interval=0.05,
                 message=lambda: f"haproxy to listen on {self.port}\n{self.log_tail()}")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
        return os.path.exists(self.stats_socket) and bool(self.servers())

    def command(self, line: str) -> str:
        """One command on HAProxy's stats socket (its CLI); the answer's text."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3.0)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            for _ in range(10_000):  # HAProxy closes after one answer
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, "UP 1/2"...) in the MQTT backend."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows
                if r.get("pxname") == "shoal_mqtt" and r["svname"] not in ("FRONTEND",
                                                                          "BACKEND")}

    def wait_status(self, want: dict[str, str], timeout: float = 15.0) -> None:
        last = {}

        def matches():
            last.update(self.servers())
            return all(last.get(name) == status for name, status in want.items())
        wait_for(matches, timeout, interval=0.1,
                 message=lambda: f"haproxy to show {want}: {last}\n{self.log_tail()}")

    def paho(self, client_id: str, **kw) -> PahoClient:
        client = PahoClient(self, client_id, 5, connect=False, **kw)
        self.clients.append(client)
        return client

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no haproxy log)"

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def balancer_factory(tmp_path):
    made = []

    def make(nodes, start: bool = True) -> Balancer:
        lb = Balancer(tmp_path, nodes)
        made.append(lb)
        return lb.start() if start else lb

    yield make
    for lb in made:
        lb.stop()


def where(cluster, client_id: str) -> dict[str, dict]:
    """node_id -> GET /api/v1/clients/<id> of the nodes where ``client_id`` is connected."""
    found = {}
    for node in cluster.running():
        status, body = http_json("GET", f"{node.admin_url}/api/v1/clients/{client_id}")
        if status == 200:
            found[node.node_id] = body
    return found


def local_address(client: PahoClient) -> str:
    host, port = client.client.socket().getsockname()[:2]
    return f"{host}:{port}"


def test_shipped_config_is_valid(tmp_path):
    if HAPROXY is None:
        pytest.fail("haproxy is not installed: CI installs it with .ci/run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_LB_STATS_SOCKET"] = str(tmp_path / "s.sock")
    as_shipped = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env,
                                capture_output=True, text=True, timeout=30)
    assert as_shipped.returncode == 0, as_shipped.stdout + as_shipped.stderr
    text = CONFIG.read_text()
    for needed in ("balance roundrobin", "send-proxy-v2", "option httpchk GET /readyz",
                   "http-check expect status 200", "mode tcp"):
        assert needed in text, f"deploy/haproxy/haproxy.cfg lost {needed!r}"


def test_persistent_subscriber_reconnects_30_times_through_haproxy(cluster_factory,
                                                                   balancer_factory):
    cluster = cluster_factory(3, proxy_protocol=True)
    nodes = [cluster.node(i) for i in (1, 2, 3)]
    lb = balancer_factory(nodes, start=False)
    checked = lb.check_config()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lb.start()
    lb.wait_status({"node1": "UP", "node2": "UP", "node3": "UP"})

    t = uuid.uuid4().hex[:8]
    cid = f"lb-sub-{t}"
    topic = f"lb/{t}/m"
    sub = lb.paho(cid, clean=True, session_expiry=EXPIRY)
    sub.connect()
    sub.subscribe(f"lb/{t}/#", qos=1)
    pub = lb.paho(f"lb-pub-{t}")
    pub.connect()
    # the subscription's route is known on the publisher's node before counting starts
    probe_until_seen(lambda m: pub.publish(f"lb/{t}/probe", m, qos=0),
                     lambda m: m in sub.payloads(f"lb/{t}/probe"),
                     what="the subscriber's route on the publisher's node")

    publisher = NumberedPublisher(pub, topic, pace=0.005).start()  # ~150 msg/s
    acked, errors = publisher.acked, publisher.errors

    landed: list[str] = []
    try:
        for i in range(RECONNECTS):
            if i:
                present = sub.connect(clean=False)
                assert present, f"reconnect {i}: session present = 0 (the session was lost)"
            me = local_address(sub)
            found = wait_for(lambda: where(cluster, cid), 5.0,
                             message=f"a node listing {cid} (reconnect {i})")
            assert len(found) == 1, f"{cid} connected on several nodes: {found}"
            (node_id, view), = found.items()
            landed.append(node_id)
            assert view["peer"] == me, (
                f"reconnect {i}: {node_id} shows peer {view['peer']}, the client is {me} "
                f"(PROXY protocol address not used)")
            # it receives a message published after it connected here, then leaves
            after = len(acked)
            wait_for(lambda: errors or any(int(p) >= after for p in sub.payloads(topic)[-50:]),
                     10.0,
                     message=f"a message on {node_id} after reconnect {i}")
            assert not errors, f"publisher failed: {errors[0]!r}"
            sub.disconnect()
    finally:
        publisher.stop()
    assert not errors, f"publisher failed: {errors[0]!r}"

    # the last of it: reconnect once more and collect everything acknowledged
    assert sub.connect(clean=False), "final reconnect: session present = 0"
    want = set(acked)
    assert len(want) > 100, f"only {len(want)} messages published"

    def received() -> Counter:
        return Counter(int(p) for p in sub.payloads(topic))
    wait_for(lambda: want <= set(received()), 30.0,
             message=lambda: f"every acknowledged message; missing "
                             f"{sorted(want - set(received()))[:20]}")
    counts = received()
    missing = sorted(want - set(counts))
    duplicates = {k: n for k, n in counts.items() if n > 1}
    print(f"published {len(want)} (acknowledged), received {sum(counts.values())}, "
          f"duplicates {len(duplicates)}, nodes {Counter(landed)}")
    assert not missing, f"missed {len(missing)} acknowledged messages: {missing[:20]}"
    assert set(counts) <= want | {max(want) + 1}, "received messages never published"

    # round robin: every node served the subscriber, and consecutive connections moved
    assert set(landed) == {"n1", "n2", "n3"}, f"landed on {Counter(landed)} only"
    moves = sum(1 for a, b in zip(landed, landed[1:]) if a != b)
    assert moves >= RECONNECTS // 2, f"only {moves} moves between nodes: {landed}"


def test_leaving_node_is_drained(cluster_factory, balancer_factory):
    cluster = cluster_factory(3, proxy_protocol=True)
    n1 = cluster.node(1)
    lb = balancer_factory([cluster.node(i) for i in (1, 2, 3)])
    lb.wait_status({"node1": "UP", "node2": "UP", "node3": "UP"})
    t = uuid.uuid4().hex[:8]

    # one client on node 1 before it leaves: it is sent away and reconnects elsewhere
    before = []
    for k in range(3):
        c = lb.paho(f"lb-before-{t}-{k}", clean=False, session_expiry=EXPIRY)
        c.connect()
        before.append(c)
    on_n1 = [c for c in before if "n1" in where(cluster, c.client._client_id.decode())]
    assert on_n1, "round robin put none of 3 clients on node 1"

    # `shoal cluster leave` is this POST; it returns once n1's sessions moved (or 30 s)
    left: dict = {}
    leaving = threading.Thread(
        target=lambda: left.update(answer=n1.api("/api/v1/cluster/leave", method="POST",
                                                 timeout=60.0)), daemon=True)
    leaving.start()
    wait_for(lambda: n1.api("/readyz")[0] == 503, 10.0, message="n1's /readyz to say 503")
    status, body = n1.api("/readyz")
    assert "leaving" in body.get("reason", ""), body
    lb.wait_status({"node1": "DOWN", "node2": "UP", "node3": "UP"})
    for c in on_n1:
        wait_for(lambda: not c.is_connected(), 10.0, message="node 1 to send its client away")

    # its clients come back through HAProxy, on the other nodes, with their sessions
    for c in on_n1:
        assert c.connect(clean=False), "session lost when its node left"
        cid = c.client._client_id.decode()
        assert set(wait_for(lambda: where(cluster, cid), 5.0, message=cid)) <= {"n2", "n3"}
    leaving.join(60.0)
    assert not leaving.is_alive(), "POST /api/v1/cluster/leave did not answer"
    status, body = left["answer"]
    assert status == 200 and body.get("sessions_not_moved") == 0, (status, body)
    for k in range(10):
        cid = f"lb-after-{t}-{k}"
        c = lb.paho(cid)
        c.connect()
        found = wait_for(lambda: where(cluster, cid), 5.0, message=f"where {cid} is")
        assert set(found) <= {"n2", "n3"}, f"{cid} landed on {sorted(found)} after n1 left"
        c.disconnect()
    assert poll_until(lambda: n1.alive(), 1.0), "node 1 stopped; leaving should keep it up"
