"""The PROXY protocol (HAProxy's, versions 1 and 2), receiving side, sans-IO.

A load balancer in TCP mode opens its own connection to the node; with ``send-proxy`` /
``send-proxy-v2`` it first writes one header that names the client's real address. This
module reads that header and nothing else: no socket, clock or logging, like
``node.mqtt``. Feed it bytes as they arrive, in chunks of any size::

    reader = ProxyHeaderReader()
    reader.receive_data(chunk)
    header = reader.next_header()       # a ProxyHeader, or NEED_DATA
    if header is not NEED_DATA:
        rest = reader.trailing_data     # the first bytes of the MQTT stream

Errors raise ``ProxyProtocolError`` (nothing else, whatever the input), as early as the
bytes allow: the first byte that cannot start a header fails, so a client that skips the
balancer and sends CONNECT is refused at once.

Version 1 (text): ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or
``PROXY UNKNOWN ...\\r\\n``, at most 107 bytes. Version 2 (binary): a 12-byte signature,
version/command (``LOCAL`` | ``PROXY``), family/transport (``AF_UNSPEC`` | ``AF_INET`` |
``AF_INET6`` | ``AF_UNIX``; ``STREAM``), a 16-bit length, the addresses, then TLVs
(skipped). ``LOCAL`` (a balancer's own health check), ``UNKNOWN`` and ``AF_UNSPEC`` carry no
client: ``ProxyHeader.source`` is None and the connection's own address stands.
Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["NEED_DATA", "ProxyHeader", "ProxyHeaderReader", "ProxyProtocolError",
           "V1_MAX_LENGTH", "V2_SIGNATURE", "looks_like_header", "parse_header"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned while the bytes so far are a valid beginning of a header, but not all of it.
NEED_DATA = _Sentinel("NEED_DATA")

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the longest v1 line, "\r\n" included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16  # signature, version/command, family/transport, 2-byte length

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
_FAMILIES = {_AF_UNSPEC: "UNSPEC", _AF_INET: "TCP4", _AF_INET6: "TCP6", _AF_UNIX: "UNIX"}
_ADDRESS_BYTES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY protocol header; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. ``source`` / ``destination`` are ``(host, port)`` for TCP4 and
    TCP6, ``(path, 0)`` for a UNIX socket, and None when the header carries no client
    (v2 ``LOCAL``, v2 ``AF_UNSPEC``, v1 ``UNKNOWN``): then keep the connection's own
    address. ``length`` is how many bytes the header took."""

    version: int          # 1 or 2
    command: str          # "PROXY" or "LOCAL" (v1 is always "PROXY")
    family: str           # "TCP4", "TCP6", "UNIX", "UNKNOWN" (v1) or "UNSPEC" (v2)
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


def looks_like_header(data: bytes) -> bool:
    """True when ``data`` (at least its first bytes) begins like a PROXY header: for a
    listener that does not expect one, to say why a connection failed."""
    head = bytes(data[:len(V2_SIGNATURE)])
    if not head:
        return False
    return V1_PREFIX.startswith(head[:len(V1_PREFIX)]) or V2_SIGNATURE.startswith(head)


def parse_header(data: bytes) -> ProxyHeader | _Sentinel:
    """The header at the start of ``data``, or NEED_DATA when ``data`` is a valid but
    incomplete beginning of one. Raises ProxyProtocolError. Bytes after the header are
    not looked at (``ProxyHeader.length`` says where they start)."""
    data = bytes(data)
    if not data:
        return NEED_DATA
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError(f"not a PROXY protocol header: it starts with byte "
                             f"{data[0]:#04x}{_what_it_is(data[0])}")


def _what_it_is(first: int) -> str:
    return {0x10: " (an MQTT CONNECT: the client did not come through the load balancer)",
            0x16: " (a TLS handshake)",
            0x47: " (an HTTP GET?)"}.get(first, "")


# -- version 1 --------------------------------------------------------------------------------

def _parse_v1(data: bytes) -> ProxyHeader | _Sentinel:
    n = min(len(data), len(V1_PREFIX))
    if data[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError(f"not a PROXY protocol header: it starts with "
                                 f"{data[:n]!r}, not {V1_PREFIX!r}")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 header without CRLF in its first "
                                     f"{V1_MAX_LENGTH} bytes")
        if b"\n" in data or b"\x00" in data:
            raise ProxyProtocolError(f"PROXY v1 header with a stray LF or NUL: "
                                     f"{data[:V1_MAX_LENGTH]!r}")
        return NEED_DATA
    line = data[:end]
    if b"\n" in line or b"\x00" in line:
        raise ProxyProtocolError(f"PROXY v1 header with a stray LF or NUL: {line!r}")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"PROXY v1 header is not ASCII: {line!r}") from None
    parts = text.split(" ")
    proto = parts[1] if len(parts) > 1 else ""
    if proto == "UNKNOWN":
        # the sender could not tell the client: the rest of the line is to be ignored
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, end + 2)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 header with protocol {proto!r}: expected TCP4, "
                                 f"TCP6 or UNKNOWN ({line!r})")
    if len(parts) != 6:
        raise ProxyProtocolError(f"PROXY v1 header needs 6 fields separated by single "
                                 f"spaces, got {len(parts)}: {line!r}")
    kind = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    src = _v1_address(kind, parts[2], line)
    dst = _v1_address(kind, parts[3], line)
    sport = _v1_port(parts[4], line)
    dport = _v1_port(parts[5], line)
    return ProxyHeader(1, "PROXY", proto, (src, sport), (dst, dport), end + 2)


def _v1_address(kind, text: str, line: bytes) -> str:
    try:
        return str(kind(text))
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 header with a bad {kind.__name__[:4]} address "
                                 f"{text!r}: {line!r}") from None


def _v1_port(text: str, line: bytes) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or \
            (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 header with a bad port {text!r} (0-65535, no "
                                 f"leading zeros): {line!r}")
    return int(text)


# -- version 2 --------------------------------------------------------------------------------

def _parse_v2(data: bytes) -> ProxyHeader | _Sentinel:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError(f"not a PROXY protocol header: it starts with "
                                 f"{data[:n]!r}, not the v2 signature")
    if len(data) < V2_HEADER_LENGTH:
        if len(data) > 12:
            _v2_check_version(data[12])
        if len(data) > 13:
            _v2_family(data[13])
        return NEED_DATA
    ver_cmd, fam, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    command = _v2_check_version(ver_cmd)
    family, transport = _v2_family(fam)
    total = V2_HEADER_LENGTH + length
    if command == _V2_PROXY and family in _ADDRESS_BYTES and length < _ADDRESS_BYTES[family]:
        raise ProxyProtocolError(f"PROXY v2 header for {_FAMILIES[family]} with {length} "
                                 f"address bytes, fewer than the {_ADDRESS_BYTES[family]} "
                                 f"it needs")
    if len(data) < total:
        return NEED_DATA
    if command == _V2_LOCAL:
        # the balancer's own connection (a health check): addresses, if any, are ignored
        return ProxyHeader(2, "LOCAL", _FAMILIES[family], None, None, total)
    if transport == _DGRAM:
        raise ProxyProtocolError("PROXY v2 header for a datagram (UDP) connection on a "
                                 "stream listener")
    body = data[V2_HEADER_LENGTH:total]
    if family == _AF_UNSPEC:
        return ProxyHeader(2, "PROXY", "UNSPEC", None, None, total)
    if family == _AF_INET:
        src = (str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big"))
        dst = (str(ipaddress.IPv4Address(body[4:8])), int.from_bytes(body[10:12], "big"))
    elif family == _AF_INET6:
        src = (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big"))
        dst = (str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big"))
    else:  # AF_UNIX: two 108-byte, NUL-padded paths
        src = (_unix_path(body[0:108]), 0)
        dst = (_unix_path(body[108:216]), 0)
    return ProxyHeader(2, "PROXY", _FAMILIES[family], src, dst, total)


def _v2_check_version(ver_cmd: int) -> int:
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header with version {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"PROXY v2 header with command {command:#x}: expected "
                                 f"LOCAL (0x0) or PROXY (0x1)")
    return command


def _v2_family(fam: int) -> tuple[int, int]:
    family, transport = fam >> 4, fam & 0x0F
    if family not in _FAMILIES:
        raise ProxyProtocolError(f"PROXY v2 header with address family {family:#x}: expected "
                                 f"UNSPEC, INET, INET6 or UNIX")
    if transport not in (_UNSPEC, _STREAM, _DGRAM):
        raise ProxyProtocolError(f"PROXY v2 header with transport {transport:#x}: expected "
                                 f"UNSPEC, STREAM or DGRAM")
    return family, transport


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


# -- incremental reader -----------------------------------------------------------------------

class ProxyHeaderReader:
    """Reads one header from a byte stream fed in chunks of any size (h11's verbs):
    ``receive_data(bytes)`` appends, ``next_header()`` returns the ProxyHeader or
    NEED_DATA (or raises ProxyProtocolError, then again on every call). After the header,
    ``trailing_data`` holds the bytes that followed it in the same chunks. The buffer is
    bounded: a v1 header is at most 107 bytes, a v2 one at most 16 + 65535."""

    __slots__ = ("_buf", "_need", "_header", "_error", "trailing_data")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 1  # parse again once this many bytes are buffered
        self._header: ProxyHeader | None = None
        self._error: ProxyProtocolError | None = None
        self.trailing_data = b""

    def receive_data(self, data: bytes) -> None:
        if self._header is not None:
            self.trailing_data += data
        elif self._error is None:
            self._buf += data

    def next_header(self) -> ProxyHeader | _Sentinel:
        if self._error is not None:
            raise self._error
        if self._header is not None:
            return self._header
        buf = self._buf
        if len(buf) < self._need:
            return NEED_DATA
        try:
            result = parse_header(buf)
        except ProxyProtocolError as err:
            self._error = err
            self._buf = bytearray()
            raise
        if result is NEED_DATA:
            # a v2 header says its length in bytes 15-16: do not parse again before it is
            # all here (a header fed one byte at a time stays linear)
            if len(buf) >= V2_HEADER_LENGTH and buf[0] == V2_SIGNATURE[0]:
                self._need = V2_HEADER_LENGTH + int.from_bytes(buf[14:16], "big")
            else:
                self._need = len(buf) + 1
            return NEED_DATA
        self._header = result
        self.trailing_data = bytes(buf[result.length:])
        self._buf = bytearray()
        return result
