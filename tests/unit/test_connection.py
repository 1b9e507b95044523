"""MqttConnection: framing over any chunking, the state table, topic aliases both ways,
the size limits and the error replies. One suite for 3.1.1 and 5.0 where it applies."""

from __future__ import annotations

import random

import pytest

from node.mqtt import codec
from node.mqtt.codes import PropertyId as P, ReasonCode as R
from node.mqtt.connection import NEED_DATA, ConnectionState as S, MqttConnection
from node.mqtt.errors import (
    LocalMqttError, MalformedPacket, PacketTooLarge, ProtocolViolation,
    UnsupportedProtocolVersion,
)
from node.mqtt.packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe,
)

VERSIONS = [3, 4, 5]


def connect_packet(version: int, **props) -> Connect:
    return Connect("c", version, "MQIsdp" if version == 3 else "MQTT",
                   properties={P[k.upper()]: v for k, v in props.items()})


def drain(conn: MqttConnection) -> list:
    out = []
    while (p := conn.next_packet()) is not NEED_DATA:
        out.append(p)
    return out


def connected(version: int, *, accept: bool = True, **kwargs) -> MqttConnection:
    props = kwargs.pop("props", {})
    conn = MqttConnection(**kwargs)
    conn.receive_data(codec.encode(connect_packet(version, **props), version))
    assert isinstance(conn.next_packet(), Connect)
    if accept:
        conn.send(Connack())
    return conn


def client_stream(version: int) -> tuple[bytes, list]:
    v5 = version == 5
    pkts = [
        connect_packet(version),
        Publish("a/b", b"hello"),
        Publish("a/b", b"x" * 300, 1, True, False, 1),
        Publish("big", b"y" * 70000, 2, False, True, 2),
        Puback(9), Pubrec(10), Pubrel(11, R.PACKET_IDENTIFIER_NOT_FOUND if v5 else 0),
        Pubcomp(12),
        Subscribe(3, (Subscription("a/#", 1), Subscription("+/b", 2))),
        Unsubscribe(4, ("a/#",)), Pingreq(),
        Publish("c", b"", 0, False, False, 0,
                {P.USER_PROPERTY: [("k", "v")]} if v5 else {}),
        Disconnect(),
    ]
    return b"".join(codec.encode(p, version) for p in pkts), pkts


# ---- framing -------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_stream_gives_same_packets_whole_split_and_byte_by_byte(version):
    stream, expected = client_stream(version)
    rnd = random.Random(version)

    def feed(chunks):
        conn = MqttConnection()
        out = []
        for c in chunks:
            conn.receive_data(c)
            out.extend(drain(conn))
        return out

    assert feed([stream]) == expected
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randint(1, 40)))
        assert feed([stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]) == expected
    assert feed([stream[i:i + 1] for i in range(len(stream))]) == expected


def test_next_packet_needs_data_until_packet_is_complete():
    conn = MqttConnection()
    frame = codec.encode(connect_packet(4), 4)
    for b in frame[:-1]:
        conn.receive_data(bytes((b,)))
        assert conn.next_packet() is NEED_DATA
    conn.receive_data(frame[-1:])
    assert conn.next_packet() == connect_packet(4)
    assert conn.next_packet() is NEED_DATA


def test_large_packet_body_is_joined_once_not_per_chunk():
    conn = connected(4)
    frame = codec.encode(Publish("t", b"z" * 1_000_000), 4)
    for i in range(0, len(frame) - 1, 1000):
        conn.receive_data(frame[i:min(i + 1000, len(frame) - 1)])
        assert conn.next_packet() is NEED_DATA
    # Only the first chunk (with the fixed header) was merged: the body chunks wait in a
    # list and are joined once, when the packet is complete (O(n), not O(n^2)).
    assert len(conn._buf) - conn._pos <= 1000
    conn.receive_data(frame[-1:])
    assert conn.next_packet().payload == b"z" * 1_000_000


def test_payload_is_bytes():
    conn = connected(4)
    conn.receive_data(bytearray(codec.encode(Publish("t", b"abc"), 4)))
    p = conn.next_packet()
    assert type(p.payload) is bytes and p.payload == b"abc"


def test_packet_too_large_is_raised_from_the_fixed_header():
    conn = connected(5, max_packet_size=100)
    frame = codec.encode(Publish("t", b"x" * 200), 5)
    conn.receive_data(frame[:4])  # header only: the body has not arrived
    with pytest.raises(PacketTooLarge) as info:
        conn.next_packet()
    assert info.value.reason == R.PACKET_TOO_LARGE
    assert conn.state is S.ERROR


def test_packet_of_exactly_max_size_is_accepted():
    frame = codec.encode(Publish("t", b"x" * 50), 5)
    conn = connected(5, max_packet_size=len(frame))
    conn.receive_data(frame)
    assert conn.next_packet().payload == b"x" * 50


def test_five_byte_remaining_length_is_malformed():
    conn = connected(4)
    conn.receive_data(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedPacket):
        conn.next_packet()


def test_non_minimal_remaining_length_is_malformed():
    conn = connected(4)
    conn.receive_data(b"\xc0\x80\x00")
    with pytest.raises(MalformedPacket):
        conn.next_packet()


def test_eof_in_the_middle_of_a_packet_is_malformed():
    conn = connected(4)
    conn.receive_data(codec.encode(Publish("t", b"abc"), 4)[:-1])
    assert conn.next_packet() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(MalformedPacket):
        conn.next_packet()


def test_eof_between_packets_is_need_data():
    conn = connected(4)
    conn.receive_data(b"")
    assert conn.next_packet() is NEED_DATA


# ---- client state --------------------------------------------------------------------

@pytest.mark.parametrize("first", [Publish("a", b""), Pingreq(), Subscribe(1, (Subscription("a"),)),
                                   Disconnect()])
def test_first_packet_must_be_connect(first):
    conn = MqttConnection()
    conn.receive_data(codec.encode(first, 4))
    with pytest.raises(ProtocolViolation):
        conn.next_packet()
    assert conn.state is S.ERROR


def test_first_packet_is_refused_from_its_fixed_header():
    conn = MqttConnection()
    conn.receive_data(b"\x30\x7f")  # a PUBLISH's header, body not yet sent
    with pytest.raises(ProtocolViolation):
        conn.next_packet()


@pytest.mark.parametrize("version", VERSIONS)
def test_second_connect_is_a_protocol_error(version):
    conn = connected(version)
    conn.receive_data(codec.encode(connect_packet(version), version))
    with pytest.raises(ProtocolViolation) as info:
        conn.next_packet()
    assert info.value.reason == R.PROTOCOL_ERROR


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("packet", [Connack(), Suback(1, (0,)), Unsuback(1, (0,)), Pingresp()])
def test_server_only_packets_from_the_client_are_protocol_errors(version, packet):
    conn = connected(version)
    conn.receive_data(codec.encode(packet, version))
    with pytest.raises(ProtocolViolation):
        conn.next_packet()


@pytest.mark.parametrize("version", [3, 4])
def test_auth_is_a_protocol_error_before_v5(version):
    conn = connected(version)
    conn.receive_data(b"\xf0\x00")
    with pytest.raises(ProtocolViolation):
        conn.next_packet()


def test_auth_is_accepted_in_v5():
    conn = connected(5)
    conn.receive_data(codec.encode(Auth(R.RE_AUTHENTICATE, {P.AUTHENTICATION_METHOD: "m"}), 5))
    assert conn.next_packet() == Auth(R.RE_AUTHENTICATE, {P.AUTHENTICATION_METHOD: "m"})


def test_error_is_sticky():
    conn = connected(4)
    conn.receive_data(b"\x00\x00" + codec.encode(Pingreq(), 4))
    with pytest.raises(MalformedPacket) as first:
        conn.next_packet()
    for _ in range(3):
        with pytest.raises(MalformedPacket) as again:
            conn.next_packet()
        assert again.value is first.value
    assert conn.state is S.ERROR


def test_packets_before_an_error_are_returned_first():
    conn = connected(4)
    conn.receive_data(codec.encode(Pingreq(), 4) + b"\x36\x00")
    assert conn.next_packet() == Pingreq()
    with pytest.raises(MalformedPacket):
        conn.next_packet()


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_records_version_and_peer_limits(version):
    conn = MqttConnection()
    assert conn.version is None and conn.state is S.AWAIT_CONNECT
    props = {"maximum_packet_size": 1000, "topic_alias_maximum": 7} if version == 5 else {}
    conn.receive_data(codec.encode(connect_packet(version, **props), version))
    conn.next_packet()
    assert conn.version == version
    assert conn.peer_max_packet_size == (1000 if version == 5 else 268_435_460)
    assert conn.peer_topic_alias_maximum == (7 if version == 5 else 0)
    assert conn.state is S.AWAIT_CONNECT  # until the CONNACK is sent


def test_client_may_pipeline_packets_before_connack():
    conn = MqttConnection()
    conn.receive_data(codec.encode(connect_packet(4), 4) + codec.encode(Publish("a", b"x"), 4))
    assert drain(conn) == [connect_packet(4), Publish("a", b"x")]


def test_client_disconnect_closes_and_later_data_is_an_error():
    conn = connected(4)
    conn.receive_data(codec.encode(Disconnect(), 4))
    assert conn.next_packet() == Disconnect()
    assert conn.state is S.CLOSED
    assert conn.next_packet() is NEED_DATA
    conn.receive_data(codec.encode(Pingreq(), 4))
    with pytest.raises(ProtocolViolation):
        conn.next_packet()
    assert conn.state is S.ERROR


def test_after_server_disconnect_client_data_is_dropped_unread():
    conn = connected(5)
    conn.send(Disconnect(R.SESSION_TAKEN_OVER))
    conn.receive_data(codec.encode(Pingreq(), 5))
    assert conn.next_packet() is NEED_DATA
    assert conn.state is S.CLOSED


def test_after_refusing_connack_pipelined_packets_are_dropped():
    conn = MqttConnection()
    conn.receive_data(codec.encode(connect_packet(4), 4) + codec.encode(Publish("a", b""), 4))
    assert isinstance(conn.next_packet(), Connect)
    conn.send(Connack(False, R.NOT_AUTHORIZED))
    assert conn.next_packet() is NEED_DATA


# ---- inbound topic aliases (5.0) -----------------------------------------------------

def publish_frame(topic, alias=None, **kw):
    props = {P.TOPIC_ALIAS: alias} if alias is not None else {}
    return codec.encode(Publish(topic, b"p", properties=props, **kw), 5)


def test_inbound_alias_is_set_then_resolved_and_removed_from_properties():
    conn = connected(5, topic_alias_maximum=3)
    conn.receive_data(publish_frame("a/b", 2) + publish_frame("", 2) + publish_frame("c", 2)
                      + publish_frame("", 2) + publish_frame("a/b"))
    got = drain(conn)
    assert [p.topic for p in got] == ["a/b", "a/b", "c", "c", "a/b"]
    assert all(p.properties == {} for p in got)


@pytest.mark.parametrize("alias", [0, 4, 65535])
def test_inbound_alias_out_of_range_is_topic_alias_invalid(alias):
    conn = connected(5, topic_alias_maximum=3)
    conn.receive_data(publish_frame("a", alias))
    with pytest.raises(ProtocolViolation) as info:
        conn.next_packet()
    assert info.value.reason == R.TOPIC_ALIAS_INVALID


def test_inbound_alias_with_alias_maximum_zero_is_invalid():
    conn = connected(5)
    conn.receive_data(publish_frame("a", 1))
    with pytest.raises(ProtocolViolation) as info:
        conn.next_packet()
    assert info.value.reason == R.TOPIC_ALIAS_INVALID


def test_unknown_inbound_alias_is_a_protocol_error():
    conn = connected(5, topic_alias_maximum=3)
    conn.receive_data(publish_frame("", 1))
    with pytest.raises(ProtocolViolation) as info:
        conn.next_packet()
    assert info.value.reason == R.PROTOCOL_ERROR


def test_subscription_identifier_from_a_client_is_a_protocol_error():
    conn = connected(5)
    conn.receive_data(codec.encode(Publish("a", b"", properties={
        P.SUBSCRIPTION_IDENTIFIER: [1]}), 5))
    with pytest.raises(ProtocolViolation):
        conn.next_packet()


def test_other_publish_properties_are_kept():
    conn = connected(5, topic_alias_maximum=3)
    props = {P.TOPIC_ALIAS: 1, P.CONTENT_TYPE: "t", P.USER_PROPERTY: [("a", "b")]}
    conn.receive_data(codec.encode(Publish("x", b"", properties=props), 5))
    assert conn.next_packet().properties == {P.CONTENT_TYPE: "t", P.USER_PROPERTY: [("a", "b")]}


# ---- sending -------------------------------------------------------------------------

def test_send_before_connect_is_a_local_error():
    with pytest.raises(LocalMqttError):
        MqttConnection().send(Connack())


@pytest.mark.parametrize("version", VERSIONS)
def test_only_connack_is_sent_before_connected(version):
    conn = connected(version, accept=False)
    for p in (Publish("a", b""), Puback(1), Suback(1, (0,)), Pingresp(), Disconnect()):
        with pytest.raises(LocalMqttError):
            conn.send(p)
    assert conn.send(Connack(True)) == codec.encode(Connack(True), version)
    assert conn.state is S.CONNECTED
    with pytest.raises(LocalMqttError):
        conn.send(Connack())


def test_auth_may_be_sent_before_connack_in_v5():
    conn = connected(5, accept=False)
    assert conn.send(Auth(R.CONTINUE_AUTHENTICATION)) == b"\xf0\x01\x18"
    assert conn.state is S.AWAIT_CONNECT
    conn.send(Connack())
    assert conn.state is S.CONNECTED


def test_auth_cannot_be_sent_in_v311():
    conn = connected(4)
    with pytest.raises(LocalMqttError):
        conn.send(Auth())


@pytest.mark.parametrize("version", VERSIONS)
def test_refusing_connack_closes(version):
    conn = connected(version, accept=False)
    data = conn.send(Connack(False, R.NOT_AUTHORIZED))
    assert data == (b"\x20\x03\x00\x87\x00" if version == 5 else b"\x20\x02\x00\x05")
    assert conn.state is S.CLOSED
    with pytest.raises(LocalMqttError):
        conn.send(Pingresp())


@pytest.mark.parametrize("version", VERSIONS)
def test_connected_server_sends_its_packets_then_disconnect_closes(version):
    conn = connected(version)
    for p in (Publish("a", b"x", 1, packet_id=1), Puback(1), Pubrec(2), Pubrel(3), Pubcomp(4),
              Suback(5, (0,)), Unsuback(6, (0,)), Pingresp()):
        assert conn.send(p) == codec.encode(p, version)
    for p in (Connect("x", version), Subscribe(1, (Subscription("a"),)), Pingreq(),
              Unsubscribe(1, ("a",))):
        with pytest.raises(LocalMqttError):
            conn.send(p)
    assert conn.send(Disconnect(R.SERVER_SHUTTING_DOWN)) == (
        b"\xe0\x01\x8b" if version == 5 else b"\xe0\x00")
    assert conn.state is S.CLOSED
    with pytest.raises(LocalMqttError):
        conn.send(Pingresp())


def test_replies_to_packets_read_before_client_disconnect_can_be_sent():
    conn = connected(4)
    conn.receive_data(codec.encode(Publish("a", b"", 1, packet_id=5), 4)
                      + codec.encode(Disconnect(), 4))
    assert [type(p) for p in drain(conn)] == [Publish, Disconnect]
    assert conn.send(Puback(5)) == b"\x40\x02\x00\x05"


# ---- outbound topic aliases ----------------------------------------------------------

def decode_frame(frame: bytes, version: int):
    conn = MqttConnection()
    conn.receive_data(codec.encode(connect_packet(version), version) + frame)
    conn.next_packet()
    b0 = frame[0]
    # decode directly (a client would send a PUBLISH the same way)
    from node.mqtt._framing import remaining_length
    rl, start = remaining_length(frame, 1, len(frame))
    return codec.decode(b0, frame[start:], version)


def test_encode_publish_assigns_then_reuses_aliases_until_exhausted():
    conn = connected(5, props={"topic_alias_maximum": 2})
    got = [decode_frame(conn.encode_publish(t, b"p", 1, False, False, 1, None), 5)
           for t in ("a", "b", "a", "c", "b", "c")]
    assert [(p.topic, p.properties.get(P.TOPIC_ALIAS)) for p in got] == [
        ("a", 1), ("b", 2), ("", 1), ("c", None), ("", 2), ("c", None)]


def test_encode_publish_keeps_caller_properties_unchanged():
    conn = connected(5, props={"topic_alias_maximum": 2})
    props = {P.MESSAGE_EXPIRY_INTERVAL: 5}
    frame = conn.encode_publish("a", b"p", 0, False, False, 0, props)
    assert props == {P.MESSAGE_EXPIRY_INTERVAL: 5}
    assert decode_frame(frame, 5).properties == {P.MESSAGE_EXPIRY_INTERVAL: 5,
                                                 P.TOPIC_ALIAS: 1}


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_publish_without_aliases_equals_encode(version):
    conn = connected(version)
    p = Publish("a/b", b"payload", 2, True, True, 77)
    assert conn.encode_publish("a/b", b"payload", 2, True, True, 77, None) == \
        codec.encode(p, version)


def test_encode_publish_too_large_for_the_peer_is_returned_plain_without_alias():
    conn = connected(5, props={"maximum_packet_size": 20, "topic_alias_maximum": 1})
    big = conn.encode_publish("t", b"x" * 30, 0, False, False, 0, None)
    assert len(big) > conn.peer_max_packet_size  # the caller discards it
    assert decode_frame(big, 5).properties == {}
    small = conn.encode_publish("t", b"x" * 10, 0, False, False, 0, None)
    assert len(small) <= 20
    assert decode_frame(small, 5).properties == {P.TOPIC_ALIAS: 1}  # alias not spent before


def test_encode_publish_does_not_spend_an_alias_on_a_packet_that_only_fits_without_it():
    conn = connected(5, props={"maximum_packet_size": 12, "topic_alias_maximum": 1})
    frame = conn.encode_publish("t", b"x" * 5, 0, False, False, 0, None)  # 12 bytes plain
    assert decode_frame(frame, 5).properties == {}
    frame = conn.encode_publish("u", b"", 0, False, False, 0, None)
    assert decode_frame(frame, 5).properties == {P.TOPIC_ALIAS: 1}


def test_encode_publish_before_connect_or_after_close_is_a_local_error():
    with pytest.raises(LocalMqttError):
        MqttConnection().encode_publish("a", b"", 0, False, False, 0, None)
    conn = connected(5)
    conn.send(Disconnect())
    with pytest.raises(LocalMqttError):
        conn.encode_publish("a", b"", 0, False, False, 0, None)


def test_encode_publish_works_before_connack_for_resumed_sessions():
    conn = connected(5, accept=False, props={"topic_alias_maximum": 1})
    frame = conn.encode_publish("a", b"", 1, False, True, 3, None)
    assert decode_frame(frame, 5) == Publish("a", b"", 1, False, True, 3, {P.TOPIC_ALIAS: 1})


# ---- error replies -------------------------------------------------------------------

def failing(conn: MqttConnection, data: bytes):
    conn.receive_data(data)
    with pytest.raises(Exception) as info:
        drain(conn)
    return info.value


def test_error_reply_v5_connected_is_disconnect_with_reason():
    conn = connected(5)
    err = failing(conn, b"\x36\x00")
    assert conn.error_reply(err) == b"\xe0\x01\x81"
    conn = connected(5, max_packet_size=20)
    err = failing(conn, b"\x30\x7f")
    assert conn.error_reply(err) == b"\xe0\x01\x95"


def test_error_reply_v311_connected_is_nothing():
    conn = connected(4)
    assert conn.error_reply(failing(conn, b"\x36\x00")) == b""


def test_error_reply_before_connack_is_nothing():
    conn = connected(5, accept=False)
    assert conn.error_reply(failing(conn, b"\x36\x00")) == b""


@pytest.mark.parametrize("level, name, reply", [
    (5, "MQTT", b"\x20\x03\x00\x84\x00"), (6, "MQTT", b"\x20\x02\x00\x01"),
    (2, "MQIsdp", b"\x20\x02\x00\x01"),
])
def test_error_reply_unsupported_version_is_connack(level, name, reply):
    body = bytes((0, len(name))) + name.encode() + bytes((level, 2, 0, 0, 0, 0))
    conn = MqttConnection()
    if level == 5:  # a 5.0 CONNECT we cannot parse as such is impossible; fake the error
        err = UnsupportedProtocolVersion("level 5 refused", 5)
    else:
        err = failing(conn, bytes((0x10, len(body))) + body)
        assert isinstance(err, UnsupportedProtocolVersion) and err.level == level
    assert conn.error_reply(err) == reply


def test_error_reply_other_connect_errors_are_nothing():
    conn = MqttConnection()
    err = failing(conn, b"\x10\x02\x00\x00")
    assert conn.error_reply(err) == b""


def test_outbound_aliases_are_bounded_whatever_the_client_allows():
    """A client allowing 65,535 aliases does not make the connection keep 65,535 topics:
    at most OUT_ALIASES of them and OUT_ALIAS_BYTES of topic text; the others go in full."""
    from node.mqtt.connection import OUT_ALIAS_BYTES, OUT_ALIASES
    conn = connected(5, props={"topic_alias_maximum": 65535})
    for i in range(3000):
        topic = f"long/{i}/" + "x" * 1000
        frame = conn.encode_publish(topic, b"p", 0, False, False, 0, None)
        assert topic.encode() in frame  # (its first PUBLISH, aliased or not, names it)
    # (filled to within one topic of the byte bound, and no further)
    assert OUT_ALIAS_BYTES - 1010 < conn._out_alias_bytes <= OUT_ALIAS_BYTES
    short = connected(5, props={"topic_alias_maximum": 65535})
    for i in range(5000):
        short.encode_publish(f"s/{i}", b"p", 0, False, False, 0, None)
    assert len(short._out_aliases) == OUT_ALIASES
