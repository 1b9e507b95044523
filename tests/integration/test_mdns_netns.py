"""mDNS discovery between separate processes: on loopback, and between network namespaces
joined by a bridge (like hosts on one LAN switch).

Each node is a child process running ``cluster.discovery.MdnsDiscovery`` alone, driven by
lines on its stdin (``peers``, ``stop``) and answering JSON lines on its stdout. The
namespace topology is the test's own and is removed afterwards: a switch namespace holding
a bridge, and one namespace per node, each with a veth to the bridge and an address in
10.200.0.0/24. Nothing leaves those namespaces; the root namespace gets no address and no
route. That test is skipped when namespaces, veths or bridges cannot be created (not root).

Run from the repository root: ``.venv/bin/pytest tests/integration/test_mdns_netns.py -q -s``
(``-s`` shows the measured discovery times).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bound on discovery among nodes started together (measured: about 1.6-2 s).
DISCOVERY_BOUND = 10.0

CHILD = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from cluster.discovery import MdnsDiscovery

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main(cluster, node_id, address, port, want, bound):
    d = MdnsDiscovery(cluster, node_id, address, int(port), interfaces=[address])
    began = time.time()
    await d.start()
    started = time.time()
    peers = await d.wait_for_peers(int(want), float(bound))
    say(event="found", node=node_id, began=began, started=started, found=time.time(),
        peers=peers)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "peers":
            say(event="peers", node=node_id, peers=d.peers())
        elif line in ("stop", ""):
            await d.stop()
            say(event="stopped", node=node_id)
            return

asyncio.run(main(*sys.argv[2:]))
"""


class Node:
    """One discovery process; lines from its stdout arrive on a queue."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} within {timeout}s; stderr: "
                                     f"{self.stderr_tail()}")
            try:
                message = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if message["event"] == event:
                return message

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def peers(self) -> dict:
        self.send("peers")
        return self.expect("peers", 5.0)["peers"]

    def stderr_tail(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("stop")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def bridged_namespaces():
    """Three node namespaces on one bridge; yields their (namespace, address) pairs."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = f"{os.getpid() % 100000}"
    switch = f"shoal{tag}sw"
    nodes = [(f"shoal{tag}n{i}", f"10.200.0.{i + 1}") for i in range(3)]
    created: list[str] = []
    try:
        try:
            ip("netns", "add", switch)
            created.append(switch)
            ip("-n", switch, "link", "add", "br0", "type", "bridge")
            ip("-n", switch, "link", "set", "br0", "up")
            for i, (ns, address) in enumerate(nodes):
                ip("netns", "add", ns)
                created.append(ns)
                inner, outer = f"s{tag}v{i}", f"s{tag}b{i}"
                ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                ip("link", "set", outer, "netns", switch)  # move first: nothing stays in root
                ip("link", "set", inner, "netns", ns)
                ip("-n", switch, "link", "set", outer, "master", "br0")
                ip("-n", switch, "link", "set", outer, "up")
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the bridged namespaces: {' '.join(exc.cmd)}: "
                        f"{exc.stderr.strip()}")
        yield nodes
    finally:
        for ns in reversed(created):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def three_nodes_discover(argvs: list[list[str]], node_ids: list[str]) -> float:
    """Start the nodes together; check they find each other and that stop() removes one.
    Returns the discovery time: first start() call to the last node seeing both others."""
    nodes = [Node(argv) for argv in argvs]
    try:
        found = [n.expect("found", DISCOVERY_BOUND + 5) for n in nodes]
        for message in found:
            assert set(message["peers"]) == set(node_ids) - {message["node"]}, message
        took = max(m["found"] for m in found) - min(m["began"] for m in found)
        per_node = {m["node"]: round(m["found"] - m["began"], 2) for m in found}
        registered = {m["node"]: round(m["started"] - m["began"], 2) for m in found}
        print(f"\ndiscovery: all 3 found each other {took:.2f}s after the first start(); "
              f"per node {per_node}; start() (probe+announce) took {registered}")

        nodes[2].send("stop")
        nodes[2].expect("stopped", 10)
        stopped_at = time.monotonic()
        deadline = stopped_at + 5.0
        while any(node_ids[2] in n.peers() for n in nodes[:2]):
            assert time.monotonic() < deadline, "stopped node still listed after 5 s"
            time.sleep(0.05)
        print(f"goodbye: others dropped the stopped node within "
              f"{time.monotonic() - stopped_at:.2f}s of its stop()")
        return took
    finally:
        for n in nodes:
            n.close()


def child_argv(prefix: list[str], cluster: str, node_id: str, address: str,
               port: int) -> list[str]:
    return [*prefix, sys.executable, "-c", CHILD, str(REPO_ROOT), cluster, node_id, address,
            str(port), "2", str(DISCOVERY_BOUND)]


def test_three_processes_on_loopback():
    t = uuid.uuid4().hex[:8]
    cluster = f"shoal-{t}"
    ids = [f"p{t}-{i}" for i in range(3)]
    argvs = [child_argv([], cluster, ids[i], "127.0.0.1", 17700 + i) for i in range(3)]
    assert three_nodes_discover(argvs, ids) < DISCOVERY_BOUND


def test_three_namespaces_on_a_bridge(bridged_namespaces):
    t = uuid.uuid4().hex[:8]
    cluster = f"shoal-{t}"
    ids = [f"b{t}-{i}" for i in range(3)]
    argvs = [child_argv(["ip", "netns", "exec", ns], cluster, ids[i], address, 7000)
             for i, (ns, address) in enumerate(bridged_namespaces)]
    assert three_nodes_discover(argvs, ids) < DISCOVERY_BOUND
