"""A 3-node cluster with logins, an ACL file and the ClientID binding switched on: every
client here logs in, and the rules hold cluster-wide (checked on the node the client is
connected to; the session's user travels with it when it moves)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO_ROOT, Puback, Publish, Suback, Subscribe, Subscription, wait_for

from conftest import Cluster

ACL = """\
user alice
topic readwrite alice/#
topic deny alice/secret/#
user bob
topic readwrite bob/#
topic read alice/#
topic write alice/secret/#
pattern readwrite devices/%c/#
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    d = tmp_path_factory.mktemp("secured-cluster")
    users = d / "passwd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    for user in ("alice", "bob"):
        r = subprocess.run([sys.executable, "-m", "cluster", "passwd", "-b", str(users), user,
                            f"{user}-pw"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    acl = d / "acl"
    acl.write_text(ACL)
    c = Cluster(d, password_file=str(users), acl_file=str(acl), bind_client_id=True)
    try:
        c.start(3)
        yield c
    finally:
        c.stop()


def login(node, client_id: str, user: str, version: int = 5, **kw):
    client = node.raw(version=version)
    client.connect(client_id, username=user, password=f"{user}-pw".encode(), **kw)
    return client


def suback_codes(client, *filters: str) -> list[int]:
    pid = client.next_id()
    client.send(Subscribe(pid, [Subscription(f, 1) for f in filters], {}))
    return list(client.await_packet(lambda p: isinstance(p, Suback) and p.packet_id == pid,
                                    f"SUBACK {pid}").reason_codes)


def puback_code(client, topic: str, payload: bytes) -> int:
    pid = client.next_id()
    client.send(Publish(topic, payload, 1, False, False, pid, {}))
    return client.await_packet(lambda p: isinstance(p, Puback) and p.packet_id == pid,
                               f"PUBACK {pid}").reason_code


def payloads(client, window: float = 0.7) -> list[bytes]:
    return [p.payload for p in client.recv_nothing_for(window) if isinstance(p, Publish)]


def test_anonymous_and_wrong_passwords_are_refused_on_every_node(secured):
    for node in secured.running():
        assert node.raw(version=5).connect("x", expect_success=False).reason_code == 0x87
        assert node.raw(version=4).connect("x", expect_success=False, username="alice",
                                           password=b"nope").reason_code == 4


def test_rules_hold_for_a_publisher_on_n1_and_a_subscriber_on_n2(secured):
    n1, n2 = secured.node(1), secured.node(2)
    bob = login(n2, "acl-bob-sub", "bob")
    assert suback_codes(bob, "alice/#", "devices/acl-bob-sub/#", "devices/other/#") == \
        [1, 1, 0x87]
    alice = login(n1, "acl-alice-pub", "alice")
    assert puback_code(alice, "alice/one", b"1") == 0
    assert puback_code(alice, "bob/inbox", b"2") == 0x87
    assert puback_code(alice, "$SYS/x", b"3") == 0x87
    assert payloads(bob) == [b"1"]
    # a deny rule inside a granted subscription, across nodes: bob writes, alice does not get
    watcher = login(n2, "acl-alice-sub", "alice")
    assert suback_codes(watcher, "alice/#") == [1]
    writer = login(n1, "acl-bob-pub", "bob", version=4)
    assert puback_code(writer, "alice/secret/k", b"s") == 0
    assert puback_code(alice, "alice/two", b"t") == 0
    assert payloads(watcher) == [b"t"]


def test_a_moved_session_keeps_its_user_and_its_binding(secured):
    n1, n2, n3 = secured.node(1), secured.node(2), secured.node(3)
    alice = login(n1, "acl-dev-7", "alice", clean_start=False, properties={0x11: 600})
    assert suback_codes(alice, "alice/#") == [1]
    # bob cannot take her ClientID on another node: refused, her client stays connected
    for node, version, code in ((n2, 5, 0x87), (n3, 4, 5)):
        thief = node.raw(version=version)
        assert thief.connect("acl-dev-7", expect_success=False, username="bob",
                             password=b"bob-pw").reason_code == code
    alice.ping()
    alice.disconnect()
    bob = login(n2, "acl-bob-writer", "bob")
    assert puback_code(bob, "alice/secret/x", b"hidden") == 0
    other = login(n2, "acl-alice-writer", "alice")
    assert puback_code(other, "alice/news", b"queued") == 0
    # she comes back on n3: the session moves there with its queue and its user
    back = n3.raw(version=5)
    ack = back.connect("acl-dev-7", username="alice", password=b"alice-pw",
                       clean_start=False, properties={0x11: 600})
    assert ack.session_present == 1
    got = [p for p in back.recv_nothing_for(1.0) if isinstance(p, Publish)]
    assert [p.payload for p in got] == [b"queued"]
    for p in got:
        back.send(Puback(p.packet_id))
    wait_for(lambda: (n3.session_view("acl-dev-7") or {}).get("user") == "alice", 10.0,
             message="the session's user on n3")
    # still bound to alice on every node after the move
    thief = n1.raw(version=5)
    assert thief.connect("acl-dev-7", expect_success=False, username="bob",
                         password=b"bob-pw").reason_code == 0x87
    back.ping()
