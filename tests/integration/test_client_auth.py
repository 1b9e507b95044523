"""Who may connect: `password_file` (written by `shoal passwd`, or by mosquitto_passwd) and
`allow_anonymous`, with real clients (the raw client, mosquitto_pub) against a real node."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from support import REPO_ROOT, free_port, http_json, wait_for


def passwd(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "cluster", "passwd", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def shoal_only(node) -> None:
    if node.kind != "shoal":
        pytest.skip("Shoal's own options")


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "passwd"
    for user, password in (("alice", "alice-pw"), ("bob", "bob-pw")):
        result = passwd("-b", str(path), user, password)
        assert result.returncode == 0, result.stderr
    return path


def connack(node, version: int, **credentials):
    client = node.raw(version=version)
    try:
        return client.connect("auth-test", expect_success=False, **credentials).reason_code
    finally:
        client.close()


def test_a_listed_user_gets_in_and_others_get_the_right_code(start_node, users):
    node = start_node(password_file=users)
    shoal_only(node)
    assert connack(node, 5, username="alice", password=b"alice-pw") == 0
    assert connack(node, 4, username="bob", password=b"bob-pw") == 0
    # wrong password, unknown user: 0x86 (v5) / 4 (3.1.1)
    assert connack(node, 5, username="alice", password=b"bob-pw") == 0x86
    assert connack(node, 4, username="mallory", password=b"x") == 4
    assert connack(node, 5, username="alice") == 0x86  # (no password)
    # no username at all, with a password file: not authorized, 0x87 / 5
    assert connack(node, 5) == 0x87
    assert connack(node, 4) == 5
    # the session of a refused client was never opened
    assert node.stats()["sessions"] == 0


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="needs mosquitto-clients")
def test_mosquitto_pub_logs_in_with_a_mosquitto_passwd_line(start_node, tmp_path):
    # mosquitto_passwd 2.x's format: $7$<iterations>$<salt>$<PBKDF2-HMAC-SHA512>
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", b"carol-pw", salt, 101)
    path = tmp_path / "mosquitto.passwd"
    path.write_text(f"carol:$7$101${base64.b64encode(salt).decode()}$"
                    f"{base64.b64encode(digest).decode()}\n")
    node = start_node(password_file=path)
    shoal_only(node)

    def pub(*creds: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mosquitto_pub", "-h", node.host, "-p", str(node.port),
                               "-t", "auth/t", "-m", "x", "-q", "1", *creds],
                              capture_output=True, text=True, timeout=20)
    assert pub("-u", "carol", "-P", "carol-pw").returncode == 0
    refused = pub("-u", "carol", "-P", "wrong")
    assert refused.returncode != 0 and ("authoris" in refused.stderr.lower() or
                                        "password" in refused.stderr.lower()), refused.stderr


def test_sighup_rereads_the_password_file(start_node, users):
    node = start_node(password_file=users)
    shoal_only(node)
    assert connack(node, 5, username="dave", password=b"dave-pw") == 0x86
    assert passwd("-b", str(users), "dave", "dave-pw").returncode == 0
    assert passwd("-D", str(users), "bob").returncode == 0
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: connack(node, 5, username="dave", password=b"dave-pw") == 0, 10.0, interval=0.2,
             message="the new user accepted after SIGHUP")
    assert connack(node, 5, username="bob", password=b"bob-pw") == 0x86
    # a broken file is not loaded: the users from before stay
    users.write_text("carol:plain-text\n")
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "password / acl file not reloaded" in node.log_tail(200), 10.0, interval=0.2,
             message="the reload refused in the log")
    assert connack(node, 5, username="dave", password=b"dave-pw") == 0
    # the admin API reloads it too (and says why not)
    status, body = http_json("POST", f"http://{node.host}:{node.admin_port}"
                                     "/api/v1/auth/reload")
    assert status == 400 and "line 1" in body["error"], (status, body)
    assert passwd("-b", str(users.with_name("fresh")), "gina", "gina-pw").returncode == 0
    users.write_text(users.with_name("fresh").read_text())
    status, body = http_json("POST", f"http://{node.host}:{node.admin_port}"
                                     "/api/v1/auth/reload")
    assert status == 200 and body["users"] == 1, (status, body)
    assert connack(node, 5, username="gina", password=b"gina-pw") == 0
    assert connack(node, 5, username="dave", password=b"dave-pw") == 0x86
    status, text = http_json("GET", f"http://{node.host}:{node.admin_port}/metrics")
    refused = re.search(r"^shoal_connects_refused_total(?:\{[^}]*\})? (\d+)", text, re.M)
    assert status == 200 and refused and int(refused[1]) >= 3, text[:2000]


def test_anonymous_clients_are_refused_on_a_non_loopback_bind(start_node):
    node = start_node(host="0.0.0.0")
    shoal_only(node)
    assert connack(node, 5) == 0x87
    assert connack(node, 4) == 5
    assert "anonymous clients refused" in node.log_tail(200)


def test_allow_anonymous_lets_them_in_anywhere(start_node):
    node = start_node(host="0.0.0.0", allow_anonymous="true")
    shoal_only(node)
    assert connack(node, 5) == 0
    # on loopback without a password file they are in by default (make run, the quick try)
    local = start_node()
    shoal_only(local)
    assert connack(local, 4) == 0


def test_shoal_passwd_manages_the_file(tmp_path):
    path = tmp_path / "pw"
    assert passwd("-b", str(path), "erin", "one").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert first.startswith("erin:$scrypt$") and "one" not in first
    path.write_text("# users of the test\n" + first)
    assert passwd("-b", str(path), "erin", "two").returncode == 0
    text = path.read_text()
    assert text.startswith("# users of the test\n") and text.count("erin:") == 1
    assert text != "# users of the test\n" + first
    missing = passwd("-b", str(path), "frank")
    assert missing.returncode != 0 and "PASSWORD" in missing.stderr
    gone = passwd("-D", str(path), "nobody")
    assert gone.returncode != 0 and "no user" in gone.stderr
    assert passwd("-D", str(path), "erin").returncode == 0
    assert "erin" not in path.read_text()


def test_a_bad_password_file_stops_the_start_with_its_line(tmp_path):
    path = tmp_path / "pw"
    path.write_text("alice:secret-in-clear\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "cluster", "run", "--password-file",
                           str(path), "--data-dir", str(tmp_path / "d"), "--mqtt-port", str(free_port()),
                           "--admin-port", "0"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc
    assert "line 1" in proc.stderr and "alice" in proc.stderr, proc.stderr


def test_clients_cannot_publish_to_server_topics(node):
    """`$SYS/...` (any topic beginning with `$`) is the server's: nothing a client publishes
    there reaches a subscriber; MQTT 5 is told 0x87, 3.1.1 is acknowledged as Mosquitto does."""
    from support import Puback, Pubcomp, Publish, Pubrec, Pubrel
    shoal_only(node)
    watcher = node.raw(version=5)
    watcher.connect("sys-watch")
    watcher.subscribe("$SYS/#", qos=1)
    v5 = node.raw(version=5)
    v5.connect("sys-pub-5")
    v5.send(Publish("$SYS/broker/uptime", b"0", 1, False, False, 7, {}))
    ack = v5.expect(Puback)
    assert (ack.packet_id, ack.reason_code) == (7, 0x87)
    v5.send(Publish("$SYS/broker/uptime", b"0", 2, False, False, 8, {}))
    rec = v5.expect(Pubrec)
    assert (rec.packet_id, rec.reason_code) == (8, 0x87)
    v311 = node.raw(version=4)
    v311.connect("sys-pub-4")
    v311.send(Publish("$SYS/broker/uptime", b"0", 1, False, False, 9, {}))
    assert v311.expect(Puback).packet_id == 9
    v311.send(Publish("$SYS/x", b"0", 2, False, False, 10, {}))
    assert v311.expect(Pubrec).packet_id == 10
    v311.send(Pubrel(10))
    assert v311.expect(Pubcomp).packet_id == 10
    assert not [p for p in watcher.recv_nothing_for(0.5) if isinstance(p, Publish)]
    assert node.stats()["publishes_refused"] == 4
    for c in (watcher, v5, v311):
        c.close()


def test_mqtt5_enhanced_authentication_with_scram_sha_256(start_node, tmp_path):
    """CONNECT (client-first) / AUTH 0x18 (server-first) / AUTH 0x18 (client-final) /
    CONNACK with the server-final: the password never crosses the wire, and the server
    proves it knows the user's keys."""
    from support import Auth, Connect, Connack, Publish
    from node.scram import client_exchange
    path = tmp_path / "passwd"
    assert passwd("-b", "--scram", str(path), "sam", "sam-pw").returncode == 0
    assert passwd("-b", str(path), "ann", "ann-pw").returncode == 0  # (scrypt: no SCRAM)
    assert "$scram-sha-256$" in path.read_text()
    node = start_node(password_file=path, enhanced_auth="SCRAM-SHA-256")
    shoal_only(node)
    method = {0x15: "SCRAM-SHA-256"}

    def exchange(user: str, password: str):
        flow = client_exchange(user, password)
        client = node.raw(version=5)
        client.send(Connect(client_id=f"scram-{user}", protocol_level=5,
                            properties={**method, 0x16: next(flow)}))
        first = client.recv()
        if isinstance(first, Connack):
            return first, None, client
        assert isinstance(first, Auth) and first.reason_code == 0x18, first
        assert first.properties[0x15] == "SCRAM-SHA-256"
        client.send(Auth(0x18, {**method, 0x16: flow.send(first.properties[0x16])}))
        ack = client.expect(Connack)
        proved = None
        if ack.reason_code == 0:
            assert ack.properties[0x15] == "SCRAM-SHA-256"
            try:
                flow.send(ack.properties[0x16])
            except StopIteration as done:
                proved = done.value
        return ack, proved, client

    ack, proved, client = exchange("sam", "sam-pw")
    assert ack.reason_code == 0 and proved is True
    client.subscribe("scram/t", qos=1)
    client.publish("scram/t", b"hi", qos=1)
    assert any(isinstance(p, Publish) and p.payload == b"hi"
               for p in client.recv_nothing_for(0.5))
    for user, password in (("sam", "wrong"), ("nobody", "x"), ("ann", "ann-pw")):
        ack, _, _ = exchange(user, password)
        assert ack.reason_code == 0x86, (user, ack)
    # the plain password works against the SCRAM entry too; another method: 0x8C
    assert connack(node, 5, username="sam", password=b"sam-pw") == 0
    other = node.raw(version=5)
    assert other.connect("m", expect_success=False,
                         properties={0x15: "SCRAM-SHA-1"}).reason_code == 0x8C
    # a PUBLISH before the CONNACK of an enhanced authentication: a protocol error
    flow = client_exchange("sam", "sam-pw")
    rude = node.raw(version=5)
    rude.send(Connect(client_id="rude", protocol_level=5, properties={**method,
                                                                      0x16: next(flow)}))
    assert isinstance(rude.recv(), Auth)
    rude.send(Publish("x", b"y", 0, False, False, 0, {}))
    rude.wait_closed()
