"""Wire primitives: the fixed header's Variable Byte Integer and the field readers.

Every reader works on an immutable ``bytes`` object with explicit offsets
(``buf``, ``pos``, ``end``) and returns ``(value, new_pos)``; it never reads past
``end`` and raises ``MalformedPacket`` when the field does not fit. Nothing here
keeps state: ``MqttConnection`` owns the receive buffer, ``codec`` the packet layout.
"""

from __future__ import annotations

from .codes import MAX_REMAINING_LENGTH
from .errors import LocalMqttError, MalformedPacket

__all__ = [
    "encode_varint", "read_varint", "remaining_length", "read_u8", "read_u16",
    "read_u32", "read_string", "read_binary", "encode_string", "encode_binary",
]


# -- Variable Byte Integer (section 1.5.5 / 2.2.3) ------------------------------------

_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def encode_varint(value: int) -> bytes:
    """Minimum-length Variable Byte Integer (at most 4 bytes)."""
    if value < 128:
        if value < 0:
            raise LocalMqttError(f"negative variable byte integer {value}")
        return _SMALL_VARINTS[value]
    if value > MAX_REMAINING_LENGTH:
        raise LocalMqttError(f"variable byte integer {value} exceeds {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        digit = value & 0x7F
        value >>= 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def remaining_length(buf: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """Decode the Remaining Length starting at ``buf[pos]``, knowing ``buf[:n]`` is
    available. Returns ``(value, first byte after it)``, or ``None`` when more bytes
    are needed. A fifth byte or a non-minimal encoding is ``MalformedPacket``."""
    value = 0
    shift = 0
    stop = pos + 4
    while pos < n:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:
                raise MalformedPacket("remaining length is not minimally encoded")
            return value, pos
        if pos == stop:
            raise MalformedPacket("remaining length longer than 4 bytes")
        shift += 7
    return None


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer that must lie entirely before ``end``."""
    byte = buf[pos] if pos < end else -1
    if 0 <= byte < 0x80:
        return byte, pos + 1
    r = remaining_length(buf, pos, end)
    if r is None:
        raise MalformedPacket("variable byte integer runs past the end of the packet")
    return r


# -- fixed-size integers, strings, binary data (section 1.5) --------------------------

def read_u8(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise MalformedPacket("packet too short (byte expected)")
    return buf[pos], pos + 1


def read_u16(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("packet too short (two byte integer expected)")
    return (buf[pos] << 8) | buf[pos + 1], pos + 2


def read_u32(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise MalformedPacket("packet too short (four byte integer expected)")
    return int.from_bytes(buf[pos:pos + 4], "big"), pos + 4


def read_string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """UTF-8 Encoded String: invalid UTF-8, a surrogate or U+0000 is malformed."""
    if pos + 2 > end:
        raise MalformedPacket("packet too short (string length expected)")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise MalformedPacket("string runs past the end of the packet")
    try:
        s = buf[pos + 2:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not valid UTF-8") from None
    if "\x00" in s:
        raise MalformedPacket("string contains U+0000")
    return s, stop


def read_binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise MalformedPacket("packet too short (binary data length expected)")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise MalformedPacket("binary data runs past the end of the packet")
    return bytes(buf[pos + 2:stop]), stop


def encode_string(s: str) -> bytes:
    try:
        b = s.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise LocalMqttError(f"not encodable as an MQTT string: {s!r}") from None
    n = len(b)
    if n > 0xFFFF:
        raise LocalMqttError(f"string of {n} bytes is longer than 65535")
    if "\x00" in s:
        raise LocalMqttError("MQTT strings may not contain U+0000")
    return n.to_bytes(2, "big") + b


def encode_binary(b: bytes) -> bytes:
    n = len(b)
    if n > 0xFFFF:
        raise LocalMqttError(f"binary data of {n} bytes is longer than 65535")
    return n.to_bytes(2, "big") + bytes(b)
