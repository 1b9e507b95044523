"""The ``shoal`` command: the node's commands plus the cluster.

``shoal run`` with ``--cluster-port`` joins (or founds) a cluster: the cluster member is
plugged into the node as an extension, so ``node`` never imports ``cluster``.
``shoal cluster up`` starts a local cluster of N processes; ``shoal cluster status``,
``join`` and ``leave`` talk to a node's admin API. The cluster's part of that API (its
routes, and the ``node.admin.ClusterAdmin`` hook: session owner/epoch/holder, forwarded
kicks, nodes, Raft and takeover metrics) is added by :func:`add_admin_routes`.
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
from node.admin import CLUSTER_ADMIN
from node.config import ConfigError
from node.metrics import Exposition

from .member import ClusterError, ClusterMember, new_secret
from .membership import MembershipError
from .stored import StoredMembership, StoredStateError, describe
from .transport import PeerUnreachable, RemoteError, RequestTimeout

DEFAULT_ADMIN = node_cli.DEFAULT_ADMIN


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
    except BaseException:  # a failed start, or a stop (SIGTERM) while it waited
        await member.stop()
        raise
    try:
        yield member
    finally:
        await member.stop()


MEMBER = web.AppKey("cluster_member", ClusterMember)
KICK_TIMEOUT = 5.0  # seconds a kick forwarded to another node may take


def add_admin_routes(app: web.Application, member: ClusterMember) -> None:
    """The cluster's part of the admin API: its own routes, and the ClusterAdmin hook the
    node's routes (sessions, kick, nodes, metrics) call for what only the cluster knows."""
    app[MEMBER] = member
    app[CLUSTER_ADMIN] = MemberAdmin(member)
    app.router.add_get("/api/v1/cluster", _cluster)
    app.router.add_post("/api/v1/cluster/leave", _leave)
    app.router.add_delete("/api/v1/nodes/{node_id}", _forget)


async def _cluster(request: web.Request) -> web.Response:
    return web.json_response(request.app[MEMBER].cluster_status())


async def _leave(request: web.Request) -> web.Response:
    """POST /api/v1/cluster/leave[?force=1]: THIS node leaves. A body naming another node
    is refused: each node leaves through its own admin API (a dead one is forgotten)."""
    member = request.app[MEMBER]
    body = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON; send none, or "
                                      '{"node": "<this node id>", "force": false}'},
                                     status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
    named = body.get("node")
    if named is not None and named != member.node_id:
        admin = (member.view.members.get(named) or {}).get("admin")
        where = f" (its admin API: http://{admin})" if admin else ""
        return web.json_response({"error": (
            f"this is {member.node_id}: POST /api/v1/cluster/leave makes the node it is sent "
            f"to leave. Send it to {named}{where}; a node that is gone for good is removed "
            f"with DELETE /api/v1/nodes/{named} (`shoal cluster forget {named}`)")},
            status=400)
    force = body.get("force", request.query.get("force", "") in ("1", "true", "yes"))
    try:
        return web.json_response(await member.membership.leave(force=bool(force)))
    except MembershipError as err:
        return web.json_response(dict(err.extra, left=False, node=member.node_id,
                                      error=str(err)), status=err.status)


async def _forget(request: web.Request) -> web.Response:
    """DELETE /api/v1/nodes/{id}: remove a dead node (or a ghost voter's Raft address)
    from the Raft voters and the routing table; a live node is refused."""
    member = request.app[MEMBER]
    try:
        return web.json_response(await member.membership.forget(request.match_info["node_id"]))
    except MembershipError as err:
        return web.json_response(dict(err.extra, error=str(err)), status=err.status)


class MemberAdmin:
    """node.admin.ClusterAdmin over a ClusterMember."""

    def __init__(self, member: ClusterMember) -> None:
        self.member = member

    def session_fields(self, client_id: str) -> dict:
        view = self.member.view
        owner = view.owners.get(client_id)
        return {"owner": owner[0] if owner else None, "epoch": owner[1] if owner else None,
                "holder": view.holders.get(client_id),
                "replicas": list(view.replicas.get(client_id, ()))}

    def nodes(self) -> list[dict]:
        return self.member.cluster_status()["nodes"]

    async def kick_remote(self, client_id: str) -> dict | None:
        member = self.member
        holder = member.view.holders.get(client_id)
        if holder is None or holder == member.node_id:
            return None
        admin = (member.view.members.get(holder) or {}).get("admin") or ""
        try:
            kicked = await member.transport.request(holder, "kick", {"client_id": client_id},
                                                    KICK_TIMEOUT)
        except (PeerUnreachable, RequestTimeout, RemoteError) as err:
            return {"node": holder, "admin": admin, "error": str(err)}
        return {"node": holder, "kicked": bool(kicked)}

    def metrics(self, expo: Exposition) -> None:
        member = self.member
        status = member.cluster_status()
        if member.raft is not None:
            raft = member.raft.status()
            expo.gauge("shoal_raft_term", "Current Raft term.", raft["term"])
            expo.gauge("shoal_raft_commit_index", "Raft commit index.", raft["commit_index"])
            expo.gauge("shoal_raft_last_applied", "Last Raft log index applied here.",
                       raft["last_applied"])
            expo.gauge("shoal_raft_is_leader", "1 when this node is the Raft leader.",
                       raft["is_leader"])
        expo.gauge("shoal_raft_has_quorum", "1 when this node sees a Raft majority.",
                   status["has_quorum"])
        voters = status["raft"]
        expo.gauge("shoal_raft_voters", "Raft voters in this node's configuration (every "
                   "commit needs a majority of them).", voters["voter_count"])
        expo.gauge("shoal_raft_voters_reachable", "Raft voters this node is connected to, "
                   "itself included.", voters["reachable"])
        expo.gauge("shoal_raft_quorum_needed", "Raft voters a commit needs (a majority).",
                   voters["needed"])
        expo.gauge("shoal_raft_ghost_voters", "Raft voters that no member of the routing "
                   "table names (remove them with `shoal cluster forget ADDRESS`).",
                   len(voters["ghost_voters"]))
        expo.counter("shoal_raft_leader_changes_total",
                     "Leader changes seen by this node (checked once a second).",
                     member.leader_changes)
        by_status: dict[str, int] = {"up": 0, "down": 0, "leaving": 0}
        for n in status["nodes"]:
            by_status[n["status"]] = by_status.get(n["status"], 0) + 1
        for st, count in sorted(by_status.items()):
            expo.gauge("shoal_cluster_nodes", "Cluster members by status, as this node sees "
                       "them.", count, status=st)
        t = member.takeovers.stats
        help_text = ("Sessions claimed from another node: moved (taken over with their "
                     "state) or fresh (the holder was unreachable: started anew).")
        expo.counter("shoal_takeovers_total", help_text, t["takeovers"], result="moved")
        expo.counter("shoal_takeovers_total", help_text, t["takeovers_fresh"], result="fresh")
        expo.histogram_of("shoal_takeover_duration_seconds",
                          "From CONNECT to the session installed here, per takeover.",
                          member.takeovers.latency_hist)
        expo.counter("shoal_takeover_barrier_timeouts_total",
                     "Hand-overs that completed without every node's barrier.",
                     t["barrier_timeouts"])
        rep = member.replication
        expo.gauge("shoal_sessions_under_replicated", "Stored sessions held here with fewer "
                   "in-sync replicas than session_replicas.", rep.under_replicated())
        expo.gauge("shoal_session_copies", "Replica copies of other nodes' sessions kept "
                   "here.", rep.copies_count())
        for node, lag in sorted(rep.lag().items()):
            expo.gauge("shoal_replication_lag_batches", "Replication batches sent to a "
                       "replica and not acknowledged yet.", lag["batches"], replica=node)
            expo.gauge("shoal_replication_lag_seconds", "Age of the oldest unacknowledged "
                       "replication batch to a replica.", lag["oldest_s"], replica=node)
        expo.counter("shoal_replication_changes_total", "Stored-session changes sent to "
                     "replicas.", rep.changes_sent)
        expo.counter("shoal_failovers_total", "Nodes declared down (or forgotten) as seen "
                     "here.", rep.failovers)
        expo.counter("shoal_sessions_promoted_total", "Sessions promoted here from a "
                     "replica copy.", rep.promotions)
        expo.histogram_of("shoal_failover_seconds", "From the last word of a dead node to "
                          "its sessions installed here, per failover.", rep.failover_hist)
        expo.counter("shoal_cluster_forwarded_total",
                     "Messages forwarded to other nodes (one per node reached).",
                     member.forwarded)
        expo.counter("shoal_cluster_received_total", "Messages received from other nodes.",
                     member.received)
        expo.counter("shoal_messages_dropped_total", "", member.forward_dropped,
                     reason="forward_queue_full")
        ts = member.transport.stats
        help_text = ("Connections to the node-to-node port closed before their dialler proved "
                     "the cluster secret, by why.")
        for why in ("bad_proofs", "malformed_handshakes", "handshake_timeouts",
                    "handshakes_evicted"):
            expo.counter("shoal_link_handshakes_refused_total", help_text, ts[why], reason=why)
        expo.counter("shoal_link_auth_failures_total", "Node link frames that failed "
                     "authentication (altered on the way): each closed its link.",
                     ts["auth_failures"])


# -- operator commands ----------------------------------------------------------------------------

def _admin_get(base: str, path: str, timeout: float = 5.0):
    return node_cli.admin_call("GET", base, path, timeout)


_admin_call = node_cli.admin_call
format_table = node_cli.format_table


def cmd_cluster_status(args) -> int:
    status = _admin_get(args.admin, "/api/v1/cluster")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [["NODE", "MQTT", "ADMIN", "ROLE", "STATUS", "VOTER", "SESSIONS", "REPLICATED",
             "UNDER-REPL", "CONNECTIONS", "UPTIME"]]

    def shown(n, key):
        # a down node's last gossiped numbers are stale
        return "-" if n.get(key) is None or n["status"] == "down" else n[key]
    for n in status["nodes"]:
        up = n["status"] != "down"
        rows.append([n["id"], n["addresses"]["mqtt"], n["addresses"]["admin"] or "-",
                     n["role"], n["status"] + (" (declared)" if n.get("declared_down") else ""),
                     "yes" if n.get("voter") else "NO", shown(n, "sessions"),
                     shown(n, "replicated"), shown(n, "under_replicated"),
                     shown(n, "connections"), f"{n['uptime_s']:.0f}s" if up else "-"])
    raft = status.get("raft") or {}
    for addr in raft.get("ghost_voters", []):
        reachable = any(v["address"] == addr and v["reachable"] for v in raft["voters"])
        rows.append([f"? ({addr})", "-", "-", "-", "GHOST", "yes",
                     "-", "-", "-", "-", "up" if reachable else "-"])
    print(f"cluster {status['cluster']}  leader {status['leader']}  term {status['term']}  "
          f"commit {status['commit_index']}")
    if raft:
        ok = "ok" if raft.get("has_quorum") else "LOST"
        print(f"raft voters {raft['voter_count']}  reachable {raft['reachable']}  "
              f"quorum needs {raft['needed']}: {ok}")
    print(format_table(rows))
    if status.get("under_replicated"):
        print(f"warning: {status['under_replicated']} sessions have fewer in-sync replicas "
              f"than session_replicas = {status.get('session_replicas')} (a node down, or "
              "seeding in progress): they do not survive the loss of their node",
              file=sys.stderr)
    for addr in raft.get("ghost_voters", []):
        print(f"warning: Raft voter {addr} is no member (a ghost: it still counts in every "
              f"majority); remove it with `shoal cluster forget {addr}`", file=sys.stderr)
    for node in raft.get("members_not_voting", []):
        print(f"warning: member {node} is not a Raft voter", file=sys.stderr)
    return 0


def cmd_cluster_leave(args) -> int:
    view = _try_admin_json(args.admin.rstrip("/") + "/api/v1/cluster") or {}
    me = next((n for n in view.get("nodes", []) if n["id"] == view.get("node_id")), None)
    sessions = me.get("sessions") if me else None
    print(f"asking {view.get('node_id') or args.admin} to leave the cluster: its clients are "
          "disconnected (they reconnect elsewhere), its "
          f"{sessions if sessions is not None else ''} sessions move to the other nodes, "
          "then it is removed from the Raft voters. This takes a few seconds per thousand "
          "sessions...", file=sys.stderr, flush=True)
    status, result = node_cli.admin_answer("POST", args.admin, "/api/v1/cluster/leave",
                                          args.timeout, {"force": args.force})
    print(json.dumps(result))
    if status != 200 or not result.get("left"):
        print(f"shoal: the node did not leave: {result.get('error', status)}",
              file=sys.stderr)
        return 1
    print(f"left: {result.get('sessions_moved', 0)} sessions moved, "
          f"{result.get('sessions_not_moved', 0)} left behind; Raft voters now "
          f"{', '.join(result.get('voters') or [])}. Stop the node's process now.",
          file=sys.stderr)
    return 0


def cmd_cluster_forget(args) -> int:
    from urllib.parse import quote
    status, result = node_cli.admin_answer(
        "DELETE", args.admin, f"/api/v1/nodes/{quote(args.node, safe='')}", 60.0)
    print(json.dumps(result))
    if status != 200:
        print(f"shoal: {args.node} was not forgotten: {result.get('error', status)}",
              file=sys.stderr)
        return 1
    print(f"forgotten: {result['forgotten']}; Raft voters now {', '.join(result['voters'])}; "
          f"{result.get('sessions_promoted', 0)} of its sessions promoted on their replicas, "
          f"{result['sessions_released']} released (their clients start new ones)",
          file=sys.stderr)
    return 0


def cmd_cluster_reset(args) -> int:
    """Drop a stopped node's stored cluster membership (data_dir/cluster.json)."""
    import fcntl
    stored = StoredMembership(args.data_dir)
    try:
        state = stored.load()
    except StoredStateError as err:
        state = None
        print(f"shoal: {err}", file=sys.stderr)
    lock_path = os.path.join(args.data_dir, "store", "LOCK")
    if os.path.exists(lock_path):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"shoal: a node is running on {args.data_dir}: stop it first (or make it "
                  "leave with `shoal cluster leave`)", file=sys.stderr)
            return 1
        finally:
            os.close(fd)
    if state is None and not os.path.exists(stored.path):
        print(f"nothing to reset: {args.data_dir} holds no cluster membership")
        return 0
    what = describe(state) if state else "a damaged membership file"
    print(f"this drops {stored.path}: {what}. The node's stored sessions stay; at its next "
          "start it joins (--join) or founds a cluster as a new node.")
    if not args.yes:
        print("shoal: nothing changed; run again with --yes to drop it", file=sys.stderr)
        return 1
    stored.remove()
    print("dropped")
    return 0


def cmd_cluster_join(args) -> int:
    """A node joins a cluster when it starts (``--join``): its store, sessions and Raft
    node are set up for the cluster it starts in, so a running node cannot switch. This
    checks where the node at --admin stands and says what to do."""
    seed = args.seed
    view = _try_admin_json(args.admin.rstrip("/") + "/api/v1/cluster")
    if view is None or "nodes" not in view:
        _admin_get(args.admin, "/healthz")  # unreachable: exits with the usual message
        print(f"shoal: the node at {args.admin} runs alone (no --cluster-port). A node joins "
              f"a cluster when it starts: stop it and start it with --cluster-port PORT "
              f"--cluster-secret SECRET --join {seed} (or SHOAL_JOIN={seed}); its stored "
              "sessions come along", file=sys.stderr)
        return 1
    members = {n["addresses"].get("transport"): n["id"] for n in view["nodes"]}
    if seed in members:
        print(f"{view['node_id']} is already a member of cluster {view['cluster']} with "
              f"{members[seed]} ({seed}); nodes: {', '.join(sorted(members.values()))}")
        return 0
    print(f"shoal: {view['node_id']} is a member of cluster {view['cluster']} "
          f"({', '.join(sorted(members.values()))}), which does not list {seed}. A node "
          f"joins when it starts: `shoal cluster leave --admin {args.admin}`, stop it, then "
          f"start it with --join {seed} and that cluster's name and secret",
          file=sys.stderr)
    return 1


def _try_admin_json(url: str):
    """The JSON of a GET, or None when the answer is an error or nothing answers."""
    try:
        req = urllib.request.Request(url, headers=node_cli.admin_headers())
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def cmd_cluster_up(args) -> int:
    """Start N local nodes in one command; Ctrl-C stops them all. They start at once
    with the same --join list naming all of them (the initial members); started again on
    the same data directories they rejoin through the membership each stored."""
    n = args.nodes
    base = args.base_port
    secret = os.environ.get("SHOAL_CLUSTER_SECRET") or new_secret()
    data = os.path.abspath(args.data_dir)
    procs: list[subprocess.Popen] = []
    nodes = []
    seeds = ",".join(f"127.0.0.1:{args.cluster_base_port + 2 * i}" for i in range(n))
    for i in range(1, n + 1):
        mqtt = base + i - 1
        admin = args.admin_base_port + i - 1
        cport = args.cluster_base_port + 2 * (i - 1)
        node_id = f"node{i}"
        cmd = [sys.executable, "-m", "cluster", "run", "--node-id", node_id,
               "--mqtt-port", str(mqtt), "--admin-port", str(admin),
               "--cluster-port", str(cport), "--data-dir", os.path.join(data, node_id),
               "--log-level", args.log_level, "--join", seeds]
        env = dict(os.environ, SHOAL_CLUSTER_SECRET=secret)
        os.makedirs(os.path.join(data, node_id), exist_ok=True)
        log_path = os.path.join(data, f"{node_id}.log")
        logf = open(log_path, "ab")
        procs.append(subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT))
        nodes.append((node_id, mqtt, admin, log_path))
        print(f"starting {node_id}: mqtt 127.0.0.1:{mqtt}  admin http://127.0.0.1:{admin}  "
              f"log {log_path}", file=sys.stderr, flush=True)
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
        req = urllib.request.Request(url, headers=node_cli.admin_headers())
        with urllib.request.urlopen(req, timeout=2.0) as resp:
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


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:  # noqa: C901
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
            ("join", cmd_cluster_join, "check that the node at --admin is in SEED's cluster, "
                                       "or say how to make it join (nodes join at start)"),
            ("leave", cmd_cluster_leave, "make the node at --admin leave the cluster (its "
                                         "sessions move to the other nodes)"),
            ("forget", cmd_cluster_forget, "remove a dead node (or a ghost Raft voter) from "
                                           "the cluster, through the node at --admin")):
        p = sub.add_parser(name, help=help_text)
        node_cli.add_admin_argument(p)
        if name == "leave":
            p.add_argument("--force", action="store_true",
                           help="leave even if some sessions could not be moved (their "
                                "clients then start new sessions)")
            p.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for the answer (default 120)")
        if name == "forget":
            p.add_argument("node", metavar="NODE",
                           help="node id, or the Raft address (host:port) of a ghost voter")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "join":
            p.add_argument("seed", metavar="SEED",
                           help="host:port (node-to-node port) of a member of the cluster")
        p.set_defaults(cluster_handler=handler)
    reset = sub.add_parser("reset", help="drop a stopped node's stored cluster membership "
                                         "(it then joins or founds as a new node)")
    reset.add_argument("--data-dir", required=True, help="the node's data_dir")
    reset.add_argument("--yes", action="store_true", help="really drop it (else only says "
                                                          "what it would drop)")
    reset.set_defaults(cluster_handler=cmd_cluster_reset)


def cmd_cluster(args) -> int:
    return args.cluster_handler(args)


COMMANDS = node_cli.COMMANDS + (
    node_cli.Command("cluster", "run and inspect a cluster (up, status, join, leave, "
                                "forget, reset)", cmd_cluster,
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
