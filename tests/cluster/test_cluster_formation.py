"""Issue 3, acceptance 1: nodes form one cluster, through ``--join`` and through mDNS, and
every node shows the same membership and the same leader in ``GET /api/v1/cluster``."""

from __future__ import annotations

import uuid

import pytest

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _summary(view: dict) -> list:
    """What must be identical on every node: each member's id, addresses, role, status."""
    return sorted((n["id"], tuple(sorted((n.get("addresses") or {}).items())), n["role"],
                   n["status"]) for n in view["nodes"])


def check_one_cluster(cluster, nodes) -> dict:
    """Every node in ``nodes`` lists exactly them, all up, one leader, and the same view;
    the addresses are the ones the nodes were started with."""
    views = cluster.wait_formed(nodes)
    ids = {n.node_id for n in nodes}
    assert set(views) == ids
    first = next(iter(views.values()))
    leader = first["leader"]
    assert leader in ids
    for node_id, view in views.items():
        assert view["node_id"] == node_id
        assert view["cluster"] == cluster.name, view["cluster"]
        assert view["leader"] == leader, (node_id, view["leader"], leader)
        assert view["has_quorum"] is True, (node_id, view)
        assert {n["id"] for n in view["nodes"]} == ids, (node_id, view["nodes"])
        assert all(n["status"] == "up" for n in view["nodes"]), (node_id, view["nodes"])
        roles = {n["id"]: n["role"] for n in view["nodes"]}
        assert [i for i, r in roles.items() if r == "leader"] == [leader], (node_id, roles)
        assert all(r == "follower" for i, r in roles.items() if i != leader), roles
    # identical view on every node (the leader may change between two reads: retry until
    # one consistent snapshot, which the cluster must reach)
    wait_for(lambda: len({repr(_summary(v)) for v in cluster.views(nodes).values()}) == 1,
             10.0, interval=0.1,
             message=lambda: "identical views: " + repr(
                 {k: _summary(v) for k, v in cluster.views(nodes).items()}))
    for node in nodes:
        listed = next(n for n in first["nodes"] if n["id"] == node.node_id)
        addrs = listed["addresses"]
        assert addrs["mqtt"] == f"127.0.0.1:{node.port}", addrs
        assert addrs["admin"].endswith(f":{node.admin_port}"), addrs
        assert addrs["transport"] == f"127.0.0.1:{node.cluster_port}", addrs
        assert addrs["raft"] == f"127.0.0.1:{node.raft_port}", addrs
    return views


def test_three_nodes_join_into_one_cluster(cluster_factory):
    cluster = cluster_factory(0)
    n1 = cluster.add_node(join=False)
    n2 = cluster.add_node(join=n1.address)
    n3 = cluster.add_node(join=n2.address)  # any running member works as a seed
    views = check_one_cluster(cluster, [n1, n2, n3])
    leader = next(iter(views.values()))["leader"]
    print(f"\n3 nodes formed, leader {leader}, term {views[leader]['term']}")


def test_three_nodes_find_each_other_by_mdns_on_loopback(cluster_factory):
    """``--discovery mdns`` without ``--join``: the three nodes start together and find
    each other with zeroconf on the loopback interface (multicast works on lo here)."""
    cluster = cluster_factory(0, id_prefix=f"m{uuid.uuid4().hex[:6]}-")
    nodes = [cluster.add_node(join=False, wait=False, discovery="mdns") for _ in range(3)]
    for node in nodes:
        wait_for(node._ready, 45.0, interval=0.1,
                 message=lambda node=node: f"{node.node_id} ready\n{node.log_tail()}")
    check_one_cluster(cluster, nodes)


def test_a_node_started_later_finds_the_cluster_by_mdns(cluster_factory):
    """A node with ``--discovery mdns`` and no seed joins a cluster that is already
    running (discovered through its members' mDNS announcements)."""
    cluster = cluster_factory(0, id_prefix=f"m{uuid.uuid4().hex[:6]}-")
    n1 = cluster.add_node(join=False, discovery="mdns")
    n2 = cluster.add_node(join=False, discovery="mdns")
    check_one_cluster(cluster, [n1, n2])
    n3 = cluster.add_node(join=False, discovery="mdns")
    check_one_cluster(cluster, [n1, n2, n3])
