"""Packet bodies <-> packet objects, MQTT 3.1.1 (levels 3, 4) and 5.0 (level 5).

``decode(first_byte, body, version)`` turns one frame (the fixed header already split
off by the framing layer) into a packet from ``packets``; ``encode(packet, version)``
returns the whole frame. Both are pure functions. The decoders are reached through
``DECODERS[first_byte]``: one entry per fixed-header byte, so the packet type and its
flags are checked by one list lookup (a forbidden combination gets ``_bad_header``).
Each decoder reads ``buf[pos:end]`` in place (``buf`` is ``bytes``) so that
``MqttConnection`` never slices a body out of its receive buffer.

Reason codes are 5.0 values in every packet object; the 3.1.1 forms are produced and
read here (CONNACK return codes, SUBACK 0x80) and nowhere else.

The PUBLISH and PUBACK-family decoders and ``publish_parts`` are the hot path: straight
line code, no property machinery when the property length is 0.
"""

from __future__ import annotations

import struct
from typing import Callable

from ._framing import (
    encode_binary, encode_string, encode_varint, read_binary, read_string, read_u8,
    read_u16,
)
from .codes import (
    ALLOWED_PROPERTIES, CONNACK_V5_TO_311, MAX_REMAINING_LENGTH, WILL, ConnackCode311,
    PacketType, PropertyId, ReasonCode,
)
from .errors import LocalMqttError, MalformedPacket, MqttError, ProtocolViolation, \
    UnsupportedProtocolVersion
from .packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish,
    Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
)
from .properties import decode_properties, encode_properties

__all__ = ["encode", "decode", "publish_parts", "DECODERS"]

R = ReasonCode
_PT = PacketType
_A = ALLOWED_PROPERTIES
_A_CONNECT = _A[_PT.CONNECT]
_A_WILL = _A[WILL]
_A_CONNACK = _A[_PT.CONNACK]
_A_PUBLISH = _A[_PT.PUBLISH]
_A_ACK = _A[_PT.PUBACK]  # PUBACK, PUBREC, PUBREL, PUBCOMP allow the same set
_A_SUBSCRIBE = _A[_PT.SUBSCRIBE]
_A_SUBACK = _A[_PT.SUBACK]
_A_UNSUBSCRIBE = _A[_PT.UNSUBSCRIBE]
_A_UNSUBACK = _A[_PT.UNSUBACK]
_A_DISCONNECT = _A[_PT.DISCONNECT]
_A_AUTH = _A[_PT.AUTH]
assert _A[_PT.PUBREC] == _A[_PT.PUBREL] == _A[_PT.PUBCOMP] == _A_ACK

_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS
_AUTHENTICATION_METHOD = PropertyId.AUTHENTICATION_METHOD
_AUTHENTICATION_DATA = PropertyId.AUTHENTICATION_DATA
_SUBSCRIPTION_IDENTIFIER = PropertyId.SUBSCRIPTION_IDENTIFIER


def _codes(*values: int) -> dict[int, ReasonCode]:
    return {int(v): R(v) for v in values}


# Reason codes each packet may carry (5.0 sections 3.x.2.1); byte -> ReasonCode member.
_CONNACK_CODES = _codes(
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
    0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F)
_PUBACK_CODES = _codes(0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99)
_PUBREL_CODES = _codes(0x00, 0x92)
_SUBACK_CODES = _codes(0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2)
_SUBACK_CODES_311 = _codes(0x00, 0x01, 0x02, 0x80)
_UNSUBACK_CODES = _codes(0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91)
_DISCONNECT_CODES = _codes(
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
    0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2)
_AUTH_CODES = _codes(0x00, 0x18, 0x19)

#: Which reason codes each packet type may carry in 5.0 (used by the tests too).
REASON_CODES: dict[int, dict[int, ReasonCode]] = {
    _PT.CONNACK: _CONNACK_CODES, _PT.PUBACK: _PUBACK_CODES, _PT.PUBREC: _PUBACK_CODES,
    _PT.PUBREL: _PUBREL_CODES, _PT.PUBCOMP: _PUBREL_CODES, _PT.SUBACK: _SUBACK_CODES,
    _PT.UNSUBACK: _UNSUBACK_CODES, _PT.DISCONNECT: _DISCONNECT_CODES, _PT.AUTH: _AUTH_CODES,
}

#: 3.1.1 CONNACK return code -> the 5.0 reason it is decoded as.
CONNACK_311_TO_V5: dict[int, ReasonCode] = {
    ConnackCode311.ACCEPTED: R.SUCCESS,
    ConnackCode311.UNACCEPTABLE_PROTOCOL_VERSION: R.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackCode311.IDENTIFIER_REJECTED: R.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackCode311.SERVER_UNAVAILABLE: R.SERVER_UNAVAILABLE,
    ConnackCode311.BAD_USER_NAME_OR_PASSWORD: R.BAD_USER_NAME_OR_PASSWORD,
    ConnackCode311.NOT_AUTHORIZED: R.NOT_AUTHORIZED,
}

_PROTOCOL_NAMES = {3: "MQIsdp", 4: "MQTT", 5: "MQTT"}
_SHORT_U16 = struct.Struct(">H")


def _reason(table: dict[int, ReasonCode], code: int, what: str) -> ReasonCode:
    rc = table.get(code)
    if rc is None:
        raise ProtocolViolation(f"reason code 0x{code:02x} is not valid in {what}")
    return rc


def _no_leftover(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise MalformedPacket(f"{end - pos} unexpected bytes at the end of {what}")


# ===================================================================== decoding ======

def _bad_header(b0: int, buf: bytes, pos: int, end: int, version: int):
    if b0 >> 4 == 0:
        raise MalformedPacket("packet type 0 is reserved")
    raise MalformedPacket(
        f"invalid fixed header flags 0x{b0 & 0xF:x} for packet type {b0 >> 4}")


def _decode_publish(b0: int, buf: bytes, pos: int, end: int, version: int) -> Publish:
    qos = (b0 >> 1) & 3
    if pos + 2 > end:
        raise MalformedPacket("PUBLISH too short for its topic length")
    p = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if p > end:
        raise MalformedPacket("PUBLISH topic runs past the end of the packet")
    try:
        topic = buf[pos + 2:p].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic is not valid UTF-8") from None
    if "+" in topic or "#" in topic:
        raise ProtocolViolation("PUBLISH topic contains a wildcard", R.TOPIC_NAME_INVALID)
    if "\x00" in topic:
        raise MalformedPacket("PUBLISH topic contains U+0000")
    if qos:
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        if p + 2 > end:
            raise MalformedPacket("PUBLISH too short for its packet identifier")
        packet_id = (buf[p] << 8) | buf[p + 1]
        if not packet_id:
            raise ProtocolViolation("PUBLISH with QoS > 0 and packet identifier 0")
        p += 2
    else:
        if b0 & 8:
            raise MalformedPacket("PUBLISH with DUP set and QoS 0")
        packet_id = 0
    if version == 5:
        if p < end and buf[p] == 0:
            props = {}
            p += 1
        else:
            props, p = decode_properties(buf, p, end, _A_PUBLISH)
        if not topic and _TOPIC_ALIAS not in props:
            raise ProtocolViolation("PUBLISH with an empty topic and no topic alias")
    else:
        props = {}
        if not topic:
            raise ProtocolViolation("PUBLISH with an empty topic", R.TOPIC_NAME_INVALID)
    return Publish(topic, buf[p:end], qos, b0 & 1 == 1, b0 & 8 == 8, packet_id, props)


def _ack_decoder(cls, codes: dict[int, ReasonCode], name: str):
    success = R.SUCCESS

    def decode_ack(b0: int, buf: bytes, pos: int, end: int, version: int):
        n = end - pos
        if n == 2:
            packet_id = (buf[pos] << 8) | buf[pos + 1]
            if not packet_id:
                raise ProtocolViolation(f"{name} with packet identifier 0")
            return cls(packet_id, success, {})
        if version != 5 or n < 2:
            raise MalformedPacket(f"{name} with remaining length {n}")
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        if not packet_id:
            raise ProtocolViolation(f"{name} with packet identifier 0")
        rc = _reason(codes, buf[pos + 2], name)
        if n == 3:
            return cls(packet_id, rc, {})
        props, p = decode_properties(buf, pos + 3, end, _A_ACK)
        _no_leftover(p, end, name)
        return cls(packet_id, rc, props)

    decode_ack.__name__ = f"_decode_{name.lower()}"
    return decode_ack


_decode_puback = _ack_decoder(Puback, _PUBACK_CODES, "PUBACK")
_decode_pubrec = _ack_decoder(Pubrec, _PUBACK_CODES, "PUBREC")
_decode_pubrel = _ack_decoder(Pubrel, _PUBREL_CODES, "PUBREL")
_decode_pubcomp = _ack_decoder(Pubcomp, _PUBREL_CODES, "PUBCOMP")


def _decode_connect(b0: int, buf: bytes, pos: int, end: int, version: int) -> Connect:
    # ``version`` is unknown before the CONNECT: the packet says it.
    name, p = read_string(buf, pos, end)
    level, p = read_u8(buf, p, end)
    if level not in _PROTOCOL_NAMES:
        if name in ("MQTT", "MQIsdp"):
            raise UnsupportedProtocolVersion(f"unsupported protocol level {level}", level)
        raise ProtocolViolation(f"unknown protocol name {name!r} (level {level})")
    if name != _PROTOCOL_NAMES[level]:
        raise ProtocolViolation(f"protocol name {name!r} does not match level {level}")
    flags, p = read_u8(buf, p, end)
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = flags & 0x20 == 0x20
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT will QoS or retain set without the will flag")
    if will_qos == 3:
        raise MalformedPacket("CONNECT will QoS 3")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if has_password and not has_username and level != 5:
        raise MalformedPacket("CONNECT password flag without user name flag")
    keep_alive, p = read_u16(buf, p, end)
    if level == 5:
        props, p = decode_properties(buf, p, end, _A_CONNECT)
        if _AUTHENTICATION_DATA in props and _AUTHENTICATION_METHOD not in props:
            raise ProtocolViolation("authentication data without authentication method")
    else:
        props = {}
    client_id, p = read_string(buf, p, end)
    will = None
    if will_flag:
        if level == 5:
            will_props, p = decode_properties(buf, p, end, _A_WILL)
        else:
            will_props = {}
        will_topic, p = read_string(buf, p, end)
        will_payload, p = read_binary(buf, p, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = password = None
    if has_username:
        username, p = read_string(buf, p, end)
    if has_password:
        password, p = read_binary(buf, p, end)
    _no_leftover(p, end, "CONNECT")
    return Connect(client_id, level, name, flags & 0x02 == 0x02, keep_alive, username,
                   password, will, props)


def _decode_connack(b0: int, buf: bytes, pos: int, end: int, version: int) -> Connack:
    flags, p = read_u8(buf, pos, end)
    if flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags are set")
    code, p = read_u8(buf, p, end)
    if version == 5:
        rc = _reason(_CONNACK_CODES, code, "CONNACK")
        props, p = decode_properties(buf, p, end, _A_CONNACK)
    else:
        rc = CONNACK_311_TO_V5.get(code)
        if rc is None:
            raise ProtocolViolation(f"CONNACK return code {code} is not defined")
        props = {}
    _no_leftover(p, end, "CONNACK")
    if flags and rc:
        raise ProtocolViolation("CONNACK with session present and a failure reason code")
    return Connack(flags == 1, rc, props)


def _decode_subscribe(b0: int, buf: bytes, pos: int, end: int, version: int) -> Subscribe:
    packet_id, p = read_u16(buf, pos, end)
    if not packet_id:
        raise ProtocolViolation("SUBSCRIBE with packet identifier 0")
    if version == 5:
        props, p = decode_properties(buf, p, end, _A_SUBSCRIBE)
        ids = props.get(_SUBSCRIPTION_IDENTIFIER)
        if ids is not None and len(ids) > 1:
            raise ProtocolViolation("SUBSCRIBE with more than one subscription identifier")
        reserved = 0xC0
    else:
        props = {}
        reserved = 0xFC
    subs = []
    while p < end:
        topic_filter, p = read_string(buf, p, end)
        opts, p = read_u8(buf, p, end)
        if opts & reserved:
            raise MalformedPacket(f"SUBSCRIBE options 0x{opts:02x} set reserved bits")
        qos = opts & 3
        retain_handling = (opts >> 4) & 3
        if qos == 3:
            raise MalformedPacket("SUBSCRIBE with QoS 3")
        if retain_handling == 3:
            raise MalformedPacket("SUBSCRIBE with retain handling 3")
        no_local = opts & 0x04 == 0x04
        if no_local and topic_filter.startswith("$share/"):
            raise ProtocolViolation("no local set on a shared subscription")
        subs.append(Subscription(topic_filter, qos, no_local, opts & 0x08 == 0x08,
                                 retain_handling))
    if not subs:
        raise ProtocolViolation("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(subs), props)


def _decode_suback(b0: int, buf: bytes, pos: int, end: int, version: int) -> Suback:
    packet_id, p = read_u16(buf, pos, end)
    if not packet_id:
        raise ProtocolViolation("SUBACK with packet identifier 0")
    if version == 5:
        props, p = decode_properties(buf, p, end, _A_SUBACK)
        table = _SUBACK_CODES
    else:
        props = {}
        table = _SUBACK_CODES_311
    if p >= end:
        raise ProtocolViolation("SUBACK without a reason code")
    codes = tuple(_reason(table, c, "SUBACK") for c in buf[p:end])
    return Suback(packet_id, codes, props)


def _decode_unsubscribe(b0: int, buf: bytes, pos: int, end: int, version: int) -> Unsubscribe:
    packet_id, p = read_u16(buf, pos, end)
    if not packet_id:
        raise ProtocolViolation("UNSUBSCRIBE with packet identifier 0")
    if version == 5:
        props, p = decode_properties(buf, p, end, _A_UNSUBSCRIBE)
    else:
        props = {}
    filters = []
    while p < end:
        f, p = read_string(buf, p, end)
        filters.append(f)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, tuple(filters), props)


def _decode_unsuback(b0: int, buf: bytes, pos: int, end: int, version: int) -> Unsuback:
    packet_id, p = read_u16(buf, pos, end)
    if not packet_id:
        raise ProtocolViolation("UNSUBACK with packet identifier 0")
    if version != 5:
        _no_leftover(p, end, "UNSUBACK")
        return Unsuback(packet_id, (), {})
    props, p = decode_properties(buf, p, end, _A_UNSUBACK)
    if p >= end:
        raise ProtocolViolation("UNSUBACK without a reason code")
    codes = tuple(_reason(_UNSUBACK_CODES, c, "UNSUBACK") for c in buf[p:end])
    return Unsuback(packet_id, codes, props)


def _decode_pingreq(b0: int, buf: bytes, pos: int, end: int, version: int) -> Pingreq:
    _no_leftover(pos, end, "PINGREQ")
    return _PINGREQ


def _decode_pingresp(b0: int, buf: bytes, pos: int, end: int, version: int) -> Pingresp:
    _no_leftover(pos, end, "PINGRESP")
    return _PINGRESP


def _decode_disconnect(b0: int, buf: bytes, pos: int, end: int, version: int) -> Disconnect:
    if pos == end:
        return _DISCONNECT
    if version != 5:
        raise MalformedPacket("3.1.1 DISCONNECT with a non-zero remaining length")
    rc = _reason(_DISCONNECT_CODES, buf[pos], "DISCONNECT")
    if end - pos == 1:
        return Disconnect(rc, {})
    props, p = decode_properties(buf, pos + 1, end, _A_DISCONNECT)
    _no_leftover(p, end, "DISCONNECT")
    return Disconnect(rc, props)


def _decode_auth(b0: int, buf: bytes, pos: int, end: int, version: int) -> Auth:
    if version != 5:
        raise ProtocolViolation("AUTH exists only in MQTT 5.0")
    if pos == end:
        return Auth(R.SUCCESS, {})
    rc = _reason(_AUTH_CODES, buf[pos], "AUTH")
    if end - pos == 1:
        return Auth(rc, {})
    props, p = decode_properties(buf, pos + 1, end, _A_AUTH)
    _no_leftover(p, end, "AUTH")
    return Auth(rc, props)


_PINGREQ = Pingreq()
_PINGRESP = Pingresp()
_DISCONNECT = Disconnect(R.NORMAL_DISCONNECTION, {})

Decoder = Callable[[int, bytes, int, int, int], object]

#: Fixed-header byte -> decoder. PUBLISH accepts any flags (its decoder checks QoS 3 and
#: DUP); PUBREL, SUBSCRIBE, UNSUBSCRIBE need 0b0010; the others 0b0000.
DECODERS: list[Decoder] = [_bad_header] * 256
for _t, _dec in {
    _PT.CONNECT: _decode_connect, _PT.CONNACK: _decode_connack, _PT.PUBACK: _decode_puback,
    _PT.PUBREC: _decode_pubrec, _PT.PUBREL: _decode_pubrel, _PT.PUBCOMP: _decode_pubcomp,
    _PT.SUBSCRIBE: _decode_subscribe, _PT.SUBACK: _decode_suback,
    _PT.UNSUBSCRIBE: _decode_unsubscribe, _PT.UNSUBACK: _decode_unsuback,
    _PT.PINGREQ: _decode_pingreq, _PT.PINGRESP: _decode_pingresp,
    _PT.DISCONNECT: _decode_disconnect, _PT.AUTH: _decode_auth,
}.items():
    DECODERS[_t << 4 | (2 if _t in (_PT.PUBREL, _PT.SUBSCRIBE, _PT.UNSUBSCRIBE) else 0)] = _dec
for _flags in range(16):
    DECODERS[0x30 | _flags] = _decode_publish
del _t, _dec, _flags


def decode(first_byte: int, body: bytes | memoryview, version: int):
    """Decode one packet: ``first_byte`` is the fixed header's first byte, ``body`` the
    ``Remaining Length`` bytes after it. Raises ``RemoteMqttError`` subclasses."""
    if type(body) is not bytes:
        body = bytes(body)
    return DECODERS[first_byte & 0xFF](first_byte, body, 0, len(body), version)


# ===================================================================== encoding ======

def _frame(b0: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes((b0, n)) + body
    return bytes((b0,)) + encode_varint(n) + body


def _u16(v: int) -> bytes:
    return _SHORT_U16.pack(v)


def _check_reason(table: dict[int, ReasonCode], rc: int, what: str) -> int:
    if rc not in table:
        raise LocalMqttError(f"reason code 0x{rc:02x} may not be sent in {what}")
    return rc


def _encode_connect(p: Connect, version: int) -> bytes:
    level = p.protocol_level
    if level != version:
        raise LocalMqttError(f"CONNECT of level {level} encoded as version {version}")
    v5 = level == 5
    will = p.will
    flags = 0x02 if p.clean_start else 0
    parts = [encode_string(p.protocol_name), bytes((level,)), b"", _u16(p.keep_alive)]
    if v5:
        props = p.properties
        parts.append(encode_properties(props, _A_CONNECT))
    parts.append(encode_string(p.client_id))
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise LocalMqttError(f"will QoS {will.qos}")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if v5:
            parts.append(encode_properties(will.properties, _A_WILL))
        parts.append(encode_string(will.topic))
        parts.append(encode_binary(will.payload))
    if p.username is not None:
        flags |= 0x80
        parts.append(encode_string(p.username))
    if p.password is not None:
        if p.username is None and not v5:
            raise LocalMqttError("3.1.1 CONNECT with a password needs a user name")
        flags |= 0x40
        parts.append(encode_binary(p.password))
    parts[2] = bytes((flags,))
    return _frame(0x10, b"".join(parts))


def _encode_connack(p: Connack, version: int) -> bytes:
    rc = p.reason_code
    if p.session_present and rc:
        raise LocalMqttError("CONNACK with session present and a failure reason code")
    sp = 1 if p.session_present else 0
    if version == 5:
        _check_reason(_CONNACK_CODES, rc, "CONNACK")
        return _frame(0x20, bytes((sp, rc)) + encode_properties(p.properties, _A_CONNACK))
    code = CONNACK_V5_TO_311.get(rc)
    if code is None:
        if rc < 0x80:
            raise LocalMqttError(f"CONNACK reason 0x{rc:02x} has no 3.1.1 form")
        code = ConnackCode311.SERVER_UNAVAILABLE  # no closer 3.1.1 return code
    return bytes((0x20, 2, sp, code))


def _encode_publish(p: Publish, version: int) -> bytes:
    head, tail = publish_parts(version, p.topic, p.payload, p.qos, p.retain, p.dup,
                               p.properties)
    if p.qos:
        if not 0 < p.packet_id <= 0xFFFF:
            raise LocalMqttError(f"PUBLISH QoS {p.qos} with packet identifier {p.packet_id}")
        return head + _u16(p.packet_id) + tail
    return head + tail


def _ack_encoder(b0: int, codes: dict[int, ReasonCode], name: str):
    def encode_ack(p, version: int) -> bytes:
        packet_id = p.packet_id
        if not 0 < packet_id <= 0xFFFF:
            raise LocalMqttError(f"{name} with packet identifier {packet_id}")
        rc = p.reason_code
        props = p.properties
        if version != 5 or (not rc and not props):
            return bytes((b0, 2, packet_id >> 8, packet_id & 0xFF))
        if rc not in codes:
            raise LocalMqttError(f"reason code 0x{rc:02x} may not be sent in {name}")
        if not props:
            return bytes((b0, 3, packet_id >> 8, packet_id & 0xFF, rc))
        return _frame(b0, bytes((packet_id >> 8, packet_id & 0xFF, rc))
                      + encode_properties(props, _A_ACK))
    return encode_ack


_encode_puback = _ack_encoder(0x40, _PUBACK_CODES, "PUBACK")
_encode_pubrec = _ack_encoder(0x50, _PUBACK_CODES, "PUBREC")
_encode_pubrel = _ack_encoder(0x62, _PUBREL_CODES, "PUBREL")
_encode_pubcomp = _ack_encoder(0x70, _PUBREL_CODES, "PUBCOMP")


def _packet_id(p, name: str) -> bytes:
    if not 0 < p.packet_id <= 0xFFFF:
        raise LocalMqttError(f"{name} with packet identifier {p.packet_id}")
    return _u16(p.packet_id)


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    if not p.subscriptions:
        raise LocalMqttError("SUBSCRIBE without a topic filter")
    parts = [_packet_id(p, "SUBSCRIBE")]
    if version == 5:
        parts.append(encode_properties(p.properties, _A_SUBSCRIBE))
    for s in p.subscriptions:
        if s.qos not in (0, 1, 2) or s.retain_handling not in (0, 1, 2):
            raise LocalMqttError(f"invalid subscription options {s!r}")
        opts = s.qos
        if version == 5:
            opts |= (0x04 if s.no_local else 0) | (0x08 if s.retain_as_published else 0) \
                | s.retain_handling << 4
        parts.append(encode_string(s.topic_filter))
        parts.append(bytes((opts,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: Suback, version: int) -> bytes:
    if not p.reason_codes:
        raise LocalMqttError("SUBACK without a reason code")
    head = _packet_id(p, "SUBACK")
    if version == 5:
        for rc in p.reason_codes:
            _check_reason(_SUBACK_CODES, rc, "SUBACK")
        return _frame(0x90, head + encode_properties(p.properties, _A_SUBACK)
                      + bytes(p.reason_codes))
    return _frame(0x90, head + bytes(rc if rc < 0x80 else 0x80 for rc in p.reason_codes))


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    if not p.topic_filters:
        raise LocalMqttError("UNSUBSCRIBE without a topic filter")
    parts = [_packet_id(p, "UNSUBSCRIBE")]
    if version == 5:
        parts.append(encode_properties(p.properties, _A_UNSUBSCRIBE))
    parts.extend(encode_string(f) for f in p.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    head = _packet_id(p, "UNSUBACK")
    if version != 5:
        return b"\xb0\x02" + head
    if not p.reason_codes:
        raise LocalMqttError("5.0 UNSUBACK without a reason code")
    for rc in p.reason_codes:
        _check_reason(_UNSUBACK_CODES, rc, "UNSUBACK")
    return _frame(0xB0, head + encode_properties(p.properties, _A_UNSUBACK)
                  + bytes(p.reason_codes))


def _encode_pingreq(p, version: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p, version: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, version: int) -> bytes:
    rc = p.reason_code
    props = p.properties
    if version != 5 or (not rc and not props):
        return b"\xe0\x00"
    _check_reason(_DISCONNECT_CODES, rc, "DISCONNECT")
    if not props:
        return bytes((0xE0, 1, rc))
    return _frame(0xE0, bytes((rc,)) + encode_properties(props, _A_DISCONNECT))


def _encode_auth(p: Auth, version: int) -> bytes:
    if version != 5:
        raise LocalMqttError("AUTH exists only in MQTT 5.0")
    rc = p.reason_code
    props = p.properties
    if not rc and not props:
        return b"\xf0\x00"
    _check_reason(_AUTH_CODES, rc, "AUTH")
    if not props:
        return bytes((0xF0, 1, rc))
    return _frame(0xF0, bytes((rc,)) + encode_properties(props, _A_AUTH))


_ENCODERS: dict[int, Callable[..., bytes]] = {
    _PT.CONNECT: _encode_connect, _PT.CONNACK: _encode_connack,
    _PT.PUBLISH: _encode_publish, _PT.PUBACK: _encode_puback, _PT.PUBREC: _encode_pubrec,
    _PT.PUBREL: _encode_pubrel, _PT.PUBCOMP: _encode_pubcomp,
    _PT.SUBSCRIBE: _encode_subscribe, _PT.SUBACK: _encode_suback,
    _PT.UNSUBSCRIBE: _encode_unsubscribe, _PT.UNSUBACK: _encode_unsuback,
    _PT.PINGREQ: _encode_pingreq, _PT.PINGRESP: _encode_pingresp,
    _PT.DISCONNECT: _encode_disconnect, _PT.AUTH: _encode_auth,
}


def encode(packet, version: int) -> bytes:
    """The whole frame (fixed header included) for ``packet`` in protocol level
    ``version`` (3, 4 or 5). Invalid values are our bug: ``LocalMqttError``."""
    if version not in _PROTOCOL_NAMES:
        raise LocalMqttError(f"unknown protocol version {version}")
    try:
        return _ENCODERS[packet.type](packet, version)
    except MqttError:
        raise
    except (AttributeError, KeyError, OverflowError, TypeError, ValueError,
            struct.error) as exc:
        raise LocalMqttError(f"cannot encode {packet!r}: {exc}") from exc


def publish_parts(version: int, topic: str, payload: bytes, qos: int, retain: bool,
                  dup: bool, properties: dict | None) -> tuple[bytes, bytes]:
    """The PUBLISH frame split around its packet identifier: for QoS > 0 the frame is
    ``head + packet_id.to_bytes(2, "big") + tail``, for QoS 0 ``head + tail``.

    ``head`` is the fixed header and the topic, ``tail`` the properties (5.0) and the
    payload. Built once per message and shared by every subscriber with the same
    version, QoS and properties."""
    if version == 5:
        if properties:
            tail = encode_properties(properties, _A_PUBLISH) + payload
        else:
            tail = b"\x00" + payload
    else:
        tail = payload
    # _publish_head, inlined: this runs once per message delivered.
    tb = topic.encode("utf-8")
    tl = len(tb)
    rl = tl + len(tail) + (4 if qos else 2)
    if qos not in (0, 1, 2) or (dup and not qos):
        raise LocalMqttError(f"PUBLISH with QoS {qos} and DUP {dup}")
    b0 = 0x30 | qos << 1 | (1 if retain else 0) | (8 if dup else 0)
    if rl < 128:
        return bytes((b0, rl, 0, tl)) + tb, tail
    if rl > MAX_REMAINING_LENGTH or tl > 0xFFFF:
        raise LocalMqttError(f"PUBLISH too large (remaining length {rl})")
    return b"".join((bytes((b0,)), encode_varint(rl), tl.to_bytes(2, "big"), tb)), tail


def publish_parts_with_block(topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                             block: bytes) -> tuple[bytes, bytes]:
    """``publish_parts`` for 5.0 with an already encoded property block."""
    tail = block + payload
    return _publish_head(topic, tail, qos, retain, dup), tail


def _publish_head(topic: str, tail: bytes, qos: int, retain: bool, dup: bool) -> bytes:
    tb = topic.encode("utf-8")
    tl = len(tb)
    rl = tl + len(tail) + (4 if qos else 2)
    if qos not in (0, 1, 2) or (dup and not qos):
        raise LocalMqttError(f"PUBLISH with QoS {qos} and DUP {dup}")
    b0 = 0x30 | qos << 1 | (1 if retain else 0) | (8 if dup else 0)
    if rl < 128:
        return bytes((b0, rl, 0, tl)) + tb
    if rl > MAX_REMAINING_LENGTH or tl > 0xFFFF:
        raise LocalMqttError(f"PUBLISH too large (remaining length {rl})")
    return b"".join((bytes((b0,)), encode_varint(rl), tl.to_bytes(2, "big"), tb))
