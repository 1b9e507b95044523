"""Malformed input and protocol violations close only the offending connection (MQTT 4.8,
4.13); the node keeps serving every other client."""

from __future__ import annotations

import pytest

from support import (
    Connack, Connect, Disconnect, Prop, Publish, Subscribe, Subscription, encode, enc_str,
    frame,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def healthy(node):
    """A well-behaved client connected before the bad one; it must be unaffected."""
    client = node.paho("healthy", 5)
    client.subscribe("health/#", qos=1)
    yield client
    assert client.disconnects == [], "the healthy client was disconnected"
    assert client.is_connected()
    pub = node.paho("health-pub", 4)
    pub.publish("health/t", b"still-served", qos=1)
    assert client.wait_messages(1, topic="health/t")[0].payload == b"still-served"
    assert node.alive()
    if node.has_admin:
        assert node.healthz()["status"] == "ok"


def _connect_bytes(version, **kw):
    return encode(Connect(client_id=kw.pop("client_id", "bad"), protocol_level=version, **kw),
                  version)


# (name, protocol level used to read the answer, does the case CONNECT first, bytes)
CASES = [
    ("reserved-type-0-before-connect", 4, False, b"\x00\x00"),
    ("reserved-type-0-after-connect-v311", 4, True, b"\x00\x00"),
    ("reserved-type-0-after-connect-v5", 5, True, b"\x00\x00"),
    ("auth-type-15-in-v311", 4, True, b"\xf0\x00"),
    ("wrong-protocol-name-v311", 4, False, _connect_bytes(4, protocol_name="MQTX")),
    ("wrong-protocol-name-v5", 5, False, _connect_bytes(5, protocol_name="MQIsdpX")),
    ("five-byte-remaining-length-before-connect", 4, False, b"\x10\xff\xff\xff\xff\x7f"),
    ("five-byte-remaining-length-after-connect", 5, True, b"\x30\xff\xff\xff\xff\x01"),
    ("publish-before-connect", 4, False, encode(Publish("health/t", b"sneaky"), 4)),
    ("subscribe-before-connect", 5, False,
     encode(Subscribe(1, [Subscription("#", 0)]), 5)),
    ("invalid-utf8-client-id-v311", 4, False, _connect_bytes(4, client_id=b"\xff\xfe\xfd")),
    ("invalid-utf8-client-id-v5", 5, False, _connect_bytes(5, client_id=b"ab\xc0\x80")),
    ("second-connect-v311", 4, True, _connect_bytes(4, client_id="again")),
    ("second-connect-v5", 5, True, _connect_bytes(5, client_id="again")),
    ("publish-qos-3", 4, True, frame(0x36, enc_str("health/t") + b"\x00\x01x")),
    ("publish-topic-with-wildcard", 4, True,
     frame(0x32, enc_str("health/#") + b"\x00\x01x")),
    ("publish-topic-invalid-utf8", 5, True,
     frame(0x30, enc_str(b"health/\xff") + b"\x00x")),
    ("subscribe-reserved-flags-0", 4, True, frame(0x80, b"\x00\x01" + enc_str("a") + b"\x00")),
    ("subscribe-without-filters", 4, True, frame(0x82, b"\x00\x01")),
    ("connect-reserved-flag-set", 4, False,
     frame(0x10, enc_str("MQTT") + b"\x04\x03\x00\x3c" + enc_str("bad"))),
]


@pytest.mark.parametrize("version, connect_first, data",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_frame_closes_only_its_own_connection(node, healthy, version, connect_first, data):
    raw = node.raw(version)
    if connect_first:
        raw.connect("bad-client")
    raw.send_bytes(data)
    got = raw.wait_closed(5)
    for p in got:
        if isinstance(p, Connack):
            assert p.reason_code != 0, f"a bad CONNECT was accepted: {got!r}"
        elif isinstance(p, Disconnect):
            assert version == 5 and p.reason_code >= 0x80, f"unexpected DISCONNECT {p!r}"
        else:
            raise AssertionError(f"unexpected answer to a bad frame: {got!r}")


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_second_connect_is_a_protocol_error(node, healthy, version):
    raw = node.raw(version)
    raw.connect("twice")
    raw.send_bytes(_connect_bytes(version, client_id="twice"))
    got = raw.wait_closed(5)
    if version == 5:
        assert [type(p) for p in got] in ([], [Disconnect])
        assert not got or got[0].reason_code == 0x82, got
    else:
        assert got == [], got


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_packet_over_max_packet_size_closes_the_connection(start_node, version):
    node = start_node(max_packet_size=1024)
    healthy = node.paho("healthy-big", 5)
    healthy.subscribe("big/#", qos=1)
    raw = node.raw(version)
    ack = raw.connect("big")
    if version == 5:
        assert ack.properties.get(Prop.MAXIMUM_PACKET_SIZE) == 1024, ack
    raw.publish("big/t", b"x" * 2000, qos=0)
    got = raw.wait_closed(5)
    if version == 5:
        assert len(got) == 1 and isinstance(got[0], Disconnect) and got[0].reason_code == 0x95, \
            got
    else:
        assert got == [], got
    assert healthy.disconnects == []
    pub = node.paho("big-pub", 4)
    pub.publish("big/t", b"y" * 500, qos=1)
    assert healthy.wait_messages(1)[0].payload == b"y" * 500


def test_packet_just_under_max_packet_size_is_accepted(start_node):
    node = start_node(max_packet_size=1024)
    sub = node.paho("under-sub", 5)
    sub.subscribe("under/#", qos=1)
    raw = node.raw(5)
    raw.connect("under")
    payload = b"z" * (1024 - 2 - 2 - len("under/t") - 2 - 1 - 8)
    data = encode(Publish("under/t", payload, qos=1, packet_id=1), 5)
    assert len(data) <= 1024
    raw.send_bytes(data)
    assert sub.wait_messages(1)[0].payload == payload
