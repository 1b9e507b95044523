"""TLS listeners: MQTT over TLS (``tls_port``) and MQTT over WebSocket over TLS
(``wss_port``) with a test CA (trustme) and a server certificate for 127.0.0.1/localhost;
paho-mqtt (``tls_set``) and the Mosquitto clients (``--cafile``) as real clients. A failed
handshake or a plain-TCP client must leave the node serving; bad certificate settings
stop the node at start with one line naming the option and the file."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest

from support import REPO_ROOT, Connect, encode, free_port, unique_free_port

trustme = pytest.importorskip("trustme")

pytestmark = [pytest.mark.timeout(60), pytest.mark.shoal_only("Shoal's TLS listeners")]

DEADLINE = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate chain and key, and a client certificate, as files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client-1@shoal.test")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
             "client_cert": d / "client.pem", "client_key": d / "client.key",
             "other_ca": d / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(files["cert"]), append=i > 0)
    server.private_key_pem.write_to_path(str(files["key"]))
    for i, blob in enumerate(client.cert_chain_pems):
        blob.write_to_path(str(files["client_cert"]), append=i > 0)
    client.private_key_pem.write_to_path(str(files["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def tls_node(start_node, pki):
    tls_port, wss_port = unique_free_port(), unique_free_port()
    node = start_node(tls_port=tls_port, wss_port=wss_port, tls_cert=pki["cert"],
                      tls_key=pki["key"])
    node.tls_port, node.wss_port = tls_port, wss_port
    return node


def tls_paho(node, client_id: str, version: int = 5, ca: str = "", **kw):
    return node.paho(client_id, version, port=node.tls_port, tls={"ca_certs": ca}, **kw)


# -- working clients ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5], ids=["3.1.1", "5.0"])
def test_mqtt_over_tls_round_trip_with_a_tcp_client(tls_node, pki, version):
    secure = tls_paho(tls_node, f"tls-{version}", version, ca=pki["ca"])
    plain = tls_node.paho(f"plain-{version}", version)
    secure.subscribe("tls/in", qos=2)
    plain.subscribe("tls/out", qos=2)
    for qos in (0, 1, 2):
        plain.publish("tls/in", b"to-tls-%d" % qos, qos=qos)
        secure.publish("tls/out", b"from-tls-%d" % qos, qos=qos)
    assert sorted(m.payload for m in secure.wait_messages(3)) == [b"to-tls-%d" % q
                                                                   for q in (0, 1, 2)]
    assert sorted(m.payload for m in plain.wait_messages(3)) == [b"from-tls-%d" % q
                                                                  for q in (0, 1, 2)]


@pytest.mark.parametrize("version", [4, 5], ids=["3.1.1", "5.0"])
def test_websocket_over_tls_round_trip(tls_node, pki, version):
    wss = tls_node.paho(f"wss-{version}", version, transport="websockets",
                        port=tls_node.wss_port, tls={"ca_certs": pki["ca"]})
    plain = tls_node.paho(f"plain-wss-{version}", version)
    wss.subscribe("wss/in", qos=1)
    plain.subscribe("wss/out", qos=1)
    payload = os.urandom(200_000)
    plain.publish("wss/in", payload, qos=1)
    wss.publish("wss/out", b"from-wss", qos=1)
    assert wss.wait_messages(1)[0].payload == payload
    assert plain.wait_messages(1)[0].payload == b"from-wss"


@pytest.mark.skipif(not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub"))
                    and not os.environ.get("CI"), reason="mosquitto-clients not installed")
def test_mosquitto_clients_over_tls_with_cafile(tls_node, pki):
    common = ["-h", "127.0.0.1", "-p", str(tls_node.tls_port), "--cafile", pki["ca"],
              "-V", "mqttv5"]
    pub = subprocess.run(["mosquitto_pub", *common, "-q", "1", "-r", "-t", "tls/mosq",
                          "-m", "hello over tls"], capture_output=True, text=True, timeout=20)
    assert pub.returncode == 0, pub.stderr
    sub = subprocess.run(["mosquitto_sub", *common, "-t", "tls/mosq", "-C", "1", "-W", "10"],
                         capture_output=True, text=True, timeout=20)
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.strip() == "hello over tls"


# -- failed handshakes leave the node serving ----------------------------------------------


def test_client_that_does_not_trust_the_ca_fails_and_the_node_keeps_serving(tls_node, pki):
    for port, transport in ((tls_node.tls_port, "tcp"), (tls_node.wss_port, "websockets")):
        doubter = tls_node.paho(f"doubter-{transport}", port=port, transport=transport,
                                tls={"ca_certs": pki["other_ca"]}, connect=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            doubter.client.connect(tls_node.host, port, 60)
    assert tls_paho(tls_node, "trusting", ca=pki["ca"]).is_connected()
    assert tls_node.paho("plain-after-doubt").is_connected()


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the peer sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the node did not close the connection within {timeout}s")


def test_plain_mqtt_client_on_the_tls_port_is_closed_and_harms_nothing(tls_node, pki):
    secure = tls_paho(tls_node, "secure-before", ca=pki["ca"])
    secure.subscribe("still/here", qos=1)
    for port in (tls_node.tls_port, tls_node.wss_port):
        with socket.create_connection((tls_node.host, port), timeout=DEADLINE) as sock:
            sock.sendall(encode(Connect("plaintext"), 5))
            reply = _read_until_closed(sock, DEADLINE)
        assert b"\x20" not in reply[:1], reply  # no CONNACK: at most a TLS alert
    tls_node.paho("plain-pub").publish("still/here", b"ok", qos=1)
    assert secure.wait_messages(1)[0].payload == b"ok"
    assert tls_node.alive()


def test_client_certificate_required_with_tls_ca(start_node, pki):
    tls_port = unique_free_port()
    node = start_node(tls_port=tls_port, tls_cert=pki["cert"], tls_key=pki["key"],
                      tls_ca=pki["ca"], tls_require_client_cert=True)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection((node.host, tls_port), timeout=DEADLINE) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(encode(Connect("no-cert"), 5))  # TLS 1.3: refused at first read
                if not _read_until_closed(sock, DEADLINE):
                    raise ConnectionError("closed without a CONNACK")
    with_cert = node.paho("with-cert", port=tls_port,
                          tls={"ca_certs": pki["ca"], "certfile": pki["client_cert"],
                               "keyfile": pki["client_key"]})
    assert with_cert.is_connected()


# -- bad settings stop the node at start -----------------------------------------------------


def _run_node(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    tls_port = free_port()
    cmd = [sys.executable, "-m", "node", "run", "--node-id", "tls", "--host", "127.0.0.1",
           "--mqtt-port", str(free_port()), "--admin-port", "0", "--data-dir",
           str(tmp_path / "data"), "--tls-port", str(tls_port), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=20), tls_port


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "configuration error" in line]


@pytest.mark.parametrize("which", ["tls_cert", "tls_key"])
def test_missing_certificate_file_stops_the_start_naming_option_and_file(tmp_path, pki, which):
    missing = str(tmp_path / "nowhere" / "missing.pem")
    files = {"tls_cert": pki["cert"], "tls_key": pki["key"], which: missing}
    result, tls_port = _run_node(tmp_path, "--tls-cert", files["tls_cert"],
                                 "--tls-key", files["tls_key"])
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and which in lines[0] and missing in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tls_port), timeout=0.5).close()


def test_unusable_certificate_or_missing_option_stops_the_start(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result, _ = _run_node(tmp_path, "--tls-cert", str(garbage), "--tls-key", pki["key"])
    assert result.returncode == 2, result.stderr
    line, = _error_lines(result.stderr)
    assert "tls_cert" in line and str(garbage) in line and "Traceback" not in result.stderr
    # a key that does not belong to the certificate
    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    result, _ = _run_node(tmp_path, "--tls-cert", pki["cert"], "--tls-key", str(other_key))
    assert result.returncode == 2 and "tls_key" in result.stderr, result.stderr
    # a TLS port without a certificate
    result, _ = _run_node(tmp_path)
    assert result.returncode == 2, result.stderr
    line, = _error_lines(result.stderr)
    assert "tls_cert" in line and "tls_key" in line


@pytest.mark.shoal_only("Shoal's connect_timeout on the TLS listeners")
def test_silent_sockets_on_the_tls_listeners_are_closed_after_connect_timeout(start_node, pki):
    """No ClientHello ever: the TLS and WSS listeners close the socket after
    connect_timeout (not asyncio's 60 s), and serve a real client meanwhile."""
    import socket
    tls_port, wss_port = unique_free_port(), unique_free_port()
    node = start_node(tls_port=tls_port, wss_port=wss_port, tls_cert=pki["cert"],
                      tls_key=pki["key"], connect_timeout=1.5)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=8)
             for port in (tls_port, wss_port) for _ in range(10)]
    secure = node.paho("tls-while-silent", 5, port=tls_port, tls={"ca_certs": pki["ca"]})
    secure.subscribe("silent/t", qos=1)
    for s in socks:
        try:
            assert s.recv(1) == b""  # closed by the node (in time: the timeout is 8 s)
        except ConnectionResetError:
            pass
        s.close()
    assert secure.is_connected()
