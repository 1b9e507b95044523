"""What a logged-in client may do: the ACL file (Mosquitto's format), the ClientID binding,
TLS certificates as logins, the login plugin, and listeners switched off. Real node
processes, real clients (the socket client for the reason codes, paho for delivery)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from support import (LIVE_NODES, REPO_ROOT, BrokerProcess, Puback, Publish, Suback, Subscribe,
                     Subscription, free_port, http_json, wait_for)

pytestmark = pytest.mark.shoal_only("Shoal's own authorization options")

ACL = """\
# anonymous clients: read the public topics
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic readwrite $SYS/#

user bob
topic readwrite bob/#
topic read alice/#
topic write alice/secret/#

# every client: its own device topics
pattern readwrite devices/%c/#
pattern read users/%u/inbox
"""


def passwd(path, user: str, password: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", "cluster", "passwd", "-b", str(path), user,
                             password], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def files(tmp_path):
    users = tmp_path / "passwd"
    for user in ("alice", "bob"):
        passwd(users, user, f"{user}-pw")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return users, acl


@pytest.fixture
def acl_node(start_node, files):
    users, acl = files
    return start_node(password_file=users, acl_file=acl, allow_anonymous="true")


def login(node, client_id: str, user: str | None, version: int = 5, **kw):
    client = node.raw(version=version)
    creds = {} if user is None else {"username": user, "password": f"{user}-pw".encode()}
    client.connect(client_id, **creds, **kw)
    return client


def metrics(node) -> str:
    status, text = http_json("GET", f"http://{node.host}:{node.admin_port}/metrics")
    assert status == 200
    return text


def suback_codes(client, *filters: str) -> list[int]:
    pid = client.next_id()
    client.send(Subscribe(pid, [Subscription(f, 1) for f in filters], {}))
    ack = client.await_packet(lambda p: isinstance(p, Suback) and p.packet_id == pid,
                              f"SUBACK {pid}")
    return list(ack.reason_codes)


def puback_code(client, topic: str, payload: bytes = b"x") -> int:
    pid = client.next_id()
    client.send(Publish(topic, payload, 1, False, False, pid, {}))
    return client.await_packet(lambda p: isinstance(p, Puback) and p.packet_id == pid,
                               f"PUBACK {pid}").reason_code


def received(client, window: float = 0.5) -> list[tuple[str, bytes]]:
    """The PUBLISHes that arrive within ``window`` seconds (a bounded observation)."""
    return [(p.topic, p.payload) for p in client.recv_nothing_for(window)
            if isinstance(p, Publish)]


def test_subscriptions_get_0x87_or_0x80_where_the_acl_grants_no_read(acl_node):
    alice = login(acl_node, "alice-1", "alice")
    # granted: her own tree, a part of it, her device topics by %c; refused: bob's tree,
    # `#` (wider than any grant), the denied subtree itself
    assert suback_codes(alice, "alice/#", "alice/+/status", "devices/alice-1/#", "bob/#", "#",
                        "alice/secret/#") == [1, 1, 1, 0x87, 0x87, 0x87]
    assert suback_codes(alice, "$share/g/alice/jobs") == [1]
    assert suback_codes(alice, "$share/g/bob/jobs") == [0x87]
    bob = login(acl_node, "bob-1", "bob", version=4)
    assert suback_codes(bob, "alice/#", "devices/alice-1/#", "devices/bob-1/x") == \
        [1, 0x80, 1]
    anon = login(acl_node, "anon-1", None)
    assert suback_codes(anon, "public/news", "users/+/inbox", "alice/#") == [1, 0x87, 0x87]
    # %u: bob's own inbox only
    assert suback_codes(bob, "users/bob/inbox", "users/alice/inbox") == [1, 0x80]


def test_publishes_the_acl_does_not_allow_are_not_routed(acl_node):
    bob = login(acl_node, "bob-reader", "bob")
    assert suback_codes(bob, "alice/#", "bob/#") == [1, 1]
    alice = login(acl_node, "alice-w", "alice")
    assert puback_code(alice, "alice/ok", b"1") == 0
    assert puback_code(alice, "bob/inbox", b"2") == 0x87      # no write grant
    assert puback_code(alice, "$SYS/broker/x", b"3") == 0x87  # `$` topics: never, grant or not
    assert puback_code(alice, "devices/alice-w/up", b"4") == 0x10  # (routed: nobody there)
    assert puback_code(alice, "devices/other/up", b"5") == 0x87
    # 3.1.1 has no code for it: acknowledged and dropped, as Mosquitto does
    alice4 = login(acl_node, "alice-w4", "alice", version=4)
    assert puback_code(alice4, "bob/inbox", b"6") == 0
    assert sorted(received(bob)) == [("alice/ok", b"1")]
    text = metrics(acl_node)
    assert int(re.search(r"^shoal_publishes_refused_total(?:\{[^}]*\})? (\d+)", text, re.M)[1]) >= 4


def test_a_deny_rule_inside_a_granted_subscription_filters_each_message(acl_node):
    alice = login(acl_node, "alice-sub", "alice")
    assert suback_codes(alice, "alice/#") == [1]
    bob = login(acl_node, "bob-pub", "bob")
    writer = login(acl_node, "alice-pub", "alice")
    assert puback_code(writer, "alice/open", b"a") == 0
    # (she may not read it, and a deny rule denies writing too)
    assert puback_code(writer, "alice/secret/key", b"s") == 0x87
    assert puback_code(bob, "alice/secret/drop", b"d") == 0  # bob may write there
    assert received(alice) == [("alice/open", b"a")]
    assert puback_code(bob, "alice/x", b"b") == 0x87  # bob reads alice/#, cannot write it
    text = metrics(acl_node)
    assert int(re.search(r"^shoal_deliveries_refused_total(?:\{[^}]*\})? (\d+)", text, re.M)[1]) >= 1


def test_a_will_on_a_topic_the_client_cannot_write_is_refused_at_connect(acl_node):
    bob = acl_node.raw(version=5)
    ack = bob.connect("bob-will", expect_success=False, username="bob", password=b"bob-pw",
                      will_topic="alice/status", will_payload=b"gone")
    assert ack.reason_code == 0x87
    ok = acl_node.raw(version=5)
    assert ok.connect("bob-will", username="bob", password=b"bob-pw",
                      will_topic="bob/status", will_payload=b"gone").reason_code == 0


def test_reload_applies_new_rules_and_removes_subscriptions_they_no_longer_allow(acl_node,
                                                                               files):
    _users, acl = files
    bob = login(acl_node, "bob-r", "bob")
    assert suback_codes(bob, "alice/#") == [1]
    writer = login(acl_node, "alice-r", "alice")
    assert puback_code(writer, "alice/before", b"1") == 0
    assert received(bob) == [("alice/before", b"1")]
    acl.write_text(ACL.replace("topic read alice/#", "topic read carol/#"))
    acl_node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "subscriptions_removed=1" in acl_node.log_tail(100), 10.0, interval=0.1,
             message="the reload in the log")
    assert puback_code(writer, "alice/after", b"2") == 0x10  # (no subscriber left)
    assert received(bob) == []
    assert suback_codes(bob, "alice/#", "carol/x") == [0x87, 1]
    # a broken file is refused, the rules loaded before stay (through the admin API too)
    acl.write_text("topic sideways x\n")  # (not an access word: refused)
    status, body = http_json("POST", f"http://{acl_node.host}:{acl_node.admin_port}"
                                     "/api/v1/auth/reload")
    assert status == 400 and "line 1" in body["error"], (status, body)
    assert suback_codes(bob, "carol/y") == [1]


def test_a_bound_client_id_is_refused_to_another_user_and_its_client_stays(start_node, files):
    users, acl = files
    node = start_node(password_file=users, bind_client_id=True)
    alice = login(node, "device-42", "alice", clean_start=False,
                  properties={0x11: 3600})
    for version, code in ((5, 0x87), (4, 5)):
        thief = node.raw(version=version)
        ack = thief.connect("device-42", expect_success=False, username="bob",
                            password=b"bob-pw", clean_start=True)
        assert ack.reason_code == code
    alice.ping()  # still connected: nobody took the ClientID
    # its owner comes back from elsewhere: allowed, the session is there
    again = node.raw(version=5)
    assert again.connect("device-42", username="alice", password=b"alice-pw",
                         clean_start=False).session_present == 1


def test_tls_certificate_common_name_is_the_username(start_node, files, tmp_path):
    trustme = pytest.importorskip("trustme")
    users, acl = files
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("alice.devices.test", common_name="alice")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "ccert", "ckey")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.private_key_pem.write_to_path(str(paths["ckey"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    for i, blob in enumerate(client.cert_chain_pems):
        blob.write_to_path(str(paths["ccert"]), append=i > 0)
    tls_port = free_port()
    node = start_node(password_file=users, acl_file=acl, tls_port=tls_port,
                      tls_cert=paths["cert"], tls_key=paths["key"], tls_ca=paths["ca"],
                      tls_identity_as_username=True)
    tls = {"ca_certs": str(paths["ca"]), "certfile": str(paths["ccert"]),
           "keyfile": str(paths["ckey"])}
    # no username, no password: the certificate says "alice", her ACL applies
    dev = node.paho("cert-dev", 5, port=tls_port, tls=tls)
    dev.subscribe("alice/#", qos=1)
    with pytest.raises(AssertionError, match=r"refused: \[135\]"):
        dev.subscribe("bob/#", qos=1)
    dev.publish("alice/hello", b"from the cert", qos=1)
    assert dev.wait_messages(1)[0].payload == b"from the cert"
    # a TLS client without a certificate: the usual login (anonymous refused here)
    with pytest.raises(AssertionError, match="CONNACK reason 0x87"):
        node.paho("no-cert", 5, port=tls_port, tls={"ca_certs": str(paths["ca"])})
    # on the plaintext listener a username is only a claim: the password is checked
    assert node.raw(version=5).connect("plain", expect_success=False,
                                       username="alice").reason_code == 0x86


def test_an_auth_plugin_decides_and_names_the_user(start_node, files, tmp_path, monkeypatch):
    users, acl = files
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "shoal_test_login.py").write_text('''
calls = []

def authenticate(client_id, username, password, peer, cert):
    calls.append(client_id)
    if username == "ldap-user":
        return password == b"ldap-pw"
    if username == "token":
        # a JWT-like check: the token names the user the ACL applies to
        return {"allow": password == b"tok-alice", "username": "alice"}
    return None  # no opinion: the password file decides
''')
    monkeypatch.setenv("PYTHONPATH", str(plugin_dir))
    node = start_node(password_file=users, acl_file=acl,
                      auth_plugin="shoal_test_login:authenticate")

    def code(user, password, version=5):
        c = node.raw(version=version)
        try:
            return c.connect("plug", expect_success=False, username=user,
                             password=password).reason_code
        finally:
            c.close()
    assert code("ldap-user", b"ldap-pw") == 0
    assert code("ldap-user", b"nope") == 0x86
    assert code("ldap-user", b"nope", version=4) == 4
    assert code("bob", b"bob-pw") == 0        # the plugin had no opinion: password file
    assert code("bob", b"wrong") == 0x86
    tok = node.raw(version=5)
    tok.connect("tok-1", username="token", password=b"tok-alice")
    assert suback_codes(tok, "alice/#", "bob/#") == [1, 0x87]  # rights of "alice"


def test_a_bad_acl_file_stops_the_start_with_its_line(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite alice/#/more\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "cluster", "run", "--acl-file", str(acl),
                           "--data-dir", str(tmp_path / "d"), "--mqtt-port", str(free_port()),
                           "--admin-port", "0"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc
    assert "line 2" in proc.stderr and "#" in proc.stderr, proc.stderr


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m[1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_tls_only_node_has_no_plaintext_listener(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    server.private_key_pem.write_to_path(str(key))
    tls_port = free_port()
    node = BrokerProcess("shoal", tmp_path, {"mqtt_port": 0, "tls_port": tls_port,
                                             "tls_cert": cert, "tls_key": key})
    plain_port = node.port
    node.port = tls_port  # (the readiness check connects here)
    LIVE_NODES.append(node)
    try:
        node.start()
        assert listening_ports(node.proc.pid) == {tls_port, node.admin_port}
        assert "mqtt=off" in node.log_tail(50)
        import socket
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=1).close()
    finally:
        node.stop()
        LIVE_NODES.remove(node)
