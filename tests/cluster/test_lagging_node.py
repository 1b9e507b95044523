"""A node that lags behind a Raft log compaction (stopped, or cut off in a partition) is
brought up to date with a snapshot of the routing table, not with the entries it missed:
the ``moved`` events of the hand-overs that happened meanwhile never reach it, so it sends
no barriers for them. It tells every node that it has switched to the new routes instead
(cluster/takeover.py ``on_reset``): their hand-overs complete. (Before, the old holders
kept waiting for its barriers until it restarted, holding the messages it had forwarded
meanwhile; the 10-minute fault soak lost 6 messages and reordered 156 that way.)"""

from __future__ import annotations

import signal
import uuid

import pytest

from support import Prop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EXPIRY = {Prop.SESSION_EXPIRY_INTERVAL: 600}
HOPS = 6


def test_hand_overs_held_up_by_a_lagging_node_complete_once_a_snapshot_updates_it(
        cluster_factory):
    # compact after 10 entries: six hand-overs (claim, routes, moved each) are enough; a
    # hop waits barrier_timeout + 1 s for the previous one, held up by the stopped node
    cluster = cluster_factory(3, raft_compaction_entries=10, raft_compaction_seconds=0.1,
                              barrier_timeout=0.5)
    leader = cluster.leader()
    lagging = next(n for n in cluster.nodes if n is not leader)
    x, y = [n for n in cluster.nodes if n is not lagging]
    cid = f"lag-{uuid.uuid4().hex[:8]}"
    first = x.raw(5)
    first.connect(cid, clean_start=False, properties=EXPIRY)
    first.subscribe(f"lag/{cid}/#", qos=1)
    first.disconnect()

    def takeovers(node):
        return node.api("/api/v1/cluster")[1]["takeovers"]

    lagging.kill(signal.SIGSTOP)
    try:
        for i in range(HOPS):
            node = (y, x)[i % 2]
            raw = node.raw(5)
            assert raw.connect(cid, clean_start=False, properties=EXPIRY).session_present, \
                f"hop {i} to {node.node_id}: session present = 0"
            raw.disconnect()
        holder, old = (y, x) if HOPS % 2 else (x, y)
        # the hand-over waits for the stopped node's barrier
        assert takeovers(old)["outgoing"] == 1 and takeovers(holder)["incoming"] == 1, \
            (takeovers(old), takeovers(holder))
    finally:
        lagging.kill(signal.SIGCONT)
    wait_for(lambda: "barriers for every hand-over sent" in lagging.log_path.read_text(), 15,
             message="the lagging node updated by a Raft snapshot")
    wait_for(lambda: takeovers(old)["outgoing"] == 0 and takeovers(holder)["incoming"] == 0,
             10, message=lambda: f"the hand-over complete: old holder {takeovers(old)}, "
                                 f"holder {takeovers(holder)}")
    again = holder.raw(5)
    assert again.connect(cid, clean_start=False, properties=EXPIRY).session_present
