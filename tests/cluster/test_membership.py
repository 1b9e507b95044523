"""Issue 10: membership operators can trust: leave, forget, restart and bootstrap.

The Raft voter set is read from pysyncobj itself (its ``status`` utility command on each
node's Raft port, ``support.raft_voters``), not only from Shoal's API, so a ghost voter
cannot hide behind the routing table.

* A leave removes the node from the voters (committed) and the table: 4 nodes, one leaves,
  one is killed with -9: the remaining two of three voters keep a quorum and serve.
* ``forget`` of a killed node: the voters and the quorum arithmetic follow, its sessions
  are released (before: CONNACK 0x88; after: a new session); a live node is refused.
* A node restarted without ``--join`` rejoins through its stored membership; a node with
  stored state never founds a cluster alone (``--new-cluster`` does, on request); a node
  back with a new address replaces its old voter entry.
* Three nodes started at once with the same ``--join`` list form one cluster in 15 s;
  three started at once with ``--bootstrap-expect 3`` and a chain of seeds too; joins that
  arrive together are queued.
* A leave with 1,000 offline sessions on the node moves them all, spread over the other
  nodes; their clients resume there with session present = 1 and their queued messages.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter

import pytest

from support import (ClusterNodeProcess, Prop, Puback, free_port_pair,
                     holds_for, http_json, raft_voters, shoal_cli, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EXPIRY = {Prop.SESSION_EXPIRY_INTERVAL: 600}
SERVER_UNAVAILABLE = 0x88


def uid() -> str:
    return uuid.uuid4().hex[:8]


def member_rafts(node) -> set[str]:
    return {n["addresses"]["raft"] for n in node.cluster_view()["nodes"]}


def assert_voters_are_the_members(nodes) -> set[str]:
    """On every node: pysyncobj's voter set == the routing table's members, no ghost."""
    want = {n.host + ":" + str(n.raft_port) for n in nodes}
    for node in nodes:
        wait_for(lambda node=node: raft_voters(node) == want == member_rafts(node), 10.0,
                 message=lambda node=node: f"{node.node_id}: voters {raft_voters(node)}, "
                                           f"members {member_rafts(node)}, want {want}")
        raft = node.cluster_view()["raft"]
        assert raft["ghost_voters"] == [] and raft["members_not_voting"] == [], raft
        assert raft["voter_count"] == len(want) and raft["needed"] == len(want) // 2 + 1
    return want


def ready(node) -> bool:
    try:
        return node.api("/readyz")[0] == 200
    except OSError:
        return False


def park_session(node, prefix: str) -> str:
    """A persistent session (subscribed at QoS 1) left offline on ``node``: its ClientID."""
    cid = f"{prefix}-{uid()}"
    c = node.raw(5)
    c.connect(cid, clean_start=False, properties=EXPIRY)
    c.subscribe(f"{prefix}/{cid}", 1)
    c.disconnect()
    return cid


def connects(node, client_id: str) -> bool:
    """A persistent session can be claimed on ``node`` (a Raft commit)."""
    c = node.raw(5)
    try:
        ack = c.connect(client_id, clean_start=True, properties=EXPIRY)
        return ack.reason_code == 0
    finally:
        c.close()


def test_leave_removes_the_voter_and_a_later_kill_leaves_a_quorum(cluster_factory):
    cluster = cluster_factory(4)
    nodes = list(cluster.nodes)
    assert_voters_are_the_members(nodes)
    # the leader leaves: it must hand the leadership over before it can be removed
    leaving = cluster.leader()
    r = shoal_cli("cluster", "leave", "--admin", leaving.admin_url, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["left"] is True and answer["sessions_not_moved"] == 0, answer
    stay = [n for n in nodes if n is not leaving]
    want = assert_voters_are_the_members(stay)
    assert set(answer["voters"]) == want
    status, body = leaving.api("/readyz")
    assert status == 503 and "left the cluster" in body["reason"], body
    leaving.stop()

    # one more dies: two of three voters are a quorum
    victim = cluster.leader(stay)
    victim.kill()
    survivors = [n for n in stay if n is not victim]
    for node in survivors:
        wait_for(lambda node=node: ready(node), 15.0,
                 message=lambda node=node: f"{node.node_id} ready: {node.api('/readyz')}")
        # (pysyncobj notices the dead connection on its own schedule)
        wait_for(lambda node=node: (lambda r: (r["voter_count"], r["reachable"], r["needed"])
                                    == (3, 2, 2))(node.cluster_view()["raft"]), 10.0,
                 message=lambda node=node: f"{node.node_id}: {node.cluster_view()['raft']}")
        assert connects(node, f"after-{uid()}")


def test_a_leave_that_would_lose_the_quorum_is_refused_and_the_node_serves_on(cluster):
    n1, n2, n3 = cluster.nodes
    # the endpoint acts on its own node only
    status, body = http_json("POST", n1.admin_url + "/api/v1/cluster/leave", 10.0,
                             body={"node": n3.node_id})
    assert status == 400 and n3.node_id in body["error"], body
    n3.kill()
    # without n2 the voters would be n1 and the dead n3: no majority, nothing would commit
    r = shoal_cli("cluster", "leave", "--admin", n2.admin_url, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["left"] is False and "no majority" in answer["error"], answer
    assert "forget" in answer["error"]
    for node in (n1, n2):
        assert ready(node) and len(raft_voters(node)) == 3
    assert connects(n2, f"stay-{uid()}")
    # forgetting n3 first makes the leave possible: n1 alone is a majority of one
    wait_for(lambda: {n["id"]: n["status"] for n in n1.cluster_view()["nodes"]}.get(
        n3.node_id) == "down", 10.0)
    assert shoal_cli("cluster", "forget", n3.node_id, "--admin", n1.admin_url).returncode == 0
    r = shoal_cli("cluster", "leave", "--admin", n2.admin_url, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert raft_voters(n1) == {f"{n1.host}:{n1.raft_port}"}
    wait_for(lambda: ready(n1), 10.0)


def test_forget_a_killed_node_releases_its_sessions(cluster_factory):
    # sessions without a replica (with one, the node is declared down and its session is
    # promoted: tests/cluster/test_replicas.py)
    cluster = cluster_factory(3, takeover_timeout=2.0, session_replicas=0)
    n1, n2, n3 = cluster.nodes
    cid = park_session(n3, "fg")
    wait_for(lambda: (n1.session_view(cid) or {}).get("holder") == n3.node_id, 10.0)
    n3.kill()

    # while n3 is only down, its session is kept for it: refused (unreachable_owner refuse)
    # after takeover_timeout (2 s here)
    c = n1.raw(5)
    assert c.connect(cid, clean_start=False, properties=EXPIRY,
                     expect_success=False).reason_code == \
        SERVER_UNAVAILABLE
    c.close()

    # a live node is refused, with what to do instead
    r = shoal_cli("cluster", "forget", n2.node_id, "--admin", n1.admin_url, timeout=60)
    assert r.returncode == 1 and "leave" in r.stderr, r.stdout + r.stderr

    wait_for(lambda: {n["id"]: n["status"] for n in n1.cluster_view()["nodes"]}.get(
        n3.node_id) == "down", 10.0)
    r = shoal_cli("cluster", "forget", n3.node_id, "--admin", n2.admin_url, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["forgotten"] == n3.node_id and answer["sessions_released"] >= 1, answer
    want = assert_voters_are_the_members([n1, n2])
    assert set(answer["voters"]) == want
    for node in (n1, n2):
        raft = node.cluster_view()["raft"]
        assert (raft["voter_count"], raft["reachable"], raft["needed"]) == (2, 2, 2), raft
        assert n3.node_id not in {n["id"] for n in node.cluster_view()["nodes"]}
        metrics = node.metrics_text().splitlines()
        for name, want in (("shoal_raft_voters", 2), ("shoal_raft_voters_reachable", 2),
                           ("shoal_raft_quorum_needed", 2), ("shoal_raft_ghost_voters", 0)):
            line = f'{name}{{node="{node.node_id}"}} {want}'
            assert line in metrics, (line, [m for m in metrics if m.startswith(name)])
    # the session is released: the client gets a new one instead of 0x88
    c = n1.raw(5)
    ack = c.connect(cid, clean_start=False, properties=EXPIRY, expect_success=False)
    assert ack.reason_code == 0 and ack.session_present is False, ack
    c.close()
    # forgetting it again: nothing to forget
    r = shoal_cli("cluster", "forget", n3.node_id, "--admin", n1.admin_url, timeout=60)
    assert r.returncode == 1 and "neither a member" in r.stderr, r.stderr


def test_a_ghost_voter_is_shown_and_forgotten_by_its_address(cluster):
    """A Raft voter that no member names (made here with pysyncobj's own ``add`` command
    on the Raft port): status, API and metrics flag it; ``forget ADDRESS`` removes it."""
    from pysyncobj.utility import TcpUtility
    n1, n2, n3 = cluster.nodes
    ghost = f"127.0.0.1:{free_port_pair()}"
    leader = cluster.leader()
    answer = TcpUtility(password=leader.secret, timeout=10).executeCommand(
        f"{leader.host}:{leader.raft_port}", ["add", ghost])
    assert str(answer).startswith("SUCCESS"), answer
    for node in cluster.nodes:
        wait_for(lambda node=node: ghost in raft_voters(node), 10.0)
    raft = n2.cluster_view()["raft"]
    assert raft["ghost_voters"] == [ghost], raft
    assert (raft["voter_count"], raft["reachable"], raft["needed"]) == (4, 3, 3), raft
    r = shoal_cli("cluster", "status", "--admin", n2.admin_url)
    assert r.returncode == 0 and "GHOST" in r.stdout and ghost in r.stdout, r.stdout
    assert f"shoal cluster forget {ghost}" in r.stderr, r.stderr
    assert f'shoal_raft_ghost_voters{{node="{n2.node_id}"}} 1' in n2.metrics_text()
    r = shoal_cli("cluster", "forget", ghost, "--admin", n3.admin_url, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_voters_are_the_members(cluster.nodes)


def test_restart_without_join_rejoins_and_stored_state_never_founds(cluster):
    n1, n2, n3 = cluster.nodes
    want = assert_voters_are_the_members(cluster.nodes)
    # one node, killed and started without --join: it rejoins through its stored peers
    n2.kill()
    n2.join = None
    n2.start()
    cluster.wait_formed()
    assert assert_voters_are_the_members(cluster.nodes) == want

    # every node down; one started alone does not found a cluster of its own
    for node in cluster.nodes:
        node.kill()
    n1.join = None
    cluster._spawn(n1)
    wait_for(lambda: "waiting for a quorum of the stored voters" in n1.log_tail(20), 15.0,
             message=lambda: f"n1 says it waits for the others\n{n1.log_tail()}")
    assert n1.alive()
    assert holds_for(lambda: not ready(n1), 2.0), "a lone node with stored state served"
    # SIGTERM ends a node that is still waiting, at once and cleanly
    t0 = time.monotonic()
    assert n1.stop() == 0 and time.monotonic() - t0 < 4.0, n1.log_tail()
    # the others come back (together, without --join): one cluster, the same voters
    cluster.restart_together()
    assert assert_voters_are_the_members(cluster.nodes) == want
    ids = {v["cluster_id"] for v in cluster.views().values()}
    assert len(ids) == 1 and None not in ids, ids


def test_new_cluster_flag_founds_from_stored_state(cluster_factory):
    cluster = cluster_factory(2)
    n1, n2 = cluster.nodes
    old_id = n1.cluster_view()["cluster_id"]
    n1.kill()
    n2.kill()
    n1.join = None
    n1.options["new_cluster"] = True
    n1.start()
    view = n1.cluster_view()
    assert [n["id"] for n in view["nodes"]] == [n1.node_id]
    assert view["cluster_id"] != old_id and raft_voters(n1) == {f"{n1.host}:{n1.raft_port}"}
    assert "dropping the stored membership" in n1.log_tail(200)


def test_a_node_back_with_a_new_address_replaces_its_voter(cluster):
    n1, n2, n3 = cluster.nodes
    old = f"{n3.host}:{n3.raft_port}"
    n3.stop()
    n3.cluster_port = free_port_pair()
    n3.raft_port = n3.cluster_port + 1
    n3.join = None  # its stored members are enough
    n3.start()
    cluster.wait_formed()
    want = assert_voters_are_the_members(cluster.nodes)
    assert old not in want and f"{n3.host}:{n3.raft_port}" in want


def test_a_whole_cluster_back_with_new_addresses_re_forms(cluster):
    """Every pod of a StatefulSet recreated at once: all come back with new addresses,
    their --join names (here: the new addresses) and their stored membership. They
    re-form by node id, with the new addresses as the voters, and keep the sessions."""
    n1, n2, n3 = cluster.nodes
    cid = park_session(n2, "na")
    for node in cluster.nodes:
        node.kill()
    for node in cluster.nodes:
        node.cluster_port = free_port_pair()
        node.raft_port = node.cluster_port + 1
    for node in cluster.nodes:
        node.join = ",".join(n.address for n in cluster.nodes)  # as the StatefulSet's args
    took = cluster.start_together(cluster.nodes)
    print(f"\nre-formed at new addresses in {took:.1f} s")
    assert_voters_are_the_members(cluster.nodes)
    c = n1.raw(5)
    ack = c.connect(cid, clean_start=False, properties=EXPIRY)
    assert ack.session_present is True
    c.close()


def _new_nodes(cluster, n: int, **options) -> list[ClusterNodeProcess]:
    return [ClusterNodeProcess(cluster.workdir, f"n{i + 1}", cluster.secret, cluster.name,
                               options=options) for i in range(n)]


def test_three_nodes_started_at_once_with_the_same_join_list_form_one_cluster(
        cluster_factory):
    cluster = cluster_factory(0)
    nodes = _new_nodes(cluster, 3)
    seeds = ",".join(n.address for n in nodes)
    for node in nodes:
        node.join = seeds
    took = cluster.start_together(nodes, timeout=15.0)
    print(f"\nformed in {took:.1f} s")
    assert took < 15.0
    assert_voters_are_the_members(nodes)


def test_bootstrap_expect_with_a_chain_of_seeds(cluster_factory):
    """n1 knows only n2, n2 only n3, n3 only n1: the candidates spread with the answers."""
    cluster = cluster_factory(0)
    nodes = _new_nodes(cluster, 3, bootstrap_expect=3)
    for i, node in enumerate(nodes):
        node.join = nodes[(i + 1) % 3].address
    took = cluster.start_together(nodes, timeout=20.0)
    print(f"\nformed in {took:.1f} s")
    assert_voters_are_the_members(nodes)


def test_joins_arriving_together_are_queued(cluster_factory):
    cluster = cluster_factory(1)
    seed = cluster.node(1).address
    nodes = [ClusterNodeProcess(cluster.workdir, f"n{i}", cluster.secret, cluster.name,
                                join=seed) for i in (2, 3, 4)]
    took = cluster.start_together(nodes, timeout=30.0)
    print(f"\nthree joins done in {took:.1f} s")
    assert_voters_are_the_members(cluster.nodes)


EVACUATED = int(os.environ.get("SHOAL_TEST_EVACUATED", "1000"))  # 10000: the scale trial


def test_leave_with_1000_offline_sessions_moves_them_all(cluster):
    """The leaving node hands its offline sessions to the other nodes (evenly); their
    clients resume elsewhere with session present = 1 and their queued messages."""
    from concurrent.futures import ThreadPoolExecutor

    n1, n2, n3 = cluster.nodes
    t = uid()
    ids = [f"ev-{t}-{i}" for i in range(EVACUATED)]

    def park(chunk: list[str]) -> None:
        c = None
        for cid in chunk:
            c = n3.raw(5)
            c.connect(cid, clean_start=True, properties=EXPIRY)
            c.subscribe(f"ev/{t}/all", 1)
            c.disconnect()
            c.close()
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(park, [ids[i::4] for i in range(4)]))
    print(f"\n{EVACUATED} persistent sessions made on n3 in {time.monotonic() - t0:.1f} s")
    pub = n1.raw(5)
    pub.connect(f"ev-pub-{t}")
    wait_for(lambda: (n1.session_view(ids[-1]) or {}).get("holder") == n3.node_id, 10.0)
    for k in range(3):
        pub.publish(f"ev/{t}/all", f"m{k}".encode(), qos=1)
    wait_for(lambda: n3.api(f"/api/v1/sessions/{ids[-1]}")[1].get("queued") == 3, 10.0,
             message=lambda: f"3 queued: {n3.api(f'/api/v1/sessions/{ids[-1]}')}")

    t0 = time.monotonic()
    r = shoal_cli("cluster", "leave", "--admin", n3.admin_url, timeout=180)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"leave moved {answer['sessions_moved']} sessions in {took:.1f} s "
          f"(node: {answer['seconds']} s)")
    assert answer["sessions_moved"] == EVACUATED and answer["sessions_not_moved"] == 0, answer
    held = Counter((n1.session_view(cid) or {}).get("holder") for cid in ids[::10])
    assert set(held) == {n1.node_id, n2.node_id}, held
    assert min(held.values()) >= 0.35 * sum(held.values()), f"not spread evenly: {held}"
    n3.stop()
    want = [b"m0", b"m1", b"m2"]

    def resume(chunk: list[tuple[int, str]]) -> list[str]:
        bad = []
        for i, cid in chunk:
            node = (n1, n2)[i % 2]
            c = node.raw(5)
            ack = c.connect(cid, clean_start=False, properties=EXPIRY, expect_success=False)
            if ack.reason_code != 0 or not ack.session_present:
                bad.append(f"{cid}: {ack}")
                c.close()
                continue
            got = []
            for _ in range(3):
                p = c.recv(10.0)
                got.append(p.payload)
                c.send(Puback(p.packet_id))
            if got != want:
                bad.append(f"{cid}: got {got}")
            c.disconnect()
            c.close()
        return bad
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        bad = [b for part in pool.map(resume, [list(enumerate(ids))[i::4] for i in range(4)])
               for b in part]
    print(f"{EVACUATED} clients resumed on n1/n2 in {time.monotonic() - t0:.1f} s")
    assert not bad, f"{len(bad)} resumes wrong, e.g. {bad[:5]}"
