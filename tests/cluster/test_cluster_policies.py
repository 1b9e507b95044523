"""Issue 3, membership and failure policies with real faults (kill -9 of real node
processes): `shoal cluster leave`, an unreachable session holder (policies `fresh` and
`refuse`), and a node left in a Raft minority (claims refused; clean sessions accepted
only with --minority-clean-sessions)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from support import REPO_ROOT, Disconnect, Prop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SERVER_UNAVAILABLE = 0x88
USE_ANOTHER_SERVER = 0x9C


def uid() -> str:
    return uuid.uuid4().hex[:8]


def persistent_session_on(node, cid: str, topic: str) -> None:
    c = node.raw(5)
    c.connect(cid, clean_start=True, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    c.subscribe(topic, 1)
    c.disconnect()
    wait_for(lambda: (node.session_view(cid) or {}).get("connected") is False, 5.0,
             message=f"{cid} offline on {node.node_id}")


@pytest.mark.parametrize("policy", ["fresh", "refuse"])
def test_unreachable_holder_follows_the_policy(cluster_factory, policy):
    cluster = cluster_factory(3, takeover_timeout=2, unreachable_owner=policy)
    holder, other = cluster.node(1), cluster.node(2)
    cid = f"un-{uid()}"
    persistent_session_on(holder, cid, f"un/{cid}")
    holder.kill()  # kill -9: it never answers the snapshot request
    c = other.raw(5)
    t0 = time.monotonic()
    ack = c.connect(cid, clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 300},
                    expect_success=False)
    waited = time.monotonic() - t0
    if policy == "fresh":
        # a new session, and the client is told: never "present" for a session not taken
        assert ack.reason_code == 0 and ack.session_present is False
        assert "previous session lost" in ack.properties.get(Prop.REASON_STRING, "")
        # the new session is held here once the hand-over record ("moved") is committed
        wait_for(lambda: (other.session_view(cid) or {}).get("holder") == other.node_id, 10.0,
                 message=lambda: f"holder {other.node_id}: {other.session_view(cid)}")
        assert other.session_view(cid)["owner"] == other.node_id
    else:
        assert ack.reason_code == SERVER_UNAVAILABLE
    assert 1.5 <= waited <= 10.0, f"waited {waited:.1f}s for a takeover_timeout of 2s"


def test_minority_refuses_claims_unless_clean_sessions_are_allowed(cluster_factory):
    strict = cluster_factory(3, takeover_timeout=1)
    lenient = cluster_factory(3, takeover_timeout=1, minority_clean_sessions=True)
    for cluster, allows_clean in ((strict, False), (lenient, True)):
        survivor = cluster.node(3)
        cluster.node(1).kill()
        cluster.node(2).kill()
        wait_for(lambda: (cluster.views([survivor]).get(survivor.node_id) or {})
                 .get("has_quorum") is False, 10.0, message="survivor without quorum")
        persistent = survivor.raw(5).connect(
            f"mi-p-{uid()}", clean_start=False,
            properties={Prop.SESSION_EXPIRY_INTERVAL: 60}, expect_success=False)
        assert persistent.reason_code == SERVER_UNAVAILABLE  # no ownership decision here
        clean = survivor.raw(5).connect(f"mi-c-{uid()}", clean_start=True,
                                        expect_success=False)
        assert clean.reason_code == (0 if allows_clean else SERVER_UNAVAILABLE)


def test_cluster_leave_moves_sessions_and_removes_the_node(cluster):
    leaving, stays = cluster.node(3), cluster.node(1)
    cid = f"lv-{uid()}"
    c = leaving.raw(5)
    c.connect(cid, clean_start=True, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    c.subscribe(f"lv/{cid}", 1)
    cmd = [sys.executable, "-m", "cluster", "cluster", "leave", "--admin", leaving.admin_url]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # the node asks its clients to use another server ...
    p = c.recv(10.0)
    assert isinstance(p, Disconnect) and p.reason_code == USE_ANOTHER_SERVER
    # ... and the client's session moves with it
    c2 = stays.raw(5)
    ack = c2.connect(cid, clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    assert ack.session_present is True
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"left": true' in out and '"sessions_not_moved": 0' in out
    wait_for(lambda: leaving.node_id not in {
        n["id"] for n in (cluster.views([stays]).get(stays.node_id) or {}).get("nodes", [])},
        15.0, message="the node gone from the routing table")
    view = stays.session_view(cid)
    assert view["holder"] == stays.node_id and view["here"] is True
