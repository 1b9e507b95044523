"""Codec: known encodings both ways (h11 tests/test_io.py style), and every malformed
or forbidden form raising the right error class and reason."""

from __future__ import annotations

import pytest

from node.mqtt import codec
from node.mqtt._framing import encode_varint, read_varint, remaining_length
from node.mqtt.codes import PropertyId as P, ReasonCode as R
from node.mqtt.errors import (
    LocalMqttError, MalformedPacket, ProtocolViolation, UnsupportedProtocolVersion,
)
from node.mqtt.packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
)


def split(frame: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one complete frame; checks the remaining length."""
    rl, start = remaining_length(frame, 1, len(frame))
    assert start + rl == len(frame)
    return frame[0], frame[start:]


def decode_frame(frame: bytes, version: int):
    b0, body = split(frame)
    return codec.decode(b0, body, version)


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# (versions, packet, exact frame) — each is checked in both directions.
KNOWN = [
    # ---- CONNECT
    ((4,), Connect("c1", 4, "MQTT", True, 60),
     h("10 0e 0004 4d515454 04 02 003c 0002 6331")),
    ((3,), Connect("c1", 3, "MQIsdp", True, 60),
     h("10 10 0006 4d5149736470 03 02 003c 0002 6331")),
    ((4,), Connect("c1", 4, "MQTT", True, 10, "u", b"pw", Will("w", b"hi", 1, False)),
     h("10 1c 0004 4d515454 04 ce 000a 0002 6331 0001 77 0002 6869 0001 75 0002 7077")),
    ((4,), Connect("", 4, "MQTT", False, 0, None, None, Will("t", b"", 2, True)),
     h("10 11 0004 4d515454 04 34 0000 0000 0001 74 0000")),
    ((5,), Connect("c1", 5, "MQTT", True, 60,
                   properties={P.SESSION_EXPIRY_INTERVAL: 10, P.RECEIVE_MAXIMUM: 20}),
     h("10 17 0004 4d515454 05 02 003c 08 11 0000000a 21 0014 0002 6331")),
    ((5,), Connect("c", 5, "MQTT", True, 0, None, b"p",
                   Will("w", b"x", 0, False, {P.WILL_DELAY_INTERVAL: 5})),
     h("10 1d 0004 4d515454 05 46 0000 00 0001 63 05 18 00000005 0001 77 0001 78 0001 70")),
    # ---- CONNACK
    ((3, 4), Connack(False, R.SUCCESS), h("20 02 00 00")),
    ((3, 4), Connack(True, R.SUCCESS), h("20 02 01 00")),
    ((3, 4), Connack(False, R.NOT_AUTHORIZED), h("20 02 00 05")),
    ((3, 4), Connack(False, R.UNSUPPORTED_PROTOCOL_VERSION), h("20 02 00 01")),
    ((3, 4), Connack(False, R.CLIENT_IDENTIFIER_NOT_VALID), h("20 02 00 02")),
    ((3, 4), Connack(False, R.SERVER_UNAVAILABLE), h("20 02 00 03")),
    ((3, 4), Connack(False, R.BAD_USER_NAME_OR_PASSWORD), h("20 02 00 04")),
    ((5,), Connack(False, R.SUCCESS), h("20 03 00 00 00")),
    ((5,), Connack(True, R.SUCCESS, {P.TOPIC_ALIAS_MAXIMUM: 10, P.RECEIVE_MAXIMUM: 20}),
     h("20 09 01 00 06 22 000a 21 0014")),
    ((5,), Connack(False, R.BANNED), h("20 03 00 8a 00")),
    # ---- PUBLISH
    ((3, 4), Publish("a/b", b"hello"), h("30 0a 0003 612f62 68656c6c6f")),
    ((3, 4), Publish("a/b", b"hello", 1, True, True, 7), h("3b 0c 0003 612f62 0007 68656c6c6f")),
    ((3, 4), Publish("a/b", b"", 2, False, False, 0xFFFF), h("34 07 0003 612f62 ffff")),
    ((5,), Publish("a/b", b"hello"), h("30 0b 0003 612f62 00 68656c6c6f")),
    ((5,), Publish("", b"hi", 0, False, False, 0, {P.TOPIC_ALIAS: 1}),
     h("30 08 0000 03 230001 6869")),
    ((5,), Publish("t", b"", 1, False, False, 1,
                   {P.MESSAGE_EXPIRY_INTERVAL: 60, P.SUBSCRIPTION_IDENTIFIER: [1, 300],
                    P.USER_PROPERTY: [("k", "v"), ("k", "w")]}),
     h("32 1e 0001 74 0001 18 02 0000003c 0b 01 0b ac02 26 0001 6b 0001 76 26 0001 6b 0001 77")),
    # ---- PUBACK / PUBREC / PUBREL / PUBCOMP
    ((3, 4, 5), Puback(7), h("40 02 0007")),
    ((3, 4, 5), Pubrec(7), h("50 02 0007")),
    ((3, 4, 5), Pubrel(7), h("62 02 0007")),
    ((3, 4, 5), Pubcomp(7), h("70 02 0007")),
    ((5,), Puback(7, R.NO_MATCHING_SUBSCRIBERS), h("40 03 0007 10")),
    ((5,), Pubrec(7, R.QUOTA_EXCEEDED), h("50 03 0007 97")),
    ((5,), Pubrel(7, R.PACKET_IDENTIFIER_NOT_FOUND), h("62 03 0007 92")),
    ((5,), Pubcomp(258, R.PACKET_IDENTIFIER_NOT_FOUND), h("70 03 0102 92")),
    ((5,), Puback(7, R.NOT_AUTHORIZED, {P.REASON_STRING: "ok"}),
     h("40 09 0007 87 05 1f 0002 6f6b")),
    ((5,), Puback(7, R.SUCCESS, {P.REASON_STRING: "ok"}),
     h("40 09 0007 00 05 1f 0002 6f6b")),
    # ---- SUBSCRIBE / SUBACK
    ((3, 4), Subscribe(1, (Subscription("a/b", 1), Subscription("c/#", 2))),
     h("82 0e 0001 0003 612f62 01 0003 632f23 02")),
    ((5,), Subscribe(1, (Subscription("a/b", 1, True, True, 2),)),
     h("82 09 0001 00 0003 612f62 2d")),
    ((5,), Subscribe(2, (Subscription("x", 0, False, False, 1),),
                     {P.SUBSCRIPTION_IDENTIFIER: [5]}),
     h("82 09 0002 02 0b05 0001 78 10")),
    ((3, 4), Suback(1, (1,)), h("90 03 0001 01")),
    ((3, 4), Suback(1, (0, 2, 0x80)), h("90 05 0001 00 02 80")),
    ((5,), Suback(1, (0, 1, R.TOPIC_FILTER_INVALID)), h("90 06 0001 00 00 01 8f")),
    # ---- UNSUBSCRIBE / UNSUBACK
    ((3, 4), Unsubscribe(2, ("a/b",)), h("a2 07 0002 0003 612f62")),
    ((5,), Unsubscribe(2, ("a/b", "c")), h("a2 0b 0002 00 0003 612f62 0001 63")),
    ((3, 4), Unsuback(2), h("b0 02 0002")),
    ((5,), Unsuback(2, (0,)), h("b0 04 0002 00 00")),
    ((5,), Unsuback(2, (R.NO_SUBSCRIPTION_EXISTED, 0)), h("b0 05 0002 00 11 00")),
    # ---- PINGREQ / PINGRESP
    ((3, 4, 5), Pingreq(), h("c0 00")),
    ((3, 4, 5), Pingresp(), h("d0 00")),
    # ---- DISCONNECT
    ((3, 4, 5), Disconnect(), h("e0 00")),
    ((5,), Disconnect(R.DISCONNECT_WITH_WILL_MESSAGE), h("e0 01 04")),
    ((5,), Disconnect(R.SUCCESS, {P.SESSION_EXPIRY_INTERVAL: 0}), h("e0 07 00 05 11 00000000")),
    ((5,), Disconnect(R.SESSION_TAKEN_OVER), h("e0 01 8e")),
    # ---- AUTH
    ((5,), Auth(), h("f0 00")),
    ((5,), Auth(R.CONTINUE_AUTHENTICATION), h("f0 01 18")),
    ((5,), Auth(R.CONTINUE_AUTHENTICATION, {P.AUTHENTICATION_METHOD: "SCRAM"}),
     h("f0 0a 18 08 15 0005 53 43 52 41 4d")),
]

KNOWN_CASES = [
    pytest.param(v, pkt, frame, id=f"v{v}-{type(pkt).__name__}-{i}")
    for i, (versions, pkt, frame) in enumerate(KNOWN) for v in versions
]


@pytest.mark.parametrize("version, packet, frame", KNOWN_CASES)
def test_known_packet_encodes_to_known_bytes(version, packet, frame):
    assert codec.encode(packet, version) == frame


@pytest.mark.parametrize("version, packet, frame", KNOWN_CASES)
def test_known_bytes_decode_to_known_packet(version, packet, frame):
    assert decode_frame(frame, version) == packet


def test_decode_accepts_memoryview_and_bytearray_bodies():
    frame = h("30 0a 0003 612f62 68656c6c6f")
    for body in (memoryview(frame)[2:], bytearray(frame[2:])):
        p = codec.decode(0x30, body, 4)
        assert p == Publish("a/b", b"hello")
        assert type(p.payload) is bytes


def test_decoded_publish_payload_is_bytes():
    p = decode_frame(h("30 0a 0003 612f62 68656c6c6f"), 4)
    assert type(p.payload) is bytes


# ---- 3.1.1 forms of 5.0-only fields -------------------------------------------------

def test_v311_encoding_drops_v5_fields():
    assert codec.encode(Puback(7, R.NO_MATCHING_SUBSCRIBERS, {P.REASON_STRING: "x"}), 4) \
        == h("40 02 0007")
    assert codec.encode(Disconnect(R.SERVER_SHUTTING_DOWN), 4) == h("e0 00")
    assert codec.encode(Unsuback(2, (0x11,)), 4) == h("b0 02 0002")
    assert codec.encode(Publish("a", b"", properties={P.CONTENT_TYPE: "x"}), 4) == h("30 03 0001 61")


@pytest.mark.parametrize("reason, code", [
    (R.SERVER_BUSY, 3), (R.BANNED, 5), (R.SERVER_MOVED, 3), (R.USE_ANOTHER_SERVER, 3),
    (R.SERVER_SHUTTING_DOWN, 3), (R.QUOTA_EXCEEDED, 3),  # unmapped failure: unavailable
])
def test_v311_connack_maps_v5_reasons(reason, code):
    assert codec.encode(Connack(False, reason), 4) == bytes((0x20, 2, 0, code))


def test_v311_suback_failure_codes_become_0x80():
    assert codec.encode(Suback(1, (R.NOT_AUTHORIZED, R.TOPIC_FILTER_INVALID, 1)), 4) \
        == h("90 05 0001 80 80 01")


def test_v5_auth_cannot_be_encoded_for_v311():
    with pytest.raises(LocalMqttError):
        codec.encode(Auth(), 4)


@pytest.mark.parametrize("packet, version", [
    (Connect("c", 4), 5),                       # level differs from version
    (Connect("c", 4, password=b"x"), 4),        # 3.1.1 password needs a user name
    (Publish("a", b"", 1, packet_id=0), 4),     # QoS 1 needs a packet id
    (Publish("a", b"", 3), 4),                  # QoS 3
    (Puback(0), 4),
    (Puback(7, 0x92), 5),                       # not a PUBACK reason
    (Connack(True, R.NOT_AUTHORIZED), 5),       # session present with a failure
    (Subscribe(1, ()), 4),
    (Unsubscribe(1, ()), 4),
    (Suback(1, ()), 5),
    (Disconnect(R.GRANTED_QOS_1), 5),
    (Publish("a", b"", properties={P.SESSION_EXPIRY_INTERVAL: 1}), 5),  # not allowed here
    (Publish("a", b"", properties={P.PAYLOAD_FORMAT_INDICATOR: 2}), 5),
    (Connect("\udc80", 4), 4),                  # lone surrogate
    (Publish("a", b"", properties={P.USER_PROPERTY: [("a", 1)]}), 5),
])
def test_invalid_packets_are_local_errors(packet, version):
    with pytest.raises(LocalMqttError):
        codec.encode(packet, version)


# ---- publish_parts -------------------------------------------------------------------

@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("payload", [b"", b"x" * 10, b"y" * 200, b"z" * 20000])
@pytest.mark.parametrize("props", [None, {}, {P.MESSAGE_EXPIRY_INTERVAL: 5,
                                             P.SUBSCRIPTION_IDENTIFIER: [7]}])
def test_publish_parts_match_encode(version, qos, payload, props):
    topic = "sensors/ünïcode/" + "t" * 150
    head, tail = codec.publish_parts(version, topic, payload, qos, True, qos > 0, props)
    pid = 0x1234 if qos else 0
    frame = head + pid.to_bytes(2, "big") + tail if qos else head + tail
    pkt = Publish(topic, payload, qos, True, qos > 0, pid, dict(props or {}))
    assert frame == codec.encode(pkt, version)
    expected = pkt if version == 5 else Publish(topic, payload, qos, True, qos > 0, pid, {})
    assert decode_frame(frame, version) == expected


def test_publish_parts_head_is_header_and_topic():
    head, tail = codec.publish_parts(4, "a/b", b"hello", 1, False, False, None)
    assert head == h("32 0c 0003 612f62")
    assert tail == b"hello"
    head, tail = codec.publish_parts(5, "a/b", b"hello", 0, True, False, None)
    assert head == h("31 0b 0003 612f62")
    assert tail == b"\x00hello"


# ---- variable byte integers ----------------------------------------------------------

@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
    (2097151, "ffff7f"), (2097152, "80808001"), (268435455, "ffffff7f"),
])
def test_varint_known_encodings(value, encoded):
    assert encode_varint(value) == h(encoded)
    assert read_varint(h(encoded), 0, len(encoded) // 2) == (value, len(encoded) // 2)


@pytest.mark.parametrize("encoded", ["8000", "ff8000", "80808000"])
def test_varint_non_minimal_is_malformed(encoded):
    with pytest.raises(MalformedPacket):
        read_varint(h(encoded), 0, len(encoded) // 2)


def test_varint_five_bytes_is_malformed():
    with pytest.raises(MalformedPacket):
        read_varint(h("ffffffff01"), 0, 5)


def test_varint_too_large_cannot_be_encoded():
    with pytest.raises(LocalMqttError):
        encode_varint(268435456)


# ---- malformed and forbidden input ---------------------------------------------------

def props(*parts: str) -> str:
    """A property block from hex parts (length computed)."""
    body = h("".join(parts))
    return encode_varint(len(body)).hex() + body.hex()


CONNECT_V4 = "0004 4d515454 04"
CONNECT_V5 = "0004 4d515454 05"

M, PV = MalformedPacket, ProtocolViolation
BAD = [
    # --- fixed header
    ("type 0", 4, 0x00, "", M, R.MALFORMED_PACKET),
    ("PINGREQ flags", 4, 0xC1, "", M, R.MALFORMED_PACKET),
    ("PUBACK flags", 5, 0x42, "0001", M, R.MALFORMED_PACKET),
    ("PUBREL flags 0", 4, 0x60, "0001", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE flags 0", 4, 0x80, "0001 0001 61 00", M, R.MALFORMED_PACKET),
    ("UNSUBSCRIBE flags", 4, 0xA3, "0001 0001 61", M, R.MALFORMED_PACKET),
    ("CONNECT flags", 4, 0x12, CONNECT_V4 + "02 0000 0000", M, R.MALFORMED_PACKET),
    ("AUTH in 3.1.1", 4, 0xF0, "", PV, R.PROTOCOL_ERROR),
    # --- PUBLISH
    ("PUBLISH QoS 3", 4, 0x36, "0001 61 0001", M, R.MALFORMED_PACKET),
    ("PUBLISH DUP QoS 0", 4, 0x38, "0001 61", M, R.MALFORMED_PACKET),
    ("PUBLISH packet id 0", 4, 0x32, "0001 61 0000", PV, R.PROTOCOL_ERROR),
    ("PUBLISH topic +", 4, 0x30, "0003 612f2b", PV, R.TOPIC_NAME_INVALID),
    ("PUBLISH topic #", 5, 0x30, "0001 23 00", PV, R.TOPIC_NAME_INVALID),
    ("PUBLISH topic NUL", 4, 0x30, "0003 610062", M, R.MALFORMED_PACKET),
    ("PUBLISH topic bad UTF-8", 4, 0x30, "0002 c328", M, R.MALFORMED_PACKET),
    ("PUBLISH topic surrogate", 4, 0x30, "0003 eda080", M, R.MALFORMED_PACKET),
    ("PUBLISH topic overlong", 4, 0x30, "0002 c080", M, R.MALFORMED_PACKET),
    ("PUBLISH empty topic 3.1.1", 4, 0x30, "0000 61", PV, R.TOPIC_NAME_INVALID),
    ("PUBLISH empty topic no alias", 5, 0x30, "0000 00 61", PV, R.PROTOCOL_ERROR),
    ("PUBLISH topic too long", 4, 0x30, "0005 61", M, R.MALFORMED_PACKET),
    ("PUBLISH empty body", 4, 0x30, "", M, R.MALFORMED_PACKET),
    ("PUBLISH no packet id", 4, 0x32, "0001 61 00", M, R.MALFORMED_PACKET),
    ("PUBLISH props too long", 5, 0x30, "0001 61 05 0101", M, R.MALFORMED_PACKET),
    ("PUBLISH no props", 5, 0x30, "0001 61", M, R.MALFORMED_PACKET),
    # --- properties
    ("unknown property", 5, 0x30, "0001 61" + props("7f 00"), M, R.MALFORMED_PACKET),
    ("property id 0", 5, 0x30, "0001 61" + props("00"), M, R.MALFORMED_PACKET),
    ("property not allowed", 5, 0x30, "0001 61" + props("11 00000001"), PV, R.PROTOCOL_ERROR),
    ("property twice", 5, 0x30, "0001 61" + props("02 00000001 02 00000002"), PV,
     R.PROTOCOL_ERROR),
    ("payload format 2", 5, 0x30, "0001 61" + props("01 02"), PV, R.PROTOCOL_ERROR),
    ("property value truncated", 5, 0x30, "0001 61" + props("02 0000"), M, R.MALFORMED_PACKET),
    ("property string bad UTF-8", 5, 0x30, "0001 61" + props("03 0001 ff"), M,
     R.MALFORMED_PACKET),
    ("property string NUL", 5, 0x30, "0001 61" + props("03 0001 00"), M, R.MALFORMED_PACKET),
    ("subscription id 0", 5, 0x30, "0001 61" + props("0b 00"), PV, R.PROTOCOL_ERROR),
    ("subscription id 5 bytes", 5, 0x30, "0001 61" + props("0b ffffffff01"), M,
     R.MALFORMED_PACKET),
    ("subscription id non-minimal", 5, 0x30, "0001 61" + props("0b 8100"), M,
     R.MALFORMED_PACKET),
    ("receive maximum 0", 5, 0x10, CONNECT_V5 + "02 0000" + props("21 0000") + "0000", PV,
     R.PROTOCOL_ERROR),
    ("maximum packet size 0", 5, 0x10, CONNECT_V5 + "02 0000" + props("27 00000000") + "0000",
     PV, R.PROTOCOL_ERROR),
    ("request problem info 2", 5, 0x10, CONNECT_V5 + "02 0000" + props("17 02") + "0000", PV,
     R.PROTOCOL_ERROR),
    ("request response info 2", 5, 0x10, CONNECT_V5 + "02 0000" + props("19 02") + "0000", PV,
     R.PROTOCOL_ERROR),
    ("maximum QoS 2", 5, 0x20, "00 00" + props("24 02"), PV, R.PROTOCOL_ERROR),
    ("retain available 2", 5, 0x20, "00 00" + props("25 02"), PV, R.PROTOCOL_ERROR),
    ("wildcard available 3", 5, 0x20, "00 00" + props("28 03"), PV, R.PROTOCOL_ERROR),
    ("auth data without method", 5, 0x10, CONNECT_V5 + "02 0000" + props("16 0001 78") + "0000",
     PV, R.PROTOCOL_ERROR),
    ("will property not allowed", 5, 0x10,
     CONNECT_V5 + "06 0000 00 0000" + props("11 00000001") + "0001 77 0000", PV,
     R.PROTOCOL_ERROR),
    ("two subscription ids in SUBSCRIBE", 5, 0x82, "0001" + props("0b01 0b02") + "0001 61 00",
     PV, R.PROTOCOL_ERROR),
    # --- CONNECT
    ("protocol name", 4, 0x10, "0004 4d515458 04 02 0000 0000", PV, R.PROTOCOL_ERROR),
    ("name/level mismatch MQTT 3", 4, 0x10, "0004 4d515454 03 02 0000 0000", PV,
     R.PROTOCOL_ERROR),
    ("name/level mismatch MQIsdp 4", 4, 0x10, "0006 4d5149736470 04 02 0000 0000", PV,
     R.PROTOCOL_ERROR),
    ("unknown level", 4, 0x10, "0004 4d515454 06 02 0000 0000", UnsupportedProtocolVersion,
     R.UNSUPPORTED_PROTOCOL_VERSION),
    ("reserved flag", 4, 0x10, CONNECT_V4 + "03 0000 0000", M, R.MALFORMED_PACKET),
    ("will QoS without will", 4, 0x10, CONNECT_V4 + "0a 0000 0000", M, R.MALFORMED_PACKET),
    ("will retain without will", 4, 0x10, CONNECT_V4 + "22 0000 0000", M, R.MALFORMED_PACKET),
    ("will QoS 3", 4, 0x10, CONNECT_V4 + "1e 0000 0000 0001 77 0000", M, R.MALFORMED_PACKET),
    ("password without user 3.1.1", 4, 0x10, CONNECT_V4 + "42 0000 0000 0001 70", M,
     R.MALFORMED_PACKET),
    ("password without user 3.1", 3, 0x10, "0006 4d5149736470 03 42 0000 0000 0001 70", M,
     R.MALFORMED_PACKET),
    ("CONNECT leftover", 4, 0x10, CONNECT_V4 + "02 0000 0000 00", M, R.MALFORMED_PACKET),
    ("CONNECT truncated", 4, 0x10, CONNECT_V4 + "02 00", M, R.MALFORMED_PACKET),
    ("CONNECT missing password", 4, 0x10, CONNECT_V4 + "c2 0000 0000 0001 75", M,
     R.MALFORMED_PACKET),
    ("CONNECT client id NUL", 4, 0x10, CONNECT_V4 + "02 0000 0001 00", M, R.MALFORMED_PACKET),
    # --- SUBSCRIBE / UNSUBSCRIBE
    ("SUBSCRIBE no filter", 4, 0x82, "0001", PV, R.PROTOCOL_ERROR),
    ("SUBSCRIBE no filter v5", 5, 0x82, "0001 00", PV, R.PROTOCOL_ERROR),
    ("SUBSCRIBE packet id 0", 4, 0x82, "0000 0001 61 00", PV, R.PROTOCOL_ERROR),
    ("SUBSCRIBE reserved bits v5", 5, 0x82, "0001 00 0001 61 40", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE reserved bits 7 v5", 5, 0x82, "0001 00 0001 61 80", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE v5 option bits in 3.1.1", 4, 0x82, "0001 0001 61 04", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE QoS 3", 4, 0x82, "0001 0001 61 03", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE retain handling 3", 5, 0x82, "0001 00 0001 61 30", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE missing options", 4, 0x82, "0001 0001 61", M, R.MALFORMED_PACKET),
    ("SUBSCRIBE no local shared", 5, 0x82, "0001 00 000a 247368617265 2f672f 61 04", PV,
     R.PROTOCOL_ERROR),
    ("UNSUBSCRIBE no filter", 4, 0xA2, "0001", PV, R.PROTOCOL_ERROR),
    ("UNSUBSCRIBE no filter v5", 5, 0xA2, "0001 00", PV, R.PROTOCOL_ERROR),
    ("UNSUBSCRIBE truncated filter", 4, 0xA2, "0001 0003 61", M, R.MALFORMED_PACKET),
    # --- acks
    ("PUBACK short", 4, 0x40, "00", M, R.MALFORMED_PACKET),
    ("PUBACK long 3.1.1", 4, 0x40, "0001 00", M, R.MALFORMED_PACKET),
    ("PUBACK packet id 0", 4, 0x40, "0000", PV, R.PROTOCOL_ERROR),
    ("PUBACK bad reason", 5, 0x40, "0001 05", PV, R.PROTOCOL_ERROR),
    ("PUBREL bad reason", 5, 0x62, "0001 10", PV, R.PROTOCOL_ERROR),
    ("PUBACK leftover", 5, 0x40, "0001 00 00 00", M, R.MALFORMED_PACKET),
    ("PUBCOMP props past end", 5, 0x70, "0001 00 03 1f", M, R.MALFORMED_PACKET),
    ("PUBACK not-allowed property", 5, 0x40, "0001 00" + props("01 00"), PV,
     R.PROTOCOL_ERROR),
    ("CONNACK reserved flags", 4, 0x20, "02 00", M, R.MALFORMED_PACKET),
    ("CONNACK unknown return code", 4, 0x20, "00 06", PV, R.PROTOCOL_ERROR),
    ("CONNACK bad reason v5", 5, 0x20, "00 01 00", PV, R.PROTOCOL_ERROR),
    ("CONNACK session present with failure", 5, 0x20, "01 87 00", PV, R.PROTOCOL_ERROR),
    ("CONNACK leftover", 4, 0x20, "00 00 00", M, R.MALFORMED_PACKET),
    ("SUBACK no codes", 4, 0x90, "0001", PV, R.PROTOCOL_ERROR),
    ("SUBACK v5 code in 3.1.1", 4, 0x90, "0001 87", PV, R.PROTOCOL_ERROR),
    ("UNSUBACK leftover 3.1.1", 4, 0xB0, "0001 00", M, R.MALFORMED_PACKET),
    ("UNSUBACK no codes v5", 5, 0xB0, "0001 00", PV, R.PROTOCOL_ERROR),
    ("PINGREQ with body", 4, 0xC0, "00", M, R.MALFORMED_PACKET),
    ("PINGRESP with body", 5, 0xD0, "00", M, R.MALFORMED_PACKET),
    ("DISCONNECT with body 3.1.1", 4, 0xE0, "00", M, R.MALFORMED_PACKET),
    ("DISCONNECT bad reason", 5, 0xE0, "01", PV, R.PROTOCOL_ERROR),
    ("DISCONNECT leftover", 5, 0xE0, "00 00 00", M, R.MALFORMED_PACKET),
    ("DISCONNECT property not allowed", 5, 0xE0, "00" + props("01 00"), PV, R.PROTOCOL_ERROR),
    ("AUTH bad reason", 5, 0xF0, "00 ", None, None),  # 0x00 is fine: control case
    ("AUTH bad reason 0x04", 5, 0xF0, "04", PV, R.PROTOCOL_ERROR),
    ("AUTH leftover", 5, 0xF0, "18 00 00", M, R.MALFORMED_PACKET),
]


@pytest.mark.parametrize("name, version, b0, body, exc, reason", BAD, ids=[b[0] for b in BAD])
def test_malformed_or_forbidden_input_raises(name, version, b0, body, exc, reason):
    if exc is None:
        codec.decode(b0, h(body), version)  # must not raise
        return
    with pytest.raises(exc) as info:
        codec.decode(b0, h(body), version)
    assert type(info.value) is exc
    assert info.value.reason == reason


def test_unsupported_level_carries_the_level():
    with pytest.raises(UnsupportedProtocolVersion) as info:
        codec.decode(0x10, h("0004 4d515454 07 02 0000 0000"), 4)
    assert info.value.level == 7


def test_v5_password_without_user_name_is_allowed():
    p = codec.decode(0x10, h(CONNECT_V5 + "42 0000 00 0000 0001 70"), 5)
    assert p.username is None and p.password == b"p"


def test_subscribe_does_not_validate_filter_syntax():
    # "a/#/b" is an invalid filter: the session answers SUBACK 0x8F, the codec passes it.
    p = codec.decode(0x82, h("0001 0005 612f232f62 00"), 4)
    assert p.subscriptions == (Subscription("a/#/b", 0),)


def test_v5_short_forms_decode():
    assert codec.decode(0x40, h("0001"), 5) == Puback(1)
    assert codec.decode(0x40, h("0001 10"), 5) == Puback(1, R.NO_MATCHING_SUBSCRIBERS)
    assert codec.decode(0x40, h("0001 10 00"), 5) == Puback(1, R.NO_MATCHING_SUBSCRIBERS)
    assert codec.decode(0xE0, b"", 5) == Disconnect()
    assert codec.decode(0xE0, h("04"), 5) == Disconnect(R.DISCONNECT_WITH_WILL_MESSAGE)
    assert codec.decode(0xE0, h("00 00"), 5) == Disconnect()
    assert codec.decode(0xF0, b"", 5) == Auth()
    assert codec.decode(0xF0, h("19 00"), 5) == Auth(R.RE_AUTHENTICATE)


def test_reason_codes_decode_as_reason_code_members():
    p = codec.decode(0x40, h("0001 97"), 5)
    assert p.reason_code is R.QUOTA_EXCEEDED
    assert decode_frame(h("20 02 00 05"), 4).reason_code is R.NOT_AUTHORIZED


def test_user_properties_and_subscription_ids_decode_as_lists():
    p = codec.decode(0x30, h("0001 61" + props("26 0001 61 0001 62", "0b 05")), 5)
    assert p.properties == {P.USER_PROPERTY: [("a", "b")], P.SUBSCRIPTION_IDENTIFIER: [5]}
