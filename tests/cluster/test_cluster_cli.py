"""Issue 3, acceptance 6 and 7: the operator commands as real processes.

* ``python -m cluster cluster up --nodes 3`` (the README's start command) prints each
  node's MQTT and admin address, the nodes form one cluster, and SIGINT (Ctrl-C) to the
  command stops all three node processes.
* ``python -m cluster cluster status --admin URL`` prints a table of the nodes and names
  the leader."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support import (REPO_ROOT, free_port_block, http_json, poll_until, shoal_cli,
                     wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def child_pids(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
        return True
    except OSError:
        return False


class OutputReader:
    """Collects a process's merged output on a thread (so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.thread.start()

    def _run(self, proc) -> None:
        for line in proc.stdout:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.lines)


def test_cluster_up_starts_three_nodes_and_sigint_stops_them(tmp_path):
    mqtt = free_port_block(3)
    admin = free_port_block(3)
    cport = free_port_block(6)
    cmd = [sys.executable, "-m", "cluster", "cluster", "up", "--nodes", "3",
           "--base-port", str(mqtt), "--admin-base-port", str(admin),
           "--cluster-base-port", str(cport), "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = OutputReader(proc)
    children: set[int] = set()
    try:
        mqtt_ports = {mqtt, mqtt + 1, mqtt + 2}
        admin_ports = {admin, admin + 1, admin + 2}

        def printed():
            text = out.text()
            if proc.poll() is not None:
                raise AssertionError(f"`cluster up` exited with {proc.returncode}:\n{text}")
            seen_mqtt = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}
            seen_admin = {int(p) for p in re.findall(r"https?://127\.0\.0\.1:(\d+)", text)}
            return mqtt_ports <= seen_mqtt and admin_ports <= seen_admin and \
                "cluster up" in text
        wait_for(printed, 60.0, interval=0.1,
                 message=lambda: f"3 MQTT and admin addresses printed:\n{out.text()}")
        children = child_pids(proc.pid)
        assert len(children) == 3, f"expected 3 node processes, children: {children}"

        # the nodes form one cluster with one leader
        def formed():
            views = []
            for port in sorted(admin_ports):
                try:
                    status, view = http_json("GET", f"http://127.0.0.1:{port}/api/v1/cluster")
                except OSError:
                    return False
                if status != 200:
                    return False
                views.append(view)
            leaders = {v["leader"] for v in views}
            return (len(leaders) == 1 and None not in leaders and all(
                len(v["nodes"]) == 3 and all(n["status"] == "up" for n in v["nodes"])
                for v in views))
        wait_for(formed, 30.0, interval=0.1, message="the 3 nodes to form a cluster")
        for port in mqtt_ports:
            assert listening(port), f"no MQTT listener on {port}"

        # Ctrl-C: SIGINT to the command stops every node
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30.0)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`cluster up` still running 30 s after SIGINT:\n{out.text()}")
        assert rc == 0, f"exit code {rc} after SIGINT:\n{out.text()}"
        assert poll_until(lambda: not any(pid_running(p) for p in children), 15.0), \
            f"node processes still running after SIGINT: " \
            f"{[p for p in children if pid_running(p)]}"
        assert not any(listening(p) for p in mqtt_ports | admin_ports)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in children:
            if pid_running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def run_status(node, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", "cluster", "status", "--admin",
                           node.admin_url, *extra], cwd=str(REPO_ROOT), env=clean_env(),
                          capture_output=True, text=True, timeout=30)


def test_cluster_status_prints_nodes_and_leader(cluster):
    leader = cluster.leader()
    result = run_status(cluster.node(2))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    print("\n" + text)
    lines = text.splitlines()
    assert re.search(rf"\bleader\b.*\b{leader.node_id}\b", text), \
        f"leader {leader.node_id} not named:\n{text}"
    for node in cluster.nodes:
        rows = [ln for ln in lines if re.match(rf"\s*{node.node_id}\b", ln)]
        assert len(rows) == 1, f"{node.node_id}: rows {rows}\n{text}"
        row = rows[0]
        assert f"127.0.0.1:{node.port}" in row, row
        assert re.search(r"\bup\b", row), row
        role = "leader" if node is leader else "follower"
        assert re.search(rf"\b{role}\b", row), f"{node.node_id} should be {role}: {row}"

    result = run_status(cluster.node(3), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["leader"] == leader.node_id
    assert sorted(n["id"] for n in data["nodes"]) == ["n1", "n2", "n3"]


def test_cluster_status_without_a_node_says_so(tmp_path):
    port = free_port_block(1)
    result = subprocess.run([sys.executable, "-m", "cluster", "cluster", "status", "--admin",
                             f"http://127.0.0.1:{port}"], cwd=str(REPO_ROOT), env=clean_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr, result.stderr


def status_rows(text: str) -> dict[str, str]:
    return {m.group(1): line for line in text.splitlines()
            if (m := re.match(r"\s*(n\d)\s", line))}


def test_cluster_status_shows_a_killed_node_down_within_seconds(cluster):
    leader = cluster.leader()
    survivors = [n for n in cluster.nodes if n is not leader]
    cluster.kill(cluster.nodes.index(leader) + 1)
    t0 = time.monotonic()
    last = {}

    def shown_down():
        r = shoal_cli("cluster", "status", "--admin", survivors[0].admin_url)
        last["out"] = r.stdout + r.stderr
        rows = status_rows(r.stdout)
        return r.returncode == 0 and len(rows) == 3 and \
            re.search(r"\bdown\b", rows[leader.node_id]) and \
            all(re.search(r"\bup\b", rows[n.node_id]) for n in survivors)
    wait_for(shown_down, 10.0, interval=0.2,
             message=lambda: f"{leader.node_id} shown down:\n{last.get('out')}")
    took = time.monotonic() - t0
    print(f"\n{leader.node_id} (the leader) shown down {took:.1f}s after kill -9:\n{last['out']}")

    # and a new leader among the survivors is named
    def new_leader():
        r = shoal_cli("cluster", "status", "--admin", survivors[1].admin_url)
        last["out"] = r.stdout
        m = re.search(r"\bleader (\S+)", r.stdout)
        return m is not None and m.group(1) in {n.node_id for n in survivors}
    wait_for(new_leader, 15.0, interval=0.2,
             message=lambda: f"a survivor named leader:\n{last.get('out')}")


def test_sessions_show_and_kick_through_another_node(cluster):
    n1, n2, n3 = cluster.nodes
    from support import Disconnect, Prop
    c = n3.raw(5)
    c.connect("cli-kick", properties={Prop.SESSION_EXPIRY_INTERVAL: 120})
    c.subscribe("cli/kick/#", 1)
    wait_for(lambda: (n1.session_view("cli-kick") or {}).get("holder") == "n3", 10,
             message=lambda: f"n1 sees n3 hold cli-kick: {n1.session_view('cli-kick')}")

    r = shoal_cli("sessions", "show", "cli-kick", "--admin", n1.admin_url)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^owner\s+n3$", r.stdout, re.M), r.stdout
    assert re.search(r"^holder\s+n3$", r.stdout, re.M), r.stdout
    assert re.search(r"^epoch\s+\d+$", r.stdout, re.M), r.stdout
    assert "--admin of that node" in r.stdout, r.stdout
    r = shoal_cli("sessions", "show", "cli-kick", "--admin", n3.admin_url, "--json")
    view = json.loads(r.stdout)
    assert view["here"] and view["owner"] == "n3" and view["connected"], view
    assert [s["filter"] for s in view["subscriptions"]] == ["cli/kick/#"]

    r = shoal_cli("kick", "cli-kick", "--admin", n1.admin_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kicked cli-kick on n3 (forwarded)", r.stdout
    got = c.wait_closed(5)
    assert any(isinstance(p, Disconnect) and p.reason_code == 0x98 for p in got), got

    r = shoal_cli("clients", "list", "--admin", n3.admin_url)
    assert r.returncode == 0 and "0 of 0 clients" in r.stdout, r.stdout + r.stderr


def test_cluster_join_checks_membership_and_says_how_to_join(cluster):
    n1, n2, _ = cluster.nodes
    r = shoal_cli("cluster", "join", n1.address, "--admin", n2.admin_url)
    assert r.returncode == 0, r.stderr
    assert "already a member" in r.stdout and "n1" in r.stdout, r.stdout
    r = shoal_cli("cluster", "join", "127.0.0.1:1", "--admin", n2.admin_url)
    assert r.returncode == 1, r.stdout
    assert "--join 127.0.0.1:1" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
