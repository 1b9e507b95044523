"""Issue 5, parts 1 to 3 in a cluster: readiness (/readyz), the admin API's cluster part
(sessions with owner and epoch, a kick forwarded to the client's node, nodes) and the
cluster's metrics, on real node processes."""

from __future__ import annotations

import time
import urllib.request
from urllib.parse import quote

import pytest

from support import Disconnect, Prop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def scrape(node) -> dict:
    """{(sample name, frozenset(labels without node)): value}; every family parsed by
    prometheus_client and labelled with the node's id."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(node.admin_url + "/metrics", timeout=3) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, f"{fam.name} has no HELP"
        for s in fam.samples:
            assert s.labels.get("node") == node.node_id, s
            out[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "node"))] = \
                s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, frozenset(labels.items()))]


def test_every_node_is_ready_and_lists_the_nodes(shared_cluster):
    for node in shared_cluster.nodes:
        assert node.api("/readyz") == (200, {"status": "ready", "node_id": node.node_id})
        status, body = node.api("/api/v1/nodes")
        assert status == 200, body
        assert sorted(n["id"] for n in body["items"]) == ["n1", "n2", "n3"]
        assert {n["status"] for n in body["items"]} == {"up"}
        assert sum(n["role"] == "leader" for n in body["items"]) == 1


def test_session_show_names_owner_epoch_and_holder_from_any_node(shared_cluster):
    n1, n2, n3 = shared_cluster.nodes
    c = n2.raw(5)
    c.connect("adm-sess", properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    c.subscribe("adm/sess/#", 1)

    def views():
        return {n.node_id: n.api("/api/v1/sessions/adm-sess")[1] for n in (n1, n2, n3)}
    wait_for(lambda: all(v.get("owner") == "n2" and v.get("holder") == "n2"
                         for v in views().values()), 10,
             message=lambda: f"every node names n2 as owner and holder: {views()}")
    v = views()
    epochs = {x["epoch"] for x in v.values()}
    assert len(epochs) == 1 and isinstance(epochs.pop(), int)
    here = v["n2"]
    assert here["here"] is True and here["connected"] is True
    assert [s["filter"] for s in here["subscriptions"]] == ["adm/sess/#"]
    assert here["expiry_interval"] == 300
    assert v["n1"]["here"] is False and "subscriptions" not in v["n1"]
    status, body = n1.api("/api/v1/sessions/adm-none")
    assert status == 404 and "in the cluster" in body["error"], body


def test_kick_through_another_node_is_forwarded_to_the_clients_node(shared_cluster):
    n1, n2, n3 = shared_cluster.nodes
    c = n3.raw(5)
    c.connect("adm-kick", properties={Prop.SESSION_EXPIRY_INTERVAL: 60})
    wait_for(lambda: (n1.session_view("adm-kick") or {}).get("holder") == "n3", 10,
             message=lambda: f"n1 sees n3 hold adm-kick: {n1.session_view('adm-kick')}")
    status, body = n1.api("/api/v1/clients/adm-kick", method="DELETE")
    assert status == 200, body
    assert body == {"kicked": True, "client_id": "adm-kick", "node": "n3", "forwarded": True}
    got = c.wait_closed(5)
    assert any(isinstance(p, Disconnect) and p.reason_code == 0x98 for p in got), got
    # asked about it, a node that does not have it points at the one that does
    status, body = n1.api("/api/v1/clients/adm-kick")
    assert status == 404, body
    status, body = n1.api("/api/v1/clients/adm-kick", method="DELETE")
    assert status == 404 and "n3" in body["error"], body


def test_metrics_have_raft_and_takeover_families_and_count_a_takeover(shared_cluster):
    n1, n2, n3 = shared_cluster.nodes
    before = scrape(n2)
    for name in ("shoal_raft_term", "shoal_raft_commit_index", "shoal_raft_has_quorum",
                 "shoal_raft_is_leader"):
        assert (name, frozenset()) in before, name
    assert value(before, "shoal_raft_has_quorum") == 1
    assert value(before, "shoal_raft_leader_changes_total") >= 0  # counted once a second
    assert value(before, "shoal_cluster_nodes", status="up") == 3
    moved0 = value(before, "shoal_takeovers_total", result="moved")
    count0 = value(before, "shoal_takeover_duration_seconds_count")
    assert value(before, "shoal_takeover_duration_seconds_bucket", le="+Inf") == count0

    a = n1.raw(5)
    a.connect("adm-move", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    a.subscribe("adm/move", 1)
    a.disconnect()
    wait_for(lambda: (n2.session_view("adm-move") or {}).get("holder") == "n1", 10,
             message=lambda: f"n2 sees n1 hold adm-move: {n2.session_view('adm-move')}")
    b = n2.raw(5)
    ack = b.connect("adm-move", clean_start=False,
                    properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    assert ack.session_present, ack

    after = scrape(n2)
    assert value(after, "shoal_takeovers_total", result="moved") == moved0 + 1
    assert value(after, "shoal_takeover_duration_seconds_count") == count0 + 1
    assert value(after, "shoal_takeover_duration_seconds_bucket", le="10.0") == count0 + 1
    assert value(after, "shoal_takeover_duration_seconds_sum") > 0
    assert value(after, "shoal_raft_commit_index") > value(before, "shoal_raft_commit_index")


def test_a_leaving_node_reports_not_ready(cluster):
    n3 = cluster.node(3)
    assert n3.api("/readyz")[0] == 200
    status, body = n3.api("/api/v1/cluster/leave", method="POST", timeout=60)
    assert status == 200 and body["left"] is True, body
    status, body = n3.api("/readyz")
    assert status == 503, body
    assert body["status"] == "not ready" and "left the cluster" in body["reason"], body
    metrics = scrape(n3)
    assert value(metrics, "shoal_ready") == 0
    for node in (cluster.node(1), cluster.node(2)):
        assert node.api("/readyz")[0] == 200


def test_the_survivor_of_a_lost_quorum_reports_not_ready_within_seconds(cluster):
    survivor = cluster.node(1)
    assert survivor.api("/readyz")[0] == 200
    cluster.kill(2)
    cluster.kill(3)
    t0 = time.monotonic()
    last = {}

    def not_ready():
        last["answer"] = survivor.api("/readyz")
        return last["answer"][0] == 503
    wait_for(not_ready, 8.0, interval=0.1,
             message=lambda: f"the survivor to report not ready: {last.get('answer')}")
    took = time.monotonic() - t0
    status, body = last["answer"]
    assert "quorum" in body["reason"], body
    print(f"\nnot ready {took:.2f}s after the kills: {body['reason']}")
    # it still answers the rest of the API (health is not readiness)
    assert survivor.api("/healthz")[0] == 200
    status, _ = survivor.api("/api/v1/sessions/" + quote("x/y", safe=""))
    assert status == 404
