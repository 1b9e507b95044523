"""node/proxy_protocol.py: the PROXY protocol v1/v2 header reader (sans-IO).

Headers are built here from the specification (haproxy's doc/proxy-protocol.txt), not
with the module's own helpers; tests/cluster/test_haproxy.py checks what a real HAProxy
sends. Every header is also fed one byte at a time and in random chunks: the result is
the same. Random and mutated input raises nothing but ProxyProtocolError."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from node.proxy_protocol import (
    NEED_DATA, V1_MAX_LENGTH, ProxyHeader, ProxyHeaderReader, ProxyProtocolError,
    looks_like_header, parse_header,
)

SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
CONNECT = bytes.fromhex("101000044d5154540502003c0000") + b"\x00\x01a"  # an MQTT CONNECT


def v2(command: int = 1, family: int = 1, transport: int = 1, body: bytes = b"",
       version: int = 2, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + bytes(((version << 4) | command, (family << 4) | transport)) + \
        struct.pack("!H", n) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def feed_in_chunks(data: bytes, sizes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    pos = 0
    header = NEED_DATA
    for size in sizes:
        if pos >= len(data):
            break
        reader.receive_data(data[pos:pos + size])
        pos += size
        header = reader.next_header()
    reader.receive_data(data[pos:])
    if header is NEED_DATA:
        header = reader.next_header()
    assert header is not NEED_DATA, f"no header from {data!r}"
    return header, reader.trailing_data


def check_every_split(data: bytes, seed: int = 1) -> tuple[ProxyHeader, bytes]:
    """The header and trailing data, the same fed whole, byte by byte and in random chunks."""
    whole = feed_in_chunks(data, [len(data)])
    assert feed_in_chunks(data, [1] * len(data)) == whole
    rng = random.Random(seed)
    for _ in range(20):
        sizes = [rng.randint(1, 20) for _ in range(len(data))]
        assert feed_in_chunks(data, sizes) == whole
    return whole


# -- version 1 ---------------------------------------------------------------------------------

def test_v1_tcp4():
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 1883\r\n" + CONNECT
    header, rest = check_every_split(data)
    assert header == ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324),
                                 ("192.168.0.11", 1883), data.index(b"\n") + 1)
    assert rest == CONNECT


def test_v1_tcp6():
    data = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n"
    header, rest = check_every_split(data)
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("::1", 0)
    assert rest == b""


def test_v1_unknown_keeps_the_connection_address():
    for line in (b"PROXY UNKNOWN\r\n",
                 b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"):
        header, rest = check_every_split(line + b"x")
        assert (header.family, header.source, header.destination) == ("UNKNOWN", None, None)
        assert rest == b"x"


def test_v1_longest_line_is_accepted():
    longest = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(longest) == 104
    padded = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(padded) == V1_MAX_LENGTH
    assert check_every_split(longest)[0].source[1] == 65535
    assert check_every_split(padded)[0].family == "UNKNOWN"


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "bad IPv4 address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "not ASCII"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol 'UDP4'"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol 'tcp4'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "stray LF"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "without CRLF in its first 107 bytes"),
    (b"PROXY\r\n", "not a PROXY protocol header"),
    (b"PROXZ TCP4", "not a PROXY protocol header"),
])
def test_v1_malformed(line, why):
    with pytest.raises(ProxyProtocolError, match=why):
        feed_in_chunks(line, [1] * len(line))
    with pytest.raises(ProxyProtocolError, match=why):
        parse_header(line)


def test_v1_incomplete_is_need_data():
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for i in range(len(line)):
        assert parse_header(line[:i]) is NEED_DATA, line[:i]


# -- version 2 ---------------------------------------------------------------------------------

def test_v2_inet_with_tlvs_skipped():
    body = inet("10.1.2.3", "10.0.0.1", 40000, 1883) + tlv(0x04, b"") + \
        tlv(0x05, b"unique-id-1234") + tlv(0x20, b"\x01" + b"\x00" * 4)  # NOOP, UNIQUE_ID, SSL
    data = v2(body=body) + CONNECT
    header, rest = check_every_split(data)
    assert header == ProxyHeader(2, "PROXY", "TCP4", ("10.1.2.3", 40000), ("10.0.0.1", 1883),
                                 16 + len(body))
    assert rest == CONNECT


def test_v2_inet6():
    header, rest = check_every_split(v2(family=2, body=inet6("2001:db8::7", "::1", 1, 2)))
    assert (header.family, header.source, header.destination) == (
        "TCP6", ("2001:db8::7", 1), ("::1", 2))
    assert rest == b""


def test_v2_unix():
    body = b"/run/client.sock".ljust(108, b"\x00") + b"/run/shoal.sock".ljust(108, b"\x00")
    header, _ = check_every_split(v2(family=3, body=body))
    assert header.family == "UNIX"
    assert header.source == ("/run/client.sock", 0)
    assert header.destination == ("/run/shoal.sock", 0)


def test_v2_local_keeps_the_connection_address():
    # a balancer's health check: LOCAL, usually AF_UNSPEC and no address at all
    for data in (v2(command=0, family=0, transport=0),
                 v2(command=0, body=inet("1.2.3.4", "5.6.7.8", 1, 2)),
                 v2(command=0, family=2, body=b"short")):  # LOCAL: addresses are ignored
        header, rest = check_every_split(data + b"after")
        assert (header.command, header.source, header.destination) == ("LOCAL", None, None)
        assert header.length == len(data)
        assert rest == b"after"


def test_v2_unspec_proxy_has_no_address():
    header, _ = check_every_split(v2(family=0, transport=0, body=b"\x00" * 5))
    assert (header.command, header.family, header.source) == ("PROXY", "UNSPEC", None)


def test_v2_incomplete_is_need_data():
    data = v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x05, b"x" * 300))
    for i in range(len(data)):
        assert parse_header(data[:i]) is NEED_DATA, i


def test_v2_large_header_fed_byte_by_byte():
    body = inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE0, b"y" * (65535 - 12 - 3))
    data = v2(body=body)
    assert len(data) == 16 + 65535
    reader = ProxyHeaderReader()
    for i in range(len(data) - 1):
        reader.receive_data(data[i:i + 1])
        assert reader.next_header() is NEED_DATA
    reader.receive_data(data[-1:] + b"z")
    assert reader.next_header().source == ("1.2.3.4", 1)
    assert reader.trailing_data == b"z"


@pytest.mark.parametrize("data, why", [
    (v2(version=1), "version 1, not 2"),
    (v2(version=3), "version 3, not 2"),
    (v2(command=2), "command 0x2"),
    (v2(family=4), "address family 0x4"),
    (v2(transport=3), "transport 0x3"),
    (v2(body=b"\x00" * 11), "11 address bytes, fewer than the 12"),
    (v2(family=2, body=b"\x00" * 12), "12 address bytes, fewer than the 36"),
    (v2(family=3, body=b"\x00" * 36), "36 address bytes, fewer than the 216"),
    (v2(transport=2, body=inet("1.2.3.4", "5.6.7.8", 1, 2)), "datagram"),
    (SIG[:5] + b"X" + SIG[6:], "not the v2 signature"),
])
def test_v2_malformed(data, why):
    with pytest.raises(ProxyProtocolError, match=why):
        feed_in_chunks(data, [1] * len(data))


def test_v2_errors_come_as_soon_as_the_bytes_show_them():
    # the version byte is wrong: no need to wait for the length or the addresses
    with pytest.raises(ProxyProtocolError, match="version"):
        parse_header(SIG + b"\x11")
    with pytest.raises(ProxyProtocolError, match="family"):
        parse_header(SIG + b"\x21\x51")


# -- not a header at all -------------------------------------------------------------------------

def test_mqtt_connect_without_a_header_is_refused_at_the_first_byte():
    with pytest.raises(ProxyProtocolError,
                       match="MQTT CONNECT: the client did not come through the load balancer"):
        parse_header(CONNECT[:1])
    with pytest.raises(ProxyProtocolError, match="TLS handshake"):
        parse_header(b"\x16\x03\x01")


def test_reader_keeps_failing_after_an_error():
    reader = ProxyHeaderReader()
    reader.receive_data(b"GET / HTTP/1.1\r\n")
    for _ in range(2):
        with pytest.raises(ProxyProtocolError, match="0x47"):
            reader.next_header()
    reader.receive_data(b"PROXY UNKNOWN\r\n")
    with pytest.raises(ProxyProtocolError):
        reader.next_header()


def test_looks_like_header():
    assert looks_like_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert looks_like_header(b"PRO")
    assert looks_like_header(v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2)))
    assert looks_like_header(SIG[:3])
    assert not looks_like_header(b"")
    assert not looks_like_header(CONNECT)
    assert not looks_like_header(b"\x0d\x0a\x0d\x0b")
    assert not looks_like_header(b"PUT / HTTP/1.1")


# -- fuzz ------------------------------------------------------------------------------------------

SEED = 20250505
VALID = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 1883\r\n",
    b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(body=inet("10.1.2.3", "10.0.0.1", 40000, 1883) + tlv(0x05, b"abc")),
    v2(family=2, body=inet6("2001:db8::7", "::1", 1, 2)),
    v2(command=0, family=0, transport=0),
    v2(family=3, body=b"/a".ljust(108, b"\x00") + b"/b".ljust(108, b"\x00")),
]


def outcome(data: bytes, sizes) -> tuple:
    reader = ProxyHeaderReader()
    pos = 0
    result = NEED_DATA
    try:
        for size in sizes:
            if pos >= len(data):
                break
            reader.receive_data(data[pos:pos + size])
            pos += size
            result = reader.next_header()
        if pos < len(data):
            reader.receive_data(data[pos:])
            result = reader.next_header()
    except ProxyProtocolError:
        return ("error",)
    if result is NEED_DATA:
        return ("need",)
    return (result, reader.trailing_data)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b))]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b = b[:rng.randrange(len(b) + 1)]
    return bytes(b)


def test_fuzz_garbage_and_mutations_raise_only_the_parser_error():
    rng = random.Random(SEED)
    seen = {"error": 0, "need": 0, "header": 0}
    for i in range(20_000):
        if i % 4 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 120)))
        elif i % 4 == 1:  # random bytes behind a real start
            data = rng.choice((b"PROXY ", SIG, SIG + b"\x21\x11")) + \
                bytes(rng.randrange(256) for _ in range(rng.randint(0, 60)))
        else:
            data = mutate(rng, rng.choice(VALID) + rng.choice((b"", CONNECT)))
        whole = outcome(data, [len(data)])  # anything but ProxyProtocolError propagates
        split = outcome(data, [rng.randint(1, 8) for _ in range(len(data))])
        # an error is found as soon as the bytes show it, a header is the same header
        assert split == whole, data
        seen[whole[0] if whole[0] in ("error", "need") else "header"] += 1
    assert all(seen.values()), seen
