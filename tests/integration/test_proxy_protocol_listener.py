"""PROXY protocol on the MQTT listener (``proxy_protocol``), one real node, raw sockets.

* On: a v1 or v2 header, sent whole or a byte at a time, then MQTT as usual; the node
  knows the client by the header's address (the admin API's client view and the logs
  say so). A v2 ``LOCAL`` header (a balancer's own check) keeps the socket's address.
  A connection without a header, or with a broken one, is closed with a log line that
  says why; so is one that sends nothing (the CONNECT timeout covers the header).
* ``proxy_protocol_trusted``: a connection from outside the listed networks is closed.
* Off: a connection that starts with a PROXY header is closed, and the log line tells the
  operator what to fix ("PROXY protocol header on a listener without proxy_protocol").
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from support import Connack, Connect, ConnectionClosed, RawClient, encode, http_json, wait_for

pytestmark = pytest.mark.shoal_only("PROXY protocol listener option")

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_inet(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 1883,
            command: int = 1) -> bytes:
    body = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))
    return SIG + bytes((0x20 | command, 0x11)) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    return SIG + b"\x20\x00\x00\x00"


def client_view(node, client_id: str) -> dict:
    status, body = http_json("GET", f"http://{node.host}:{node.admin_port}"
                                    f"/api/v1/clients/{client_id}")
    assert status == 200, f"GET /api/v1/clients/{client_id} -> {status} {body!r}"
    return body


def connect_after(node, header: bytes, client_id: str, byte_by_byte: bool = False) -> RawClient:
    c = node.raw(5)
    data = header + encode(Connect(client_id=client_id, protocol_level=5), 5)
    if byte_by_byte:
        for i in range(len(data)):
            c.send_bytes(data[i:i + 1])
    else:
        c.send_bytes(data)
    ack = c.expect(Connack)
    assert ack.reason_code == 0, ack
    return c


def log_shows(node, text: str) -> bool:
    return text in node.log_path.read_text(errors="replace")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "bytewise"])
def test_header_names_the_client(start_node, version, byte_by_byte):
    node = start_node(proxy_protocol=True)
    cid = f"pp-{version}-{int(byte_by_byte)}"
    header = (b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 1883\r\n" if version == 1
              else v2_inet("203.0.113.7", 40001))
    c = connect_after(node, header, cid, byte_by_byte)
    assert c.ping() >= 0
    assert client_view(node, cid)["peer"] == "203.0.113.7:40001"
    # the logs use the same address: a protocol error names the real client
    c.send_bytes(b"\x00\x00")
    c.wait_closed()
    wait_for(lambda: log_shows(node, "peer=203.0.113.7:40001"), 5.0,
             message="a log line with the client's real address")


def test_v1_tcp6_and_unknown(start_node):
    node = start_node(proxy_protocol=True)
    connect_after(node, b"PROXY TCP6 2001:db8::5 ::1 5555 1883\r\n", "pp-6")
    assert client_view(node, "pp-6")["peer"] == "2001:db8::5:5555"
    c = connect_after(node, b"PROXY UNKNOWN\r\n", "pp-unknown")
    own = "%s:%d" % c.sock.getsockname()
    assert client_view(node, "pp-unknown")["peer"] == own


def test_v2_local_keeps_the_socket_address(start_node):
    node = start_node(proxy_protocol=True)
    c = connect_after(node, v2_local(), "pp-local")
    assert client_view(node, "pp-local")["peer"] == "%s:%d" % c.sock.getsockname()


@pytest.mark.parametrize("first, why", [
    (encode(Connect(client_id="direct", protocol_level=5), 5),
     "the client did not come through the load balancer"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "bad port"),
    (SIG + b"\x31\x11\x00\x0c", "version 3, not 2"),
], ids=["no-header", "bad-v1", "bad-v2"])
def test_missing_or_broken_header_is_refused(start_node, first, why):
    node = start_node(proxy_protocol=True)
    c = node.raw(5)
    c.send_bytes(first)
    assert c.wait_closed() == [], "nothing is answered before the header"
    wait_for(lambda: log_shows(node, "no valid PROXY protocol header") and log_shows(node, why),
             5.0, message=f"the log line about the header ({why})")


def test_untrusted_source_is_closed(start_node):
    node = start_node(proxy_protocol=True, proxy_protocol_trusted="10.0.0.0/8, 192.0.2.1")
    c = node.raw(5)
    try:
        c.send_bytes(v2_inet("203.0.113.9", 1) + encode(Connect(client_id="x",
                                                               protocol_level=5), 5))
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed even before the bytes went out: the same outcome
    else:
        assert c.wait_closed() == []
    wait_for(lambda: log_shows(node, "connection from outside proxy_protocol_trusted"), 5.0,
             message="the log line about the untrusted source")
    trusted = start_node(proxy_protocol=True, proxy_protocol_trusted="127.0.0.0/8")
    connect_after(trusted, v2_inet("203.0.113.9", 2), "pp-trusted")
    assert client_view(trusted, "pp-trusted")["peer"] == "203.0.113.9:2"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 1883\r\n", v2_inet("203.0.113.7", 40001)],
    ids=["v1", "v2"])
def test_header_on_a_listener_without_proxy_protocol(start_node, header):
    node = start_node()
    c = node.raw(5)
    c.send_bytes(header + encode(Connect(client_id="lb", protocol_level=5), 5))
    try:
        assert c.wait_closed() == []
    except ConnectionClosed:
        pass
    wait_for(lambda: log_shows(node, "PROXY protocol header on a listener without "
                                     "proxy_protocol"), 5.0,
             message="the log line that tells the operator to switch proxy_protocol on")
    # a plain client is fine on the same listener
    plain = node.raw(5)
    assert plain.connect("plain").reason_code == 0
