"""MQTT 5.0 properties (section 2.2.2): decoding with every normative check, encoding.

A property block is a Variable Byte Integer length followed by ``identifier, value``
pairs. Decoded, it is a ``dict[PropertyId, value]`` whose values are ``int``, ``str``
or ``bytes`` by the wire type in ``codes.PROPERTY_TYPES``; the repeatable ones
(``USER_PROPERTY``: list of ``(str, str)``, ``SUBSCRIPTION_IDENTIFIER``: list of
``int``) are lists. Which identifiers a packet may carry is ``codes.ALLOWED_PROPERTIES``;
the caller passes that set in (``codes.WILL`` for the Will Properties).
"""

from __future__ import annotations

import struct
from typing import Any

from . import _framing
from .codes import (
    ALLOWED_PROPERTIES, MAX_REMAINING_LENGTH, PROPERTY_TYPES, REPEATABLE_PROPERTIES,
    PropertyId, PropertyType,
)
from .errors import LocalMqttError, MalformedPacket, ProtocolViolation

__all__ = ["decode_properties", "encode_properties", "EMPTY_PROPERTIES"]

#: An empty property block: property length 0.
EMPTY_PROPERTIES = b"\x00"

# Identifier -> PropertyId member (None for unknown ids); a list for speed.
_PID: list[PropertyId | None] = [None] * 256
for _p in PropertyId:
    _PID[_p] = _p
del _p
_REPEATABLE = frozenset(int(p) for p in REPEATABLE_PROPERTIES)
_NON_ZERO = frozenset({
    PropertyId.RECEIVE_MAXIMUM, PropertyId.MAXIMUM_PACKET_SIZE,
    PropertyId.SUBSCRIPTION_IDENTIFIER,
})
_K_BYTE, _K_U16, _K_U32, _K_VARINT, _K_STRING, _K_BINARY, _K_PAIR = range(7)
_KIND_OF = {
    PropertyType.BYTE: _K_BYTE, PropertyType.U16: _K_U16, PropertyType.U32: _K_U32,
    PropertyType.VARINT: _K_VARINT, PropertyType.STRING: _K_STRING,
    PropertyType.BINARY: _K_BINARY, PropertyType.STRING_PAIR: _K_PAIR,
}
_KIND: list[int] = [-1] * 256
for _p, _t in PROPERTY_TYPES.items():
    _KIND[_p] = _KIND_OF[_t]
del _p, _t
_USER_PROPERTY = int(PropertyId.USER_PROPERTY)


def decode_properties(buf: bytes, pos: int, end: int, allowed: frozenset) -> tuple[dict, int]:
    """Decode the property block at ``buf[pos]`` (length included), which must end at or
    before ``end``. Returns ``(properties, position after the block)``.

    Unknown identifier or a value that does not fit: ``MalformedPacket``. A property
    not in ``allowed``, a non-repeatable one given twice, or an illegal value:
    ``ProtocolViolation``."""
    length, pos = _framing.read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the end of the packet")
    props: dict = {}
    while pos < stop:
        ident = buf[pos]
        pid = _PID[ident]
        if pid is None:
            raise MalformedPacket(f"unknown property identifier 0x{ident:02x}")
        if pid not in allowed:
            raise ProtocolViolation(f"property {pid.name} is not allowed in this packet")
        pos += 1
        kind = _KIND[ident]
        value: Any
        if kind == _K_U32:
            if pos + 4 > stop:
                raise MalformedPacket(f"property {pid.name} runs past the property block")
            value = int.from_bytes(buf[pos:pos + 4], "big")
            pos += 4
        elif kind == _K_BYTE:
            if pos >= stop:
                raise MalformedPacket(f"property {pid.name} runs past the property block")
            value = buf[pos]
            pos += 1
            if value > 1:
                raise ProtocolViolation(f"property {pid.name} must be 0 or 1, got {value}")
        elif kind == _K_U16:
            if pos + 2 > stop:
                raise MalformedPacket(f"property {pid.name} runs past the property block")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif kind == _K_STRING:
            value, pos = _framing.read_string(buf, pos, stop)
        elif kind == _K_PAIR:
            k, pos = _framing.read_string(buf, pos, stop)
            v, pos = _framing.read_string(buf, pos, stop)
            value = (k, v)
        elif kind == _K_BINARY:
            value, pos = _framing.read_binary(buf, pos, stop)
        else:  # VARINT
            value, pos = _framing.read_varint(buf, pos, stop)
        if value == 0 and pid in _NON_ZERO:
            raise ProtocolViolation(f"property {pid.name} may not be 0")
        if ident in _REPEATABLE:
            lst = props.get(pid)
            if lst is None:
                props[pid] = [value]
            else:
                lst.append(value)
        elif pid in props:
            raise ProtocolViolation(f"property {pid.name} given more than once")
        else:
            props[pid] = value
    return props, stop


_PACK_U16 = struct.Struct(">BH").pack
_PACK_U32 = struct.Struct(">BI").pack
_SUBSCRIPTION_IDENTIFIER = int(PropertyId.SUBSCRIPTION_IDENTIFIER)


def _bad_value(pid: int, value: Any) -> LocalMqttError:
    return LocalMqttError(f"property {PropertyId(pid).name} has an invalid value {value!r}")


def encode_properties(props: dict | None, allowed: frozenset) -> bytes:
    """The property block (length prefix included) for ``props``; ``b"\\x00"`` when
    empty. A property not in ``allowed``, or a value its type cannot carry, is our
    bug: ``LocalMqttError``. Repeatable properties are lists (a single bare value is
    accepted too)."""
    if not props:
        return EMPTY_PROPERTIES
    parts = []
    add = parts.append
    for pid, value in props.items():
        kind = _KIND[pid] if type(pid) is not str and 0 < pid < 256 else -1
        if kind < 0 or pid not in allowed:
            raise LocalMqttError(f"property {pid!r} may not be sent in this packet")
        if kind == _K_U32:
            if not 0 <= value <= 0xFFFFFFFF or (value == 0 and pid in _NON_ZERO):
                raise _bad_value(pid, value)
            add(_PACK_U32(pid, value))
        elif kind == _K_VARINT:  # SUBSCRIPTION_IDENTIFIER: a list of ints
            for v in ((value,) if type(value) is int else value):
                if not 0 < v <= MAX_REMAINING_LENGTH:
                    raise _bad_value(pid, v)
                add(bytes((pid, v)) if v < 128 else
                    bytes((pid,)) + _framing.encode_varint(v))
        elif kind == _K_PAIR:  # USER_PROPERTY: a list of (str, str)
            if type(value) is tuple and len(value) == 2 and type(value[0]) is str:
                value = (value,)
            for k, v in value:
                add(bytes((pid,)) + _framing.encode_string(k) + _framing.encode_string(v))
        elif kind == _K_STRING:
            add(bytes((pid,)) + _framing.encode_string(value))
        elif kind == _K_U16:
            if not 0 <= value <= 0xFFFF or (value == 0 and pid in _NON_ZERO):
                raise _bad_value(pid, value)
            add(_PACK_U16(pid, value))
        elif kind == _K_BYTE:
            if value not in (0, 1):
                raise _bad_value(pid, value)
            add(bytes((pid, value)))
        else:  # BINARY
            add(bytes((pid,)) + _framing.encode_binary(value))
    body = b"".join(parts)
    n = len(body)
    return (bytes((n,)) if n < 128 else _framing.encode_varint(n)) + body


def allowed_for(packet_type: int) -> frozenset:
    """The identifiers ``packet_type`` (or ``codes.WILL``) may carry."""
    return ALLOWED_PROPERTIES[packet_type]
