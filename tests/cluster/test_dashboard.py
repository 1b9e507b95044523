"""The dashboard (GET / of the admin port) in a real browser: headless Chromium.

Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it) loads the page from a
node of a real 3-node cluster, runs its JavaScript (``--virtual-time-budget`` lets the page
poll the admin API before the DOM is dumped) and ``--dump-dom`` prints the DOM, on which
the assertions run. A screenshot goes to a temporary directory outside the repository;
its path is printed. No Playwright or Puppeteer: only Chromium's own command line.

Cases the cluster does not produce on demand (a ghost Raft voter, a node that has left) are
rendered from canned ``/api/v1/cluster`` answers of a small aiohttp app that serves the page
with the real ``node.dashboard`` routes (no cluster processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from html.parser import HTMLParser

import pytest

from support import REPO_ROOT, unique_free_port, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# skipped only outside CI (tests/system-packages.sh installs it; under CI it must be there)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="headless Chromium not installed (apt-get install chromium)")

# Root in a container: no sandbox; no Google services, updates or QUIC (no network here).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium(*args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium with a fresh profile; return its stdout."""
    with tempfile.TemporaryDirectory(prefix="shoal-chromium-") as profile:
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium {' '.join(args)} did not finish in {timeout:.0f} s")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err.decode()[-2000:]}"
    return out.decode()


def dump_dom(url: str, budget_ms: int = 5000) -> str:
    return chromium(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)


class Dom(HTMLParser):
    """The bits of the dumped page the tests look at: every element's attributes (by id and
    the node rows by data-node-id) and the text under each element with an id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.by_id: dict[str, dict] = {}
        self.text: dict[str, str] = {}
        self.body: dict = {}
        self.row_text: dict[str, str] = {}
        self._open: list[tuple[str, str | None, str | None]] = []  # (tag, id, node id)
        self.feed(html)

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text.setdefault(a["id"], "")
        if "data-node-id" in a:
            self.rows[a["data-node-id"]] = a
            self.row_text.setdefault(a["data-node-id"], "")
        if tag not in self.VOID:
            self._open.append((tag, a.get("id"), a.get("data-node-id")))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for _, el_id, node_id in self._open:
            if el_id:
                self.text[el_id] += data
            if node_id:
                self.row_text[node_id] += data


def fetch(url: str) -> tuple[int, dict, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, dict(resp.headers), resp.read().decode()


@needs_chromium
def test_dashboard_renders_the_cluster_and_shows_a_killed_node_down(cluster, tmp_path_factory,
                                                                   capsys):
    n1 = cluster.node(1)
    url = n1.admin_url + "/"
    status, headers, page = fetch(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    # self-contained: nothing fetched from another origin
    assert "<script src" not in page and "<link" not in page and "https://" not in page
    assert "connect-src 'self'" in headers["Content-Security-Policy"]

    # some load to show: 3 clients on n1, 1 on n2, as the view reports them (peers' numbers
    # arrive by gossip)
    for i in range(3):
        n1.paho(f"dash-a{i}")
    cluster.node(2).paho("dash-b0")
    want = {n1.node_id: 3, cluster.node(2).node_id: 1, cluster.node(3).node_id: 0}
    wait_for(lambda: {x["id"]: x["connections"] for x in n1.cluster_view()["nodes"]} == want,
             15.0, interval=0.2, message="connections in n1's cluster view")
    view = cluster.wait_formed()[n1.node_id]
    ids = {n.node_id for n in cluster.nodes}
    dom = Dom(dump_dom(url))
    assert dom.body.get("data-state") == "ok", dom.text.get("error")
    assert set(dom.rows) == ids
    for node_id, row in dom.rows.items():
        assert row["data-status"] == "up", (node_id, row)
        assert row["data-role"] == ("leader" if node_id == view["leader"] else "follower")
        assert row["data-connections"] == str(want[node_id])
        assert row["data-voter"] == "yes", (node_id, row)  # the Voter column
    assert view["raft"]["voter_count"] == 3 and view["raft"]["ghost_voters"] == []
    # quorum is the Raft arithmetic: "yes — voters 3, reachable 3, needed 2"
    quorum = dom.text["quorum"].strip()
    assert quorum.startswith("yes"), quorum
    assert "voters 3" in quorum and "reachable 3" in quorum and "needed 2" in quorum, quorum
    assert dom.by_id["quorum"]["data-needed"] == "2"
    assert dom.by_id["warnings"].get("hidden") is not None  # no ghost, all members vote
    assert dom.by_id["phase"].get("hidden") is not None     # a member: no phase banner
    assert dom.by_id["leader"]["data-leader"] == view["leader"]
    assert dom.text["leader"].strip() == view["leader"]
    assert dom.text["cluster-name"].strip() == cluster.name
    assert dom.text["this-node"].strip() == n1.node_id
    assert dom.text["nodes-up"].strip() == "3 / 3"
    assert dom.text["term"].strip() == str(view["term"])
    for node in cluster.nodes:  # each row shows the node's MQTT address
        assert f"{node.host}:{node.port}" in dom.row_text[node.node_id]
    assert "(this page)" in dom.row_text[n1.node_id]
    assert "counters" in dom.by_id and "Messages in" in dom.text["counters"]
    assert dom.by_id["error"].get("hidden") is not None  # no error banner

    shot = tmp_path_factory.mktemp("dashboard") / "dashboard.png"
    chromium("--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1280,800", url)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\ndashboard screenshot: {shot}")

    # kill -9 a follower: the page, loaded again, shows it down (the view marks a peer
    # without a link down after 2 s) while the others stay up
    victim = next(n for n in cluster.nodes[::-1] if n.node_id != view["leader"]
                  and n is not n1)
    cluster.kill(cluster.nodes.index(victim) + 1)
    wait_for(lambda: {x["id"]: x["status"] for x in n1.cluster_view()["nodes"]}
             .get(victim.node_id) == "down", 15.0, interval=0.2,
             message=f"{victim.node_id} shown down by {n1.node_id}")
    dom = Dom(dump_dom(url))
    assert dom.body.get("data-state") == "ok", dom.text.get("error")
    assert dom.rows[victim.node_id]["data-status"] == "down"
    assert all(dom.rows[i]["data-status"] == "up" for i in ids - {victim.node_id})
    assert dom.text["nodes-up"].strip() == "2 / 3"
    # still a voter, but no longer reachable: 2 of 3 reachable, 2 needed, quorum kept
    assert dom.rows[victim.node_id]["data-voter"] == "yes"
    quorum = dom.text["quorum"].strip()
    assert quorum.startswith("yes") and "voters 3" in quorum and "reachable 2" in quorum \
        and "needed 2" in quorum, quorum
    shot_down = shot.with_name("dashboard-node-down.png")
    chromium("--virtual-time-budget=5000", f"--screenshot={shot_down}", "--window-size=1280,800",
             url)
    with capsys.disabled():
        print(f"dashboard screenshot, {victim.node_id} killed: {shot_down}")


@needs_chromium
def test_dashboard_of_a_single_node(tmp_path):
    """Without a cluster (/api/v1/cluster answers 404) the page shows this node alone."""
    admin, mqtt = unique_free_port(), unique_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster", "run", "--node-id", "solo",
                                 "--mqtt-port", str(mqtt), "--admin-port", str(admin),
                                 "--data-dir", str(tmp_path / "data")],
                                cwd=str(REPO_ROOT), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{admin}/"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "node.log").read_text())
            try:
                return fetch(url)[0] == 200
            except OSError:
                return False
        wait_for(up, 30.0, interval=0.1, message="the single node's admin port")
        dom = Dom(dump_dom(url))
        assert dom.body.get("data-state") == "ok", dom.text.get("error")
        assert list(dom.rows) == ["solo"]
        assert dom.rows["solo"]["data-status"] == "up"
        assert dom.rows["solo"]["data-role"] == "single node"
        assert "single node" in dom.text["cluster-name"]
        assert dom.text["nodes-up"].strip() == "1 / 1"
        assert dom.text["quorum"].strip() == "\u2013"   # no Raft without a cluster
        assert dom.rows["solo"]["data-voter"] == ""
        assert dom.by_id["error"].get("hidden") is not None
        assert dom.by_id["warnings"].get("hidden") is not None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@needs_chromium
def test_dashboard_error_banner_when_the_api_fails():
    """An admin API that does not answer properly: the banner says what failed."""
    from node.dashboard import dashboard_html

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                body, status, kind = dashboard_html().encode(), 200, "text/html"
            else:
                body, status, kind = b'{"error": "down"}', 503, "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dom = Dom(dump_dom(f"http://127.0.0.1:{server.server_address[1]}/", budget_ms=3000))
    finally:
        server.shutdown()
        server.server_close()
    assert dom.body.get("data-state") == "error"
    assert dom.by_id["error"].get("hidden") is None
    assert "Cannot reach the admin API" in dom.text["error"]
    assert "HTTP 503" in dom.text["error"]
    assert dom.rows == {}


# -- canned /api/v1/cluster answers ---------------------------------------------------------

STATS = {"node_id": "node1", "sessions": 2, "connections": 1, "subscriptions": 0,
         "messages_in": 10, "messages_out": 10, "uptime_s": 60.0}


def member(node_id: str, port: int, role: str = "follower", status: str = "up",
           voter: bool = True) -> dict:
    return {"id": node_id,
            "addresses": {"mqtt": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{port + 1}",
                          "transport": f"127.0.0.1:{port + 2}", "raft": f"127.0.0.1:{port + 3}"},
            "role": role, "status": status, "voter": voter, "sessions": 1, "connections": 1,
            "uptime_s": 60.0}


def cluster_answer(**changes) -> dict:
    view = {"cluster": "canned", "cluster_id": "c0ffee", "node_id": "node1",
            "phase": "member", "leader": "node1", "term": 7, "commit_index": 42,
            "has_quorum": True, "nodes": [], "takeovers": {}, "forwarded": 0,
            "forward_dropped_qos0": 0, "received": 0, "leader_changes": 1}
    view.update(changes)
    return view


@contextlib.contextmanager
def canned_admin(cluster: dict | None, stats: dict = STATS):
    """The dashboard served by ``node.dashboard``'s own routes on an aiohttp app whose
    ``/api/v1/cluster`` answers ``cluster`` (404 when None) and ``/api/v1/stats`` ``stats``;
    yields the page's URL. The app runs on an event loop of its own thread."""
    from aiohttp import web

    from node.dashboard import add_dashboard_routes

    async def api_cluster(request):
        if cluster is None:
            return web.json_response({"error": "this node runs without a cluster"}, status=404)
        return web.json_response(cluster)

    async def api_stats(request):
        return web.json_response(stats)

    app = web.Application()
    add_dashboard_routes(app)
    app.router.add_get("/api/v1/cluster", api_cluster)
    app.router.add_get("/api/v1/stats", api_stats)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@needs_chromium
def test_dashboard_flags_a_ghost_voter_and_a_member_that_does_not_vote():
    """The case the member-based "Quorum yes, 3/3" hid: 3 Raft voters, one of them a ghost
    (no member names it) and unreachable, a member down, a member that is no voter. The page
    counts the voters (ghost included): 1 of 3 reachable, 2 needed, no quorum."""
    ghost = "127.0.0.1:7006"
    view = cluster_answer(
        has_quorum=False,
        nodes=[member("node1", 7000, role="leader"), member("node2", 7010, status="down"),
               member("node3", 7020, voter=False)],
        raft={"voters": [
                  {"address": "127.0.0.1:7003", "node": "node1", "self": True,
                   "reachable": True, "member": True},
                  {"address": "127.0.0.1:7013", "node": "node2", "self": False,
                   "reachable": False, "member": True},
                  {"address": ghost, "node": None, "self": False, "reachable": False,
                   "member": False}],
              "voter_count": 3, "reachable": 1, "needed": 2, "has_quorum": False,
              "ghost_voters": [ghost], "members_not_voting": ["node3"]})
    with canned_admin(view) as url:
        status, headers, _ = fetch(url)
        assert status == 200 and "connect-src 'self'" in headers["Content-Security-Policy"]
        dom = Dom(dump_dom(url, budget_ms=3000))
    assert dom.body.get("data-state") == "ok", dom.text.get("error")
    assert dom.by_id["error"].get("hidden") is not None

    quorum = dom.text["quorum"].strip()
    assert quorum.startswith("NO"), quorum
    assert "voters 3" in quorum and "reachable 1" in quorum and "needed 2" in quorum, quorum
    assert dom.by_id["quorum"]["data-has-quorum"] == "no"
    assert dom.text["nodes-up"].strip() == "2 / 3"  # members only; the ghost is no node

    # members keep their rows, with the Voter column; the ghost gets a row of its own
    assert set(dom.rows) == {"node1", "node2", "node3", f"? {ghost}"}
    assert dom.rows["node1"]["data-voter"] == "yes"
    assert dom.rows["node2"]["data-voter"] == "yes"
    assert dom.rows["node3"]["data-voter"] == "no"
    row = dom.rows[f"? {ghost}"]
    assert row["data-status"] == "ghost" and row["data-voter"] == "yes"
    assert "ghost" in row["class"].split()
    assert f"? {ghost}" in dom.row_text[f"? {ghost}"]
    assert "ghost" in dom.row_text[f"? {ghost}"]
    assert "unreachable" in dom.row_text[f"? {ghost}"]

    # the warnings: the ghost (with the command that removes it), the member without a vote
    assert dom.by_id["warnings"].get("hidden") is None
    warnings = " ".join(dom.text["warnings"].split())
    assert (f"Raft voter {ghost} is no member (a ghost): it still counts in every majority; "
            f"remove it with shoal cluster forget {ghost}") in warnings, warnings
    assert "node3 is not a Raft voter" in warnings, warnings
    assert dom.by_id["phase"].get("hidden") is not None


@needs_chromium
def test_dashboard_of_a_node_that_has_left():
    """A node that has left: no leader, term or commit index any more (null), no voter set;
    the page says it has left instead of warning about every member."""
    view = cluster_answer(
        phase="left", leader=None, term=None, commit_index=None, has_quorum=False,
        nodes=[member("node1", 7000, voter=False, status="leaving"),
               member("node2", 7010, voter=False)],
        raft={"voters": [], "voter_count": 0, "reachable": 0, "needed": 0,
              "has_quorum": False, "ghost_voters": [],
              "members_not_voting": ["node1", "node2"]})
    with canned_admin(view) as url:
        dom = Dom(dump_dom(url, budget_ms=3000))
    assert dom.body.get("data-state") == "ok", dom.text.get("error")
    assert dom.by_id["phase"].get("hidden") is None
    assert "this node has left the cluster" in dom.text["phase"].lower()
    assert dom.by_id["warnings"].get("hidden") is not None
    for card in ("leader", "term", "commit", "quorum"):
        assert dom.text[card].strip() == "\u2013", (card, dom.text[card])
    assert set(dom.rows) == {"node1", "node2"}
    assert all(row["data-voter"] == "" for row in dom.rows.values())


@needs_chromium
def test_dashboard_quorum_without_a_raft_object():
    """An older node's view without "raft": the quorum falls back to its has_quorum."""
    view = cluster_answer(nodes=[member("node1", 7000, role="leader")])
    del view["phase"], view["cluster_id"]
    for n in view["nodes"]:
        del n["voter"]
    with canned_admin(view) as url:
        dom = Dom(dump_dom(url, budget_ms=3000))
    assert dom.body.get("data-state") == "ok", dom.text.get("error")
    assert dom.text["quorum"].strip() == "yes"
    assert dom.rows["node1"]["data-voter"] == ""
    assert dom.by_id["warnings"].get("hidden") is not None
    assert dom.by_id["phase"].get("hidden") is not None
