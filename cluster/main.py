"""The ``shoal`` command: the node's commands plus the cluster.

``shoal run`` with ``--cluster-port`` joins (or founds) a cluster: the cluster member is
plugged into the node as an extension, so ``node`` never imports ``cluster``.
``shoal cluster up`` starts a local cluster of N processes; ``shoal cluster status`` and
``shoal cluster leave`` talk to a node's admin API.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

from aiohttp import web

from node import cli as node_cli
from node.config import ConfigError

from .member import ClusterError, ClusterMember, new_secret

DEFAULT_ADMIN = "http://127.0.0.1:8080"


# -- the extension ------------------------------------------------------------------------------

def extensions_for(config):
    return [cluster_extension] if config.cluster_port else []


@contextlib.asynccontextmanager
async def cluster_extension(broker, admin_app):
    member = ClusterMember(broker, broker.config)
    if admin_app is not None:
        add_admin_routes(admin_app, member)
    try:
        await member.start()
    except ClusterError:
        await member.stop()
        raise
    try:
        yield member
    finally:
        await member.stop()


MEMBER = web.AppKey("cluster_member", ClusterMember)


def add_admin_routes(app: web.Application, member: ClusterMember) -> None:
    app[MEMBER] = member
    app.router.add_get("/api/v1/cluster", _cluster)
    app.router.add_post("/api/v1/cluster/leave", _leave)
    app.router.add_get("/api/v1/sessions/{client_id}", _session)


async def _cluster(request: web.Request) -> web.Response:
    return web.json_response(request.app[MEMBER].cluster_status())


async def _leave(request: web.Request) -> web.Response:
    return web.json_response(await request.app[MEMBER].leave())


async def _session(request: web.Request) -> web.Response:
    view = request.app[MEMBER].session_view(request.match_info["client_id"])
    status = 200 if view["owner"] or view["holder"] or view["here"] else 404
    return web.json_response(view, status=status)


# -- operator commands ----------------------------------------------------------------------------

def _admin_get(base: str, path: str, timeout: float = 5.0):
    return _admin_call("GET", base, path, timeout)


def _admin_call(method: str, base: str, path: str, timeout: float):
    url = base.rstrip("/") + path
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise SystemExit(f"shoal: {url} answered {err.code}: {err.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as err:
        raise SystemExit(f"shoal: cannot reach the admin API at {base} ({err}); is the node "
                         "running? pass --admin http://HOST:PORT of any node")


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)


def cmd_cluster_status(args) -> int:
    status = _admin_get(args.admin, "/api/v1/cluster")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [["NODE", "MQTT", "ADMIN", "ROLE", "STATUS", "SESSIONS", "CONNECTIONS", "UPTIME"]]
    for n in status["nodes"]:
        rows.append([n["id"], n["addresses"]["mqtt"], n["addresses"]["admin"] or "-",
                     n["role"], n["status"], "-" if n["sessions"] is None else n["sessions"],
                     "-" if n["connections"] is None else n["connections"],
                     f"{n['uptime_s']:.0f}s"])
    print(f"cluster {status['cluster']}  leader {status['leader']}  term {status['term']}  "
          f"commit {status['commit_index']}")
    print(format_table(rows))
    return 0


def cmd_cluster_leave(args) -> int:
    print(f"asking {args.admin} to leave the cluster (its clients are disconnected and "
          "reconnect elsewhere)...", file=sys.stderr)
    result = _admin_call("POST", args.admin, "/api/v1/cluster/leave", 60.0)
    print(json.dumps(result))
    return 0


def cmd_cluster_up(args) -> int:
    """Start N local nodes in one command; Ctrl-C stops them all."""
    n = args.nodes
    base = args.base_port
    secret = os.environ.get("SHOAL_CLUSTER_SECRET") or new_secret()
    data = os.path.abspath(args.data_dir)
    procs: list[subprocess.Popen] = []
    nodes = []
    for i in range(1, n + 1):
        mqtt = base + i - 1
        admin = args.admin_base_port + i - 1
        cport = args.cluster_base_port + 2 * (i - 1)
        node_id = f"node{i}"
        cmd = [sys.executable, "-m", "cluster", "run", "--node-id", node_id,
               "--mqtt-port", str(mqtt), "--admin-port", str(admin),
               "--cluster-port", str(cport), "--data-dir", os.path.join(data, node_id),
               "--log-level", args.log_level]
        if i > 1:
            cmd += ["--join", f"127.0.0.1:{args.cluster_base_port}"]
        env = dict(os.environ, SHOAL_CLUSTER_SECRET=secret)
        os.makedirs(os.path.join(data, node_id), exist_ok=True)
        log_path = os.path.join(data, f"{node_id}.log")
        logf = open(log_path, "ab")
        procs.append(subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT))
        nodes.append((node_id, mqtt, admin, log_path))
        print(f"starting {node_id}: mqtt 127.0.0.1:{mqtt}  admin http://127.0.0.1:{admin}  "
              f"log {log_path}", file=sys.stderr, flush=True)
        if i == 1:
            _wait_ready(procs[0], admin, 30.0, nodes[0])
    try:
        for p, nd in zip(procs, nodes):
            _wait_ready(p, nd[2], 60.0, nd)
        deadline = time.monotonic() + 60.0
        while True:
            st = _try_get(f"http://127.0.0.1:{nodes[0][2]}/api/v1/cluster")
            up = [x for x in (st or {}).get("nodes", []) if x["status"] == "up"]
            if len(up) >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit("shoal: the cluster did not come up in 60 s; see the logs above")
            time.sleep(0.2)
        print(f"\ncluster up: {n} nodes, leader {st['leader']}")
        for node_id, mqtt, admin, _ in nodes:
            print(f"  {node_id}  mqtt 127.0.0.1:{mqtt}  admin http://127.0.0.1:{admin}")
        print("Ctrl-C stops them all.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [nd[0] for p, nd in zip(procs, nodes) if p.poll() is not None]
        print(f"shoal: node(s) {', '.join(dead)} exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _try_get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait_ready(proc, admin_port: int, timeout: float, node) -> None:
    deadline = time.monotonic() + timeout
    while _try_get(f"http://127.0.0.1:{admin_port}/healthz") is None:
        if proc.poll() is not None:
            raise SystemExit(f"shoal: {node[0]} exited with code {proc.returncode}; "
                             f"see {node[3]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"shoal: {node[0]} not ready after {timeout:.0f} s; see {node[3]}")
        time.sleep(0.1)


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start a local cluster of N nodes (Ctrl-C stops it)")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--base-port", type=int, default=1883, help="MQTT port of node 1")
    up.add_argument("--admin-base-port", type=int, default=8080, help="admin port of node 1")
    up.add_argument("--cluster-base-port", type=int, default=7001,
                    help="node-to-node port of node 1 (Raft uses the next port)")
    up.add_argument("--data-dir", default="./data", help="nodes get DATA_DIR/nodeN")
    up.add_argument("--log-level", default="info")
    up.set_defaults(cluster_handler=cmd_cluster_up)
    for name, handler, help_text in (
            ("status", cmd_cluster_status, "show the cluster's nodes as a table"),
            ("leave", cmd_cluster_leave, "make the node at --admin leave the cluster")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--admin", default=os.environ.get("SHOAL_ADMIN", DEFAULT_ADMIN),
                       help=f"admin API URL of a node [default: {DEFAULT_ADMIN}; env SHOAL_ADMIN]")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(cluster_handler=handler)


def cmd_cluster(args) -> int:
    return args.cluster_handler(args)


COMMANDS = node_cli.COMMANDS + (
    node_cli.Command("cluster", "run and inspect a cluster (up, status, leave)", cmd_cluster,
                     _add_cluster_arguments),
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return node_cli.main(argv, COMMANDS, extensions_for)
    except ClusterError as err:
        print(f"shoal: cluster error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"shoal: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
