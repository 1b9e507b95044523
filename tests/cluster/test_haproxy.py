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

import os
import subprocess
import threading
import uuid
from collections import Counter

import pytest

from support import (HAPROXY, Balancer, NumberedPublisher, PahoClient, http_json,
                     poll_until, probe_until_seen, wait_for)
from support import HAPROXY_CONFIG as CONFIG


pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(300),
    pytest.mark.skipif(HAPROXY is None and not os.environ.get("CI"),
                       reason="haproxy is not installed (apt-get install haproxy; "
                              ".ci/run does it)"),
]

RECONNECTS = 30
EXPIRY = 300


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
