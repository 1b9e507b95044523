"""Issue 5, part 2 and 3 on a node alone: the admin API (clients, kick, sessions,
subscriptions, retained, nodes, /readyz, /metrics) and the operator CLI, against a real
node process with real MQTT clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from support import (REPO_ROOT, Disconnect, Prop, Publish, free_port, http_json, wait_for)

pytestmark = [pytest.mark.timeout(60), pytest.mark.shoal_only("Shoal's admin API")]


def get(node, path: str, **query):
    url = f"http://{node.host}:{node.admin_port}{path}"
    if query:
        url += "?" + urlencode(query)
    return http_json("GET", url)


def call(node, method: str, path: str):
    return http_json(method, f"http://{node.host}:{node.admin_port}{path}")


def ok(node, path: str, **query):
    status, body = get(node, path, **query)
    assert status == 200, f"GET {path} {query} -> {status} {body!r}"
    return body


def all_pages(node, path: str, limit: int, **query) -> tuple[list, int]:
    """Follow ``next`` until it is null; (items, pages). Bounded by the total."""
    items, after, pages = [], None, 0
    while True:
        q = dict(query, limit=limit)
        if after is not None:
            q["after"] = after
        page = ok(node, path, **q)
        pages += 1
        items += page["items"]
        assert pages <= page["total"] // limit + 2, f"paging does not end: {page}"
        after = page["next"]
        if after is None:
            return items, pages


# -- clients, paging, kick -----------------------------------------------------------------

def test_clients_list_pages_through_25_clients_sorted_by_client_id(node):
    ids = [f"pg-{i:02d}" for i in range(25)]
    for cid in reversed(ids):  # connect out of order: the API sorts
        node.raw(5 if int(cid[-2:]) % 2 else 4).connect(cid)
    wait_for(lambda: ok(node, "/api/v1/clients")["total"] == 25, 5,
             message=lambda: f"25 clients listed: {ok(node, '/api/v1/clients')}")

    first = ok(node, "/api/v1/clients", limit=10)
    assert first["total"] == 25 and len(first["items"]) == 10
    assert [c["client_id"] for c in first["items"]] == ids[:10]
    assert first["next"] == ids[9]
    row = first["items"][1]  # pg-01: MQTT 5.0
    assert row["protocol"] == "5.0" and row["peer"].startswith("127.0.0.1:")
    assert row["keep_alive_s"] == 60
    assert first["items"][0]["protocol"] == "3.1.1"

    items, pages = all_pages(node, "/api/v1/clients", 10)
    assert [c["client_id"] for c in items] == ids and pages == 3

    sessions, _ = all_pages(node, "/api/v1/sessions", 7)
    assert [s["client_id"] for s in sessions] == ids
    assert all(s["connected"] and s["state"] == "online" for s in sessions)


def test_paging_parameters_are_checked(node):
    for bad in ("0", "1001", "ten"):
        status, body = get(node, "/api/v1/clients", limit=bad)
        assert status == 400 and "limit" in body["error"], (bad, status, body)
    status, body = get(node, "/api/v1/subscriptions", after="not a cursor!")
    assert status == 400 and "cursor" in body["error"], body


def test_kick_v5_client_gets_disconnect_0x98_and_keeps_its_session(node):
    c = node.raw(5)
    c.connect("kick-me", clean_start=True, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    c.subscribe("kick/t", 1)
    status, body = call(node, "DELETE", "/api/v1/clients/kick-me")
    assert status == 200, body
    assert body == {"kicked": True, "client_id": "kick-me", "node": "t1"}
    got = c.wait_closed(5)
    assert any(isinstance(p, Disconnect) and p.reason_code == 0x98 for p in got), got
    # the session stays (expiry 300), offline, with its subscription
    view = ok(node, "/api/v1/sessions/kick-me")
    assert view["connected"] is False and view["state"] == "offline"
    assert [s["filter"] for s in view["subscriptions"]] == ["kick/t"]
    # nothing left to kick
    status, body = call(node, "DELETE", "/api/v1/clients/kick-me")
    assert status == 404 and "kick" in body["error"], body


def test_kick_311_client_is_closed_through_the_post_form(node):
    c = node.raw(4)
    c.connect("kick-311")
    status, body = call(node, "POST", "/api/v1/clients/kick-311/kick")
    assert status == 200 and body["kicked"] is True, body
    assert c.wait_closed(5) == []  # 3.1.1 has no server DISCONNECT: just closed
    wait_for(lambda: ok(node, "/api/v1/clients")["total"] == 0, 5, message="no clients")


# -- sessions, subscriptions, retained -------------------------------------------------------

def test_session_show_names_subscriptions_with_options_queue_inflight_expiry_will(node):
    sub = node.raw(5)
    sub.connect("sess-1", properties={Prop.SESSION_EXPIRY_INTERVAL: 600},
                will_topic="sess/will", will_payload=b"bye", will_qos=1)
    sub.subscribe("sess/a/#", 1, sub_id=7, no_local=True)
    sub.subscribe("sess/b", 2, retain_as_published=True, retain_handling=1)
    pub = node.raw(5)
    pub.connect("sess-pub")
    pub.publish("sess/a/1", b"one", qos=1)  # sent, not acknowledged: inflight
    sub.await_packet(lambda p: isinstance(p, Publish), "the PUBLISH")
    view = ok(node, "/api/v1/sessions/sess-1")
    assert view["client_id"] == "sess-1" and view["here"] is True
    assert view["owner"] == "t1" and view["holder"] == "t1" and view["epoch"] >= 1
    assert view["connected"] is True and view["protocol"] == "5.0"
    assert view["expiry_interval"] == 600 and view["expires_at"] is None
    assert view["will"] is True and view["persistent"] is True
    assert view["inflight"] == 1 and view["queued"] == 0
    assert view["subscriptions"] == [
        {"filter": "sess/a/#", "qos": 1, "no_local": True, "retain_as_published": False,
         "retain_handling": 0, "subscription_id": 7, "share_group": None},
        {"filter": "sess/b", "qos": 2, "no_local": False, "retain_as_published": True,
         "retain_handling": 1, "subscription_id": None, "share_group": None}]

    sub.disconnect()  # normal DISCONNECT: no will, the session stays 600 s
    before = time.time()
    wait_for(lambda: ok(node, "/api/v1/sessions/sess-1")["connected"] is False, 5,
             message="the session offline")
    pub.publish("sess/b", b"two", qos=1)
    wait_for(lambda: ok(node, "/api/v1/sessions/sess-1")["queued"] == 1, 5,
             message=lambda: f"one queued: {ok(node, '/api/v1/sessions/sess-1')}")
    view = ok(node, "/api/v1/sessions/sess-1")
    assert view["inflight"] == 1 and view["will"] is False
    assert before + 590 < view["expires_at"] < time.time() + 601, view

    status, body = get(node, "/api/v1/sessions/no-such-client")
    assert status == 404 and "no session" in body["error"], body


def test_subscriptions_page_with_cursor_and_filter_by_client(node):
    a, b = node.raw(5), node.raw(5)
    a.connect("subs-a")
    b.connect("subs-b")
    for i in range(5):
        a.subscribe(f"subs/a/{i}", i % 3)
    b.subscribe("$share/g/subs/b", 1)
    items, pages = all_pages(node, "/api/v1/subscriptions", 2)
    assert pages == 3
    assert [(s["client_id"], s["filter"]) for s in items] == \
        [("subs-a", f"subs/a/{i}") for i in range(5)] + [("subs-b", "$share/g/subs/b")]
    assert [s["qos"] for s in items[:5]] == [0, 1, 2, 0, 1]
    assert items[5]["share_group"] == "g"
    only = ok(node, "/api/v1/subscriptions", client_id="subs-b")
    assert only["total"] == 1 and only["items"][0]["filter"] == "$share/g/subs/b"


def test_retained_lists_topic_qos_size_and_preview(node):
    pub = node.raw(5)
    pub.connect("ret-pub")
    pub.publish("ret/b", b"x" * 100, qos=1, retain=True)
    pub.publish("ret/a", "héllo".encode(), qos=0, retain=True)
    pub.publish("ret/c", b"\xff\xfe", qos=2, retain=True)
    wait_for(lambda: ok(node, "/api/v1/retained")["total"] == 3, 5, message="3 retained")
    page = ok(node, "/api/v1/retained", limit=2)
    assert [r["topic"] for r in page["items"]] == ["ret/a", "ret/b"] and page["next"] == "ret/b"
    a, b = page["items"]
    assert a["payload_bytes"] == 6 and a["payload_preview"] == "héllo" and a["qos"] == 0
    assert b["payload_bytes"] == 100 and b["payload_preview"] == "x" * 64 and b["qos"] == 1
    rest = ok(node, "/api/v1/retained", limit=2, after=page["next"])
    assert [r["topic"] for r in rest["items"]] == ["ret/c"] and rest["next"] is None
    assert rest["items"][0]["payload_bytes"] == 2


# -- nodes, readiness, errors ---------------------------------------------------------------

def test_nodes_readyz_and_json_errors_on_a_node_alone(node):
    nodes = ok(node, "/api/v1/nodes")["items"]
    assert len(nodes) == 1
    me = nodes[0]
    assert me["id"] == "t1" and me["role"] == "standalone" and me["status"] == "up"
    assert me["addresses"]["mqtt"] == f"127.0.0.1:{node.port}"

    assert get(node, "/readyz") == (200, {"status": "ready", "node_id": "t1"})

    status, body = get(node, "/api/v1/cluster")
    assert status == 404 and "alone" in body["error"], body
    status, body = get(node, "/api/v1/no-such-thing")
    assert status == 404 and "README" in body["error"], body
    status, body = call(node, "POST", "/api/v1/sessions")
    assert status == 405 and "GET" in body["error"], body


# -- metrics ------------------------------------------------------------------------------------

def scrape(node) -> dict:
    """{family name: {(sample name, frozenset(labels)): value}} via prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    url = f"http://{node.host}:{node.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=3) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, f"{fam.name} has no HELP"
        samples = {}
        for s in fam.samples:
            assert s.labels.get("node") == "t1", s
            samples[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "node"))] = \
                s.value
        out[fam.name] = (fam.type, samples)
    return out


def sample(metrics, family, name=None, **labels) -> float:
    typ, samples = metrics[family]
    return samples[(name or family, frozenset(labels.items()))]


def test_metrics_parse_with_prometheus_client_and_count_traffic_by_qos(node):
    m0 = scrape(node)
    for family, typ in [("shoal_ready", "gauge"), ("shoal_connections", "gauge"),
                        ("shoal_sessions", "gauge"), ("shoal_messages_received", "counter"),
                        ("shoal_messages_sent", "counter"), ("shoal_messages_dropped", "counter"),
                        ("shoal_queued_messages", "gauge"),
                        ("shoal_session_queue_length", "histogram"),
                        ("shoal_store_bytes", "gauge"), ("shoal_store_fsyncs", "counter")]:
        assert family in m0, f"{family} missing: {sorted(m0)}"
        assert m0[family][0] == typ, (family, m0[family][0])
    assert sample(m0, "shoal_ready") == 1
    for qos in "012":
        assert sample(m0, "shoal_messages_received", "shoal_messages_received_total",
                      qos=qos) == 0

    sub = node.raw(5)
    sub.connect("met-sub", properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    sub.subscribe("met/#", 2)
    pub = node.raw(5)
    pub.connect("met-pub")
    pub.publish("met/0", b"a", qos=0)
    for _ in range(2):
        pub.publish("met/1", b"b", qos=1)
    for _ in range(3):
        pub.publish("met/2", b"c", qos=2)
    got = [sub.await_packet(lambda p: isinstance(p, Publish), "a PUBLISH") for _ in range(6)]
    assert sorted(p.qos for p in got) == [0, 1, 1, 2, 2, 2]

    m1 = scrape(node)
    received = {q: sample(m1, "shoal_messages_received", "shoal_messages_received_total", qos=q)
                for q in "012"}
    sent = {q: sample(m1, "shoal_messages_sent", "shoal_messages_sent_total", qos=q)
            for q in "012"}
    assert received == {"0": 1, "1": 2, "2": 3}, received
    assert sent == {"0": 1, "1": 2, "2": 3}, sent
    assert sample(m1, "shoal_connections") == 2 and sample(m1, "shoal_sessions") == 2
    assert sample(m1, "shoal_inflight_messages") == 5  # QoS 1/2 never acknowledged
    assert sample(m1, "shoal_store_bytes", kind="on_disk") > 0
    assert sample(m1, "shoal_session_queue_length", "shoal_session_queue_length_count") == 2

    sub.close()  # offline now: the next messages queue
    wait_for(lambda: sample(scrape(node), "shoal_sessions_connected") == 1, 5,
             message="one session connected")
    for _ in range(4):
        pub.publish("met/1", b"q", qos=1)
    m2 = scrape(node)
    assert sample(m2, "shoal_queued_messages") == 4
    assert sample(m2, "shoal_session_queue_length", "shoal_session_queue_length_bucket",
                  le="1.0") == 1  # met-pub: empty queue; met-sub: 4, in the le=10 bucket
    assert sample(m2, "shoal_session_queue_length", "shoal_session_queue_length_bucket",
                  le="10.0") == 2


# -- the operator CLI as real processes ----------------------------------------------------

def shoal(*args: str, admin: str | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("shoal")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cluster"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if admin is not None:
        args = args + ("--admin", admin)
    return subprocess.run(cmd + list(args), cwd=str(REPO_ROOT), env=env,
                          capture_output=True, text=True, timeout=30)


def test_cli_clients_list_sessions_show_and_kick(node):
    admin = f"http://127.0.0.1:{node.admin_port}"
    c5 = node.raw(5)
    c5.connect("cli/one", properties={Prop.SESSION_EXPIRY_INTERVAL: 60})
    c5.subscribe("cli/t", 1, sub_id=3)
    node.raw(4).connect("cli-two")

    r = shoal("clients", "list", admin=admin)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["CLIENT", "ID", "PEER"]
    rows = [ln.split() for ln in lines[1:3]]
    assert [row[0] for row in rows] == ["cli-two", "cli/one"]  # sorted by ClientID
    assert rows[0][2] == "3.1.1" and rows[1][2] == "5.0"
    assert "2 of 2 clients" in lines[3]

    r = shoal("clients", "list", "--limit", "1", admin=admin)
    assert r.returncode == 0 and "--after cli-two" in r.stdout, r.stdout

    r = shoal("sessions", "show", "cli/one", admin=admin)
    assert r.returncode == 0, r.stderr
    assert "owner" in r.stdout and "t1" in r.stdout and "expiry" in r.stdout, r.stdout
    assert "cli/t  (qos 1, id 3)" in r.stdout, r.stdout

    r = shoal("kick", "cli/one", admin=admin)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kicked cli/one on t1"
    got = c5.wait_closed(5)
    assert any(isinstance(p, Disconnect) and p.reason_code == 0x98 for p in got), got

    r = shoal("kick", "cli/one", admin=admin)
    assert r.returncode == 1 and "nothing to kick" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_says_what_to_do_when_the_node_is_unreachable(tmp_path):
    port = free_port()
    for args in (("clients", "list"), ("sessions", "show", "x"), ("kick", "x")):
        r = shoal(*args, admin=f"http://127.0.0.1:{port}")
        assert r.returncode == 1, (args, r)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"127.0.0.1:{port}" in err and "--admin" in err, err
    # the default (no --admin) comes from SHOAL_ADMIN
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update(PYTHONPATH=str(REPO_ROOT), SHOAL_ADMIN=f"http://127.0.0.1:{port}")
    r = subprocess.run([sys.executable, "-m", "cluster", "clients", "list"], cwd=str(REPO_ROOT),
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr, r.stderr


def test_client_ids_with_slashes_and_spaces_work_in_urls(node):
    node.raw(5).connect("a b/c")
    view = ok(node, "/api/v1/sessions/" + quote("a b/c", safe=""))
    assert view["client_id"] == "a b/c"
    status, body = call(node, "DELETE", "/api/v1/clients/" + quote("a b/c", safe=""))
    assert status == 200 and body["client_id"] == "a b/c", body
