"""The admin API's token (`admin_token`) and its cross-origin rule, on a real cluster node:
every route of the table, the node's and the cluster's, is walked, so that a new endpoint
cannot be left open by mistake; the CLI sends SHOAL_ADMIN_TOKEN."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import REPO_ROOT, http_json

TOKEN = "test-admin-token-0123456789"


def _route_table() -> list[tuple[str, str]]:
    """(method, path) of every route the admin API of a cluster node serves, from the same
    functions that build it (node/admin.py, cluster/main.py), placeholders filled in."""
    from cluster.main import add_admin_routes
    from node.admin import make_admin_app
    from node.broker import Broker
    from node.config import Config

    app = make_admin_app(Broker(Config()), TOKEN)
    add_admin_routes(app, None)  # (routes only: nothing is served from this app)
    routes = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        routes.append((route.method, re.sub(r"\{[^}]+\}", "nobody-here", path)))
    assert len(routes) >= 15, routes
    return routes


OPEN = {"/healthz", "/readyz", "/metrics", "/", "/dashboard"}


def test_every_route_but_the_probes_needs_the_token(cluster_factory):
    c = cluster_factory(1, admin_token=TOKEN)
    node = c.nodes[0]
    base = node.admin_url
    checked = 0
    for method, path in _route_table():
        if path == "/api/v1/cluster/leave":
            continue  # (with the token it would take the node out; checked without below)
        status, body = http_json(method, base + path)
        if path in OPEN:
            assert status != 401, (method, path, status, body)
            continue
        assert status == 401, f"{method} {path} answered {status} without the token: {body}"
        assert "token" in body["error"], body
        status, _ = http_json(method, base + path, headers={"Authorization": "Bearer wrong"})
        assert status == 401, (method, path, status)
        status, body = http_json(method, base + path,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
        assert status not in (401, 403), (method, path, status, body)
        checked += 1
    assert checked >= 10
    status, body = http_json("POST", base + "/api/v1/cluster/leave")
    assert status == 401, body
    # still a member: nothing was done without the token
    status, view = node.api("/api/v1/cluster")
    assert status == 200 and [n["id"] for n in view["nodes"]] == [node.node_id], view


def test_a_cross_origin_post_is_refused_even_with_the_token(cluster_factory):
    c = cluster_factory(1, admin_token=TOKEN)
    node = c.nodes[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    kick = node.admin_url + "/api/v1/clients/dev-1/kick"
    status, body = http_json("POST", kick, headers={**auth, "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in body["error"], (status, body)
    # the dashboard's own origin (the node's address) goes through (no such client: 404)
    status, body = http_json("POST", kick, headers={**auth, "Origin": node.admin_url})
    assert status == 404, (status, body)
    # a page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own Host: an
    # API bound to loopback answers only its loopback names (the probes stay open)
    port = node.admin_port
    status, body = http_json("GET", node.admin_url + "/api/v1/sessions",
                             headers={**auth, "Host": f"evil.example:{port}"})
    assert status == 403 and "Host" in body["error"], (status, body)
    status, _ = http_json("GET", node.admin_url + "/healthz",
                          headers={"Host": f"evil.example:{port}"})
    assert status == 200


def test_the_cli_sends_shoal_admin_token(cluster_factory):
    c = cluster_factory(1, admin_token=TOKEN)
    node = c.nodes[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "cluster", "cluster", "status", "--admin", node.admin_url]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "token" in refused.stderr + refused.stdout, refused
    env["SHOAL_ADMIN_TOKEN"] = TOKEN
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert node.node_id in ok.stdout


def test_a_short_token_is_refused_at_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "cluster", "run", "--admin-token", "short",
                           "--data-dir", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2, proc
    assert "admin_token" in proc.stderr and "16" in proc.stderr, proc.stderr

