"""The Raft routing table: three real pysyncobj nodes (threads, loopback sockets) in one
event loop; every node's view agrees, claims are ordered with increasing epochs, holders
follow the takeover rules, and batching carries thousands of claims per entry."""

import asyncio
import socket
import time

import pytest

from cluster.routing import RaftNode, RoutingView


def free_pair_ports(n):
    """n ports that are free now (each node binds exactly one)."""
    ports, socks = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


async def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def cluster3():
    loop = asyncio.new_event_loop()
    addrs = [f"127.0.0.1:{p}" for p in free_pair_ports(3)]
    views = [RoutingView() for _ in addrs]
    nodes = [RaftNode(a, [b for b in addrs if b != a], "test-secret", "127.0.0.1", v, loop)
             for a, v in zip(addrs, views)]
    yield loop, nodes, views
    for n in nodes:
        n.destroy()
    loop.close()


def test_claims_are_ordered_and_every_view_agrees(cluster3):
    loop, nodes, views = cluster3

    async def scenario():
        await wait_until(lambda: any(n.status()["is_leader"] for n in nodes))
        e1, holder1 = await nodes[0].run(("claim", "x", "n1", False), 5)
        assert holder1 is None  # a new ClientID: the claimer holds it
        e2, holder2 = await nodes[1].run(("claim", "x", "n2", False), 5)
        assert e2 > e1 and holder2 == "n1"  # n2 must take the session from n1
        assert await nodes[1].run(("moved", "x", e2, "n1", "n2"), 5) is True
        assert not await nodes[0].run(("release", "x", "n1", e1), 5)  # n1 no longer anything
        e3, holder3 = await nodes[2].run(("claim", "x", "n3", True), 5)
        assert holder3 == "n2"  # clean start: n3 holds a new session at once
        await wait_until(lambda: all(v.owners.get("x") == ("n3", e3) for v in views))
        assert all(v.holders.get("x") == "n3" for v in views)
        assert await nodes[2].run(("release", "x", "n3", e3), 5) is True
        await wait_until(lambda: all("x" not in v.owners and "x" not in v.holders
                                     for v in views))

    loop.run_until_complete(scenario())


def test_routes_and_members_replicate(cluster3):
    loop, nodes, views = cluster3

    async def scenario():
        await wait_until(lambda: any(n.status()["is_leader"] for n in nodes))
        await nodes[0].run(("member", "n1", {"raft": "a"}), 5)
        await nodes[1].run(("routes", "n1", ["a/#", "$share/g/t"], []), 5)
        await nodes[2].run(("routes", "n2", ["a/#"], []), 5)
        await nodes[2].run(("routes", "n1", [], ["a/#"]), 5)
        await wait_until(lambda: all(v.routes == {"a/#": {"n2"}, "$share/g/t": {"n1"}}
                                     for v in views))
        await nodes[0].run(("member", "n1", None), 5)  # removing a node drops its routes
        await wait_until(lambda: all(v.routes == {"a/#": {"n2"}} and not v.members
                                     for v in views))

    loop.run_until_complete(scenario())


def test_operations_submitted_together_share_one_entry(cluster3):
    loop, nodes, views = cluster3

    async def scenario():
        await wait_until(lambda: any(n.status()["is_leader"] for n in nodes))
        before = nodes[0].commits
        results = await asyncio.gather(*(nodes[0].submit(("claim", f"c{i}", "n1", True))
                                         for i in range(2000)))
        assert nodes[0].commits - before == 1
        epochs = [r[0] for r in results]
        assert epochs == sorted(epochs) and len(set(epochs)) == 2000
        await wait_until(lambda: all(len(v.owners) == 2000 for v in views))

    loop.run_until_complete(scenario())


def test_restarted_voters_keep_their_log_and_term(tmp_path):
    """With a log directory, a voter's Raft node comes back with what it acknowledged:
    two of three restarted while the third stays gone re-form a quorum and apply the
    committed entries from their own logs, in a term past the old one (voters that forgot
    their logs would start empty: a stale node could be elected and committed entries
    lost)."""
    loop = asyncio.new_event_loop()
    addrs = [f"127.0.0.1:{p}" for p in free_pair_ports(3)]
    dirs = [tmp_path / f"n{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    views = [RoutingView() for _ in addrs]
    nodes = [RaftNode(a, [b for b in addrs if b != a], "test-secret", "127.0.0.1", v, loop,
                      log_dir=str(d)) for a, v, d in zip(addrs, views, dirs)]
    try:
        async def commit():
            await wait_until(lambda: any(n.status()["is_leader"] for n in nodes))
            for i in range(50):
                await nodes[i % 3].run(("claim", f"c{i}", "n1", True), 5)
            await wait_until(lambda: all(len(v.owners) == 50 for v in views))
            return max(n.status()["term"] for n in nodes)

        term = loop.run_until_complete(commit())
        for n in nodes:
            n.destroy_and_wait()
        # n2 and n3 again, n1 gone for good: what they know comes from their own files
        views = [RoutingView(), RoutingView()]
        nodes = [RaftNode(addrs[i], [b for b in addrs if b != addrs[i]], "test-secret",
                          "127.0.0.1", views[i - 1], loop, log_dir=str(dirs[i]))
                 for i in (1, 2)]

        async def replayed():
            await wait_until(lambda: any(n.status()["is_leader"] for n in nodes))
            await wait_until(lambda: all(len(v.owners) == 50 for v in views))
            assert max(n.status()["term"] for n in nodes) > term  # (the leader's)
            e, _holder = await nodes[0].run(("claim", "after", "n2", True), 5)
            assert e == 51  # the epoch counter went on from the replayed table
            want = sorted([f"c{i}" for i in range(50)] + ["after"])
            await wait_until(lambda: all(sorted(v.owners) == want for v in views))

        loop.run_until_complete(replayed())
    finally:
        for n in nodes:
            n.destroy()
        loop.close()


def test_a_move_records_the_replicas_the_new_holder_seeded():
    from cluster.routing import Tables, apply
    t = Tables()
    for n in ("n1", "n2", "n3"):
        apply(t, ("member", n, {"raft": n}))
    apply(t, ("claim", "x", "n1", True))
    epoch, holder = apply(t, ("claim", "x", "n2", False))[0]
    assert holder == "n1"
    # n3 stored the seed before the move was proposed; n2 itself and unknown nodes are not
    ok = apply(t, ("moved", "x", epoch, "n1", "n2", ["n3", "n2", "n9"]))[0]
    assert ok and t.holders["x"] == "n2" and t.replicas["x"] == ["n3"]
    # a move without replicas (an older entry) leaves the new holder without any
    epoch2 = apply(t, ("claim", "x", "n3", False))[0][0]
    assert apply(t, ("moved", "x", epoch2, "n2", "n3"))[0]
    assert "x" not in t.replicas
    # each node it left by a hand-over: that move's epoch and the replicas fed then (their
    # copies hold what the hand-over had not delivered yet)
    assert t.handed_from["x"] == {"n1": (epoch, ()), "n2": (epoch2, ("n3",))}
    assert t.copy().handed_from == t.handed_from
    apply(t, ("release", "x", "n3", epoch2))
    assert "x" not in t.handed_from
