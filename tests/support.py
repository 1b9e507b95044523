"""Shared helpers for the integration tests: waiting, ports, an independent MQTT codec,
a raw-socket MQTT client, a paho-mqtt wrapper and the broker process under test.

The codec here is written independently of ``node.mqtt`` on purpose: the tests must not
share a misreading of the spec with the broker they test. It is small, strict about what
it encodes, and lenient enough in what it decodes to report what the broker sent.
"""

from __future__ import annotations

import dataclasses
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- waiting


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01,
             message: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError naming ``message`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def poll_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> bool:
    """Like ``wait_for`` but answers False at the deadline instead of raising: for
    teardown steps whose outcome does not decide the test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def holds_for(predicate: Callable[[], Any], duration: float, interval: float = 0.02) -> bool:
    """True when ``predicate`` stays truthy for the whole of ``duration`` seconds.

    Used for negative assertions ("nothing more arrives"): it is a bounded observation
    window, not a synchronisation sleep."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


def let_time_pass(seconds: float) -> None:
    """Wait for wall-clock time to pass because the behaviour under test is time itself
    (an expiry, a delay). Never used to wait for another party to do something."""
    time.sleep(seconds)


def free_port() -> int:
    """A free port never handed out before in this test process, so two calls in a row
    never give the same port to two listeners."""
    return unique_free_port()


#: test listeners take ports below the kernel's ephemeral range (32768-60999 on Linux):
#: a port from that range, free while a node is down, can become the local port of an
#: outgoing connection (a peer reconnecting to it even connects to itself), and the node
#: restarted on it could not listen
_PORT_LOW, _PORT_HIGH = 12000, 32000
_PORT_RNG = random.Random(time.monotonic_ns() ^ os.getpid())


def _kernel_free_port() -> int:
    for _ in range(1000):
        port = _PORT_RNG.randrange(_PORT_LOW, _PORT_HIGH)
        if port not in _HANDED_OUT and ports_free([port]):
            return port
    raise AssertionError("no free port below the ephemeral range")


# --------------------------------------------------------------------------- codec

# Packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)


class Prop:
    """MQTT 5.0 property identifiers (section 2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


_B, _U16, _U32, _VAR, _STR, _BIN, _PAIR = "b", "u16", "u32", "var", "str", "bin", "pair"
PROP_TYPES = {
    0x01: _B, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VAR, 0x11: _U32,
    0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _B, 0x18: _U32, 0x19: _B,
    0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _B,
    0x25: _B, 0x26: _PAIR, 0x27: _U32, 0x28: _B, 0x29: _B, 0x2A: _B,
}
REPEATABLE = {Prop.USER_PROPERTY, Prop.SUBSCRIPTION_IDENTIFIER}


class Malformed(Exception):
    """The bytes the broker sent do not decode."""


def enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def enc_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


enc_bin = enc_str


def enc_props(props: dict | None) -> bytes:
    out = bytearray()
    for pid, value in (props or {}).items():
        values = value if pid in REPEATABLE else [value]
        for v in values:
            out += enc_varint(pid)
            kind = PROP_TYPES[pid]
            if kind == _B:
                out.append(v)
            elif kind == _U16:
                out += struct.pack("!H", v)
            elif kind == _U32:
                out += struct.pack("!I", v)
            elif kind == _VAR:
                out += enc_varint(v)
            elif kind in (_STR, _BIN):
                out += enc_str(v)
            else:
                out += enc_str(v[0]) + enc_str(v[1])
    return enc_varint(len(out)) + bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed(f"need {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def varint(self) -> int:
        mult, value = 1, 0
        for _ in range(4):
            b = self.byte()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128
        raise Malformed("variable byte integer longer than 4 bytes")

    def bin(self) -> bytes:
        return self.take(self.u16())

    def str(self) -> str:
        try:
            return self.bin().decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed(f"bad UTF-8: {e}") from None

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def props(self) -> dict:
        length = self.varint()
        sub = _Reader(self.take(length))
        props: dict = {}
        while not sub.at_end():
            pid = sub.varint()
            kind = PROP_TYPES.get(pid)
            if kind is None:
                raise Malformed(f"unknown property 0x{pid:02x}")
            if kind == _B:
                v: Any = sub.byte()
            elif kind == _U16:
                v = sub.u16()
            elif kind == _U32:
                v = sub.u32()
            elif kind == _VAR:
                v = sub.varint()
            elif kind == _STR:
                v = sub.str()
            elif kind == _BIN:
                v = sub.bin()
            else:
                v = (sub.str(), sub.str())
            if pid in REPEATABLE:
                props.setdefault(pid, []).append(v)
            elif pid in props:
                raise Malformed(f"property 0x{pid:02x} twice")
            else:
                props[pid] = v
        return props


@dataclass
class Connect:
    client_id: str | bytes = ""
    protocol_level: int = 5
    protocol_name: str | bytes = "MQTT"
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    will_properties: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    type = CONNECT


@dataclass
class Connack:
    session_present: bool = False
    reason_code: int = 0
    properties: dict = field(default_factory=dict)
    type = CONNACK


@dataclass
class Publish:
    topic: str | bytes
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: dict = field(default_factory=dict)
    type = PUBLISH


@dataclass
class _Ack:
    packet_id: int
    reason_code: int = 0
    properties: dict = field(default_factory=dict)


class Puback(_Ack):
    type = PUBACK


class Pubrec(_Ack):
    type = PUBREC


class Pubrel(_Ack):
    type = PUBREL


class Pubcomp(_Ack):
    type = PUBCOMP


for _cls in (Puback, Pubrec, Pubrel, Pubcomp):
    dataclasses.dataclass(_cls)


@dataclass
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass
class Subscribe:
    packet_id: int
    subscriptions: list
    properties: dict = field(default_factory=dict)
    type = SUBSCRIBE


@dataclass
class Suback:
    packet_id: int
    reason_codes: list
    properties: dict = field(default_factory=dict)
    type = SUBACK


@dataclass
class Unsubscribe:
    packet_id: int
    topic_filters: list
    properties: dict = field(default_factory=dict)
    type = UNSUBSCRIBE


@dataclass
class Unsuback:
    packet_id: int
    reason_codes: list = field(default_factory=list)
    properties: dict = field(default_factory=dict)
    type = UNSUBACK


@dataclass
class Pingreq:
    type = PINGREQ


@dataclass
class Pingresp:
    type = PINGRESP


@dataclass
class Disconnect:
    reason_code: int = 0
    properties: dict = field(default_factory=dict)
    type = DISCONNECT


@dataclass
class Auth:
    reason_code: int = 0
    properties: dict = field(default_factory=dict)
    type = AUTH


def frame(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + enc_varint(len(body)) + body


def encode(p: Any, version: int = 5) -> bytes:
    v5 = version == 5
    t = p.type
    if t == CONNECT:
        flags = 0
        if p.clean_start:
            flags |= 0x02
        if p.will_topic is not None:
            flags |= 0x04 | (p.will_qos << 3) | (0x20 if p.will_retain else 0)
        if p.password is not None:
            flags |= 0x40
        if p.username is not None:
            flags |= 0x80
        body = enc_str(p.protocol_name) + bytes([p.protocol_level, flags])
        body += struct.pack("!H", p.keep_alive)
        if v5:
            body += enc_props(p.properties)
        body += enc_str(p.client_id)
        if p.will_topic is not None:
            if v5:
                body += enc_props(p.will_properties)
            body += enc_str(p.will_topic) + enc_bin(p.will_payload)
        if p.username is not None:
            body += enc_str(p.username)
        if p.password is not None:
            body += enc_bin(p.password)
        return frame(0x10, body)
    if t == CONNACK:
        body = bytes([1 if p.session_present else 0, p.reason_code])
        if v5:
            body += enc_props(p.properties)
        return frame(0x20, body)
    if t == PUBLISH:
        first = 0x30 | (0x08 if p.dup else 0) | (p.qos << 1) | (0x01 if p.retain else 0)
        body = enc_str(p.topic)
        if p.qos:
            body += struct.pack("!H", p.packet_id)
        if v5:
            body += enc_props(p.properties)
        return frame(first, body + p.payload)
    if t in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        body = struct.pack("!H", p.packet_id)
        if v5 and (p.reason_code or p.properties):
            body += bytes([p.reason_code])
            if p.properties:
                body += enc_props(p.properties)
        return frame((t << 4) | (0x02 if t == PUBREL else 0), body)
    if t == SUBSCRIBE:
        body = struct.pack("!H", p.packet_id)
        if v5:
            body += enc_props(p.properties)
        for s in p.subscriptions:
            if isinstance(s, tuple):
                s = Subscription(*s)
            opts = s.qos
            if v5:
                opts |= (0x04 if s.no_local else 0) | (0x08 if s.retain_as_published else 0)
                opts |= s.retain_handling << 4
            body += enc_str(s.topic_filter) + bytes([opts])
        return frame(0x82, body)
    if t == SUBACK:
        body = struct.pack("!H", p.packet_id)
        if v5:
            body += enc_props(p.properties)
        return frame(0x90, body + bytes(p.reason_codes))
    if t == UNSUBSCRIBE:
        body = struct.pack("!H", p.packet_id)
        if v5:
            body += enc_props(p.properties)
        for f in p.topic_filters:
            body += enc_str(f)
        return frame(0xA2, body)
    if t == UNSUBACK:
        body = struct.pack("!H", p.packet_id)
        if v5:
            body += enc_props(p.properties) + bytes(p.reason_codes)
        return frame(0xB0, body)
    if t == PINGREQ:
        return b"\xc0\x00"
    if t == PINGRESP:
        return b"\xd0\x00"
    if t in (DISCONNECT, AUTH):
        body = b""
        if v5 and (p.reason_code or p.properties):
            body = bytes([p.reason_code]) + enc_props(p.properties)
        return frame(t << 4, body)
    raise ValueError(f"cannot encode {p!r}")


def decode(first_byte: int, body: bytes, version: int = 5) -> Any:
    v5 = version == 5
    t = first_byte >> 4
    flags = first_byte & 0x0F
    r = _Reader(body)
    if t == CONNACK:
        ack_flags, rc = r.byte(), r.byte()
        props = r.props() if v5 and not r.at_end() else {}
        return Connack(bool(ack_flags & 1), rc, props)
    if t == PUBLISH:
        qos = (flags >> 1) & 3
        topic = r.str()
        pid = r.u16() if qos else 0
        props = r.props() if v5 else {}
        return Publish(topic, r.rest(), qos, bool(flags & 1), bool(flags & 8), pid, props)
    if t in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        cls = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp}[t]
        pid = r.u16()
        rc = r.byte() if v5 and not r.at_end() else 0
        props = r.props() if v5 and not r.at_end() else {}
        return cls(pid, rc, props)
    if t == SUBACK:
        pid = r.u16()
        props = r.props() if v5 else {}
        return Suback(pid, list(r.rest()), props)
    if t == UNSUBACK:
        pid = r.u16()
        props = r.props() if v5 and not r.at_end() else {}
        return Unsuback(pid, list(r.rest()), props)
    if t == PINGRESP:
        return Pingresp()
    if t == PINGREQ:
        return Pingreq()
    if t in (DISCONNECT, AUTH):
        rc = r.byte() if not r.at_end() else 0
        props = r.props() if v5 and not r.at_end() else {}
        return (Disconnect if t == DISCONNECT else Auth)(rc, props)
    if t == SUBSCRIBE:
        pid = r.u16()
        props = r.props() if v5 else {}
        subs = []
        while not r.at_end():
            f = r.str()
            o = r.byte()
            subs.append(Subscription(f, o & 3, bool(o & 4), bool(o & 8), (o >> 4) & 3))
        return Subscribe(pid, subs, props)
    if t == CONNECT:
        name = r.str()
        level, cflags, ka = r.byte(), r.byte(), r.u16()
        v5 = level == 5
        props = r.props() if v5 else {}
        c = Connect(r.str(), level, name, bool(cflags & 2), ka, properties=props)
        if cflags & 4:
            c.will_properties = r.props() if v5 else {}
            c.will_topic = r.str()
            c.will_payload = r.bin()
            c.will_qos = (cflags >> 3) & 3
            c.will_retain = bool(cflags & 0x20)
        if cflags & 0x80:
            c.username = r.str()
        if cflags & 0x40:
            c.password = r.bin()
        return c
    raise Malformed(f"packet type {t} not expected from a broker")


def split_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take complete frames off the front of ``buf``; leave a partial one in it."""
    frames = []
    while len(buf) >= 2:
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return frames
            b = buf[i]
            length += (b & 0x7F) * mult
            i += 1
            if not b & 0x80:
                break
            mult *= 128
            if i > 4:
                raise Malformed("remaining length longer than 4 bytes")
        if len(buf) < i + length:
            return frames
        frames.append((buf[0], bytes(buf[i:i + length])))
        del buf[:i + length]
    return frames


# --------------------------------------------------------------------------- raw client


class ConnectionClosed(Exception):
    """The broker closed the connection (EOF or reset)."""


class RawClient:
    """A blocking MQTT client on a plain socket that does exactly what it is told:
    it never acknowledges, pings or reconnects by itself."""

    def __init__(self, host: str, port: int, version: int = 5, timeout: float = 5.0,
                 rcvbuf: int | None = None) -> None:
        self.version = version
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pending: list = []
        self.deferred: list = []  # received, set aside by await_packet
        self.closed = False
        self._next_id = 0
        self.received: list = []  # every packet ever received, in order

    # -- sending
    def send(self, packet: Any) -> None:
        self.send_bytes(encode(packet, self.version))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # -- receiving
    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from broker")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no packet from broker") from None
        except (ConnectionResetError, BrokenPipeError):
            self.closed = True
            raise ConnectionClosed("connection reset by broker") from None
        if not data:
            self.closed = True
            raise ConnectionClosed("connection closed by broker")
        self.buf += data
        for first, body in split_frames(self.buf):
            try:
                self.pending.append(decode(first, body, self.version))
            except Malformed as e:
                raise Malformed(f"{e}; frame from broker (MQTT level {self.version}): "
                                f"{bytes([first]).hex()} {body[:200].hex()}") from None

    def _next_from_wire(self, deadline: float) -> Any:
        while not self.pending:
            if self.closed:
                raise ConnectionClosed("connection already closed")
            self._fill(deadline)
        p = self.pending.pop(0)
        self.received.append(p)
        return p

    def recv(self, timeout: float = 5.0) -> Any:
        """The next packet. Raises TimeoutError or ConnectionClosed."""
        if self.deferred:
            return self.deferred.pop(0)
        return self._next_from_wire(time.monotonic() + timeout)

    def await_packet(self, predicate: Callable[[Any], bool], what: str,
                     timeout: float = 5.0) -> Any:
        """The first packet matching ``predicate``; packets that arrive before it are
        kept, in order, for later ``recv`` calls (e.g. a retained PUBLISH that overtakes
        the SUBACK of a later SUBSCRIBE)."""
        for i, p in enumerate(self.deferred):
            if predicate(p):
                return self.deferred.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = self._next_from_wire(deadline)
            except TimeoutError:
                raise AssertionError(f"no {what} within {timeout}s; meanwhile got "
                                     f"{self.deferred!r}") from None
            if predicate(p):
                return p
            self.deferred.append(p)

    def expect(self, cls: type, timeout: float = 5.0) -> Any:
        p = self.recv(timeout)
        assert isinstance(p, cls), f"expected {cls.__name__}, got {p!r}"
        return p

    def recv_nothing_for(self, duration: float) -> list:
        """Observe ``duration`` seconds; return packets that arrived (should be [])."""
        got = []
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return got
            try:
                got.append(self.recv(remaining))
            except TimeoutError:
                return got

    def wait_closed(self, timeout: float = 5.0) -> list:
        """Read until the broker closes; return the packets that came before the close.
        Raises AssertionError if the connection is still open after ``timeout``."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.recv(max(remaining, 0.001)))
            except ConnectionClosed:
                return got
            except TimeoutError:
                raise AssertionError(
                    f"broker did not close the connection within {timeout}s; got {got!r}"
                ) from None
            except Malformed:
                raise

    # -- conveniences
    def connect(self, client_id: str | bytes = "", clean_start: bool = True,
                keep_alive: int = 60, properties: dict | None = None,
                expect_success: bool = True, **will: Any) -> Connack:
        self.send(Connect(client_id=client_id, protocol_level=self.version,
                          clean_start=clean_start, keep_alive=keep_alive,
                          properties=dict(properties or {}), **will))
        ack = self.expect(Connack)
        if expect_success:
            assert ack.reason_code == 0, f"CONNACK refused: {ack!r}"
        return ack

    def subscribe(self, topic_filter: str, qos: int = 0, sub_id: int | None = None,
                  **options: Any) -> Suback:
        props = {Prop.SUBSCRIPTION_IDENTIFIER: [sub_id]} if sub_id is not None else {}
        pid = self.next_id()
        self.send(Subscribe(pid, [Subscription(topic_filter, qos, **options)], props))
        ack = self.await_packet(lambda p: isinstance(p, Suback) and p.packet_id == pid,
                                f"SUBACK {pid}")
        assert ack.reason_codes[0] < 0x80, f"subscription refused: {ack!r}"
        return ack

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                properties: dict | None = None, complete: bool = True) -> int:
        """Publish; with ``complete`` wait for the QoS 1/2 flow to finish."""
        pid = self.next_id() if qos else 0
        self.send(Publish(topic, payload, qos, retain, False, pid, dict(properties or {})))
        if complete and qos == 1:
            self.await_packet(lambda p: isinstance(p, Puback) and p.packet_id == pid,
                              f"PUBACK {pid}")
        elif complete and qos == 2:
            self.await_packet(lambda p: isinstance(p, Pubrec) and p.packet_id == pid,
                              f"PUBREC {pid}")
            self.send(Pubrel(pid))
            self.await_packet(lambda p: isinstance(p, Pubcomp) and p.packet_id == pid,
                              f"PUBCOMP {pid}")
        return pid

    def ping(self, timeout: float = 5.0) -> float:
        """Send PINGREQ; return seconds until the PINGRESP."""
        start = time.monotonic()
        self.send(Pingreq())
        self.await_packet(lambda p: isinstance(p, Pingresp), "PINGRESP", timeout)
        return time.monotonic() - start

    def disconnect(self, reason_code: int = 0, properties: dict | None = None) -> None:
        try:
            self.send(Disconnect(reason_code, dict(properties or {})))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        """Close the socket without a DISCONNECT (a network close)."""
        self.sock.close()
        self.closed = True

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- paho wrapper


def paho_modules():
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions
    return mqtt, PacketTypes, Properties, SubscribeOptions


class NumberedPublisher:
    """Publishes "0", "1", "2"... at QoS 1 on ``topic`` from a thread, each waited for
    (PUBACK) and recorded in ``acked``, ``pace`` seconds apart (pacing, not
    synchronisation), until ``stop()``; bounded in count. ``errors`` holds what ended it
    early. The workload of the tests that check no acknowledged message is lost."""

    def __init__(self, client: "PahoClient", topic: str, pace: float,
                 limit: int = 100_000) -> None:
        self.client, self.topic, self.pace, self.limit = client, topic, pace, limit
        self.acked: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="numbered-publisher",
                                        daemon=True)

    def start(self) -> "NumberedPublisher":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for k in range(self.limit):
                if self._stop.is_set():
                    return
                self.client.publish(self.topic, str(k).encode(), qos=1, wait=True,
                                    timeout=15.0)
                self.acked.append(k)
                self._stop.wait(self.pace)
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            self.errors.append(err)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the publisher did not stop"


class PahoClient:
    """paho-mqtt 2.x (CallbackAPIVersion.VERSION2) on its own network thread.

    It never reconnects by itself. Received messages are kept in ``messages``.
    ``transport="websockets"`` (path ``ws_path``), ``tls`` (keyword arguments of paho's
    ``tls_set``) and ``port`` (default: the node's MQTT port) reach the other listeners."""

    def __init__(self, node: "BrokerProcess", client_id: str = "", version: int = 5,
                 clean: bool = True, session_expiry: int | None = None,
                 keepalive: int = 60, will: dict | None = None,
                 connect_properties: dict | None = None, connect: bool = True,
                 transport: str = "tcp", port: int | None = None, ws_path: str = "/mqtt",
                 tls: dict | None = None) -> None:
        mqtt, PacketTypes, Properties, _ = paho_modules()
        self.mqtt = mqtt
        self.version = version
        self.node = node
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.connect_properties = connect_properties or {}
        protocol = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kwargs: dict = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                            client_id=client_id, protocol=protocol,
                            reconnect_on_failure=False, transport=transport)
        if version != 5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(**kwargs)
        self.port = port  # None: the node's MQTT port at connect time
        if transport == "websockets":
            self.client.ws_set_options(path=ws_path)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.lock = threading.Condition()
        self._connected = False
        self.messages: list = []
        self.connacks: list = []
        self.disconnects: list = []
        self.subacks: dict = {}
        self.unsubacks: dict = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        if will:
            will = dict(will)
            wprops = will.pop("properties", None)
            self.client.will_set(properties=self._props(PacketTypes.WILLMESSAGE, wprops),
                                 **will)
        if connect:
            self.connect()

    def _props(self, packet_type: int, values: dict | None):
        if not values or self.version != 5:
            return None
        _, _, Properties, _ = paho_modules()
        p = Properties(packet_type)
        for k, v in values.items():
            setattr(p, k, v)
        return p

    # -- callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.lock:
            self.connacks.append((flags.session_present, reason_code.value, properties))
            self._connected = reason_code.value == 0
            self.lock.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.lock:
            self._connected = False
            self.disconnects.append(reason_code.value if reason_code is not None else None)
            self.lock.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)
            self.lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.lock:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self.lock.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self.lock:
            self.unsubacks[mid] = reason_codes
            self.lock.notify_all()

    # -- operations
    def connect(self, clean: bool | None = None, timeout: float = 5.0) -> bool:
        """Connect (again); return session_present. Asserts the CONNACK is a success."""
        mqtt, PacketTypes, _, _ = paho_modules()
        n, d = len(self.connacks), len(self.disconnects)
        if clean is not None:
            self.clean = clean
        props = dict(self.connect_properties)
        if self.session_expiry is not None:
            props["SessionExpiryInterval"] = self.session_expiry
        kwargs: dict = {}
        if self.version == 5:
            kwargs["clean_start"] = self.clean
            kwargs["properties"] = self._props(PacketTypes.CONNECT, props)
        elif clean is not None:
            self.client._clean_session = clean  # paho fixes it at construction
        self.client.connect(self.node.host, self.port or self.node.port, self.keepalive,
                            **kwargs)
        self.client.loop_start()
        wait_for(lambda: len(self.connacks) > n or len(self.disconnects) > d, timeout,
                 message="CONNACK")
        assert len(self.connacks) > n, f"no CONNACK, disconnects={self.disconnects[d:]}"
        present, rc, props = self.connacks[-1]
        assert rc == 0, f"CONNACK reason {rc:#x}"
        self.connack_properties = props
        return bool(present)

    @property
    def session_present(self) -> bool:
        return bool(self.connacks[-1][0])

    def is_connected(self) -> bool:
        """Connected as far as the callbacks tell (a CONNACK and no disconnect since)."""
        return self._connected and self.client.is_connected()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0, sub_id: int | None = None,
                  **options: Any) -> list:
        _, PacketTypes, _, SubscribeOptions = paho_modules()
        props = None
        if sub_id is not None:
            props = self._props(PacketTypes.SUBSCRIBE, {"SubscriptionIdentifier": sub_id})
        if self.version == 5:
            opts = SubscribeOptions(qos=qos, noLocal=options.get("no_local", False),
                                    retainAsPublished=options.get("retain_as_published", False),
                                    retainHandling=options.get("retain_handling", 0))
            rc, mid = self.client.subscribe(topic, options=opts, properties=props)
        else:
            rc, mid = self.client.subscribe(topic, qos)
        assert rc == 0, f"subscribe failed locally: {rc}"
        wait_for(lambda: mid in self.subacks, timeout, message=f"SUBACK for {topic}")
        codes = self.subacks[mid]
        assert all(c < 0x80 for c in codes), f"subscription to {topic} refused: {codes}"
        return codes

    def unsubscribe(self, topic: str, timeout: float = 5.0) -> None:
        rc, mid = self.client.unsubscribe(topic)
        wait_for(lambda: mid in self.unsubacks, timeout, message="UNSUBACK")

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, properties: dict | None = None,
                wait: bool = True, timeout: float = 5.0):
        _, PacketTypes, _, _ = paho_modules()
        info = self.client.publish(topic, payload, qos, retain,
                                   properties=self._props(PacketTypes.PUBLISH, properties))
        if wait and qos:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def wait_messages(self, n: int, timeout: float = 5.0, topic: str | None = None) -> list:
        def got():
            return [m for m in self.messages if topic is None or m.topic == topic]
        wait_for(lambda: len(got()) >= n, timeout,
                 message=lambda: f"{n} messages (have {len(got())}: "
                                 f"{[m.payload[:20] for m in got()][:10]})")
        return got()

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in list(self.messages) if topic is None or m.topic == topic]

    def disconnect(self, properties: dict | None = None, reason_code: int = 0) -> None:
        mqtt, PacketTypes, _, _ = paho_modules()
        kwargs: dict = {}
        if self.version == 5:
            from paho.mqtt.reasoncodes import ReasonCode
            kwargs["reasoncode"] = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
            kwargs["properties"] = self._props(PacketTypes.DISCONNECT, properties)
        n = len(self.disconnects)
        if self.is_connected():
            self.client.disconnect(**kwargs)
            # the node may have closed the connection already: then no callback comes
            poll_until(lambda: len(self.disconnects) > n, 5.0)
        self.client.loop_stop()

    def close(self) -> None:
        """Teardown: disconnect if still connected (never raises for a dead socket)."""
        try:
            self.disconnect()
        except OSError as err:  # the socket is already gone: nothing left to close
            self.close_error = err


# --------------------------------------------------------------------------- probes


def barrier(sub: "PahoClient", pub: "PahoClient", topic: str, timeout: float = 5.0) -> None:
    """Publish a QoS 1 marker on ``topic`` (which ``sub`` must be subscribed to) and wait
    until ``sub`` has it: everything the broker sent before the marker has arrived."""
    marker = f"barrier-{time.monotonic_ns()}".encode()
    pub.publish(topic, marker, qos=1)
    wait_for(lambda: marker in sub.payloads(), timeout, message=f"barrier on {topic}")


# --------------------------------------------------------------------------- broker process

MOSQUITTO_OPTIONS = {
    # shoal flag -> (mosquitto.conf key, value formatter)
    "max_inflight": ("max_inflight_messages", str),
    "max_queue": ("max_queued_messages", str),
    "queue_qos0_offline": ("queue_qos0_messages", lambda v: "true" if v else "false"),
    "max_packet_size": ("max_packet_size", str),
    "topic_alias_maximum": ("max_topic_alias", str),
    "max_keep_alive": ("max_keepalive", str),
    "retain_available": ("retain_available", lambda v: "true" if v else "false"),
    "max_qos": ("max_qos", str),
}
#: Defaults of shoal that differ from Mosquitto's, so both run the same tests.
SHOAL_DEFAULTS_FOR_MOSQUITTO = {"max_inflight": 32, "max_queue": 1000}


#: Every node process the running test started (single nodes and cluster nodes alike):
#: tests/conftest.py attaches their log tails to failed reports and closes their clients.
LIVE_NODES: list = []


def option_flags(options: dict) -> list[str]:
    """``shoal run`` flags for node options given with underscores: True/False give
    ``--flag`` / ``--no-flag``, anything else ``--flag value``."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


class BrokerProcess:
    """The broker under test as a child process, with its log in a file."""

    def __init__(self, kind: str, workdir: Path, options: dict | None = None,
                 node_id: str = "t1") -> None:
        self.kind = kind
        self.workdir = workdir
        self.options = dict(options or {})
        self.node_id = node_id
        self.host = "127.0.0.1"
        self.port = free_port()
        self.admin_port = free_port() if kind == "shoal" else None
        self.log_path = workdir / f"{kind}-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.clients: list = []  # closed by the fixtures after each test

    @property
    def has_admin(self) -> bool:
        return self.admin_port is not None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> tuple[list[str], dict]:
        env = dict(os.environ)
        if self.kind == "shoal":
            data_dir = self.workdir / f"data-{self.port}"
            data_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "node", "run", "--node-id", self.node_id,
                   "--host", self.host, "--mqtt-port", str(self.port),
                   "--admin-port", str(self.admin_port), "--data-dir", str(data_dir)]
            cmd += option_flags(self.options)
            env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            env.setdefault("PYTHONUNBUFFERED", "1")
            return cmd, env
        if self.kind == "mosquitto":
            import pytest
            lines = [f"listener {self.port} {self.host}", "allow_anonymous true",
                     "persistence false", "log_dest stderr",
                     "log_type error", "log_type warning", "log_type notice",
                     "log_type information", "connection_messages true"]
            opts = {**SHOAL_DEFAULTS_FOR_MOSQUITTO, **self.options}
            for key, value in opts.items():
                if key == "log_level":
                    continue
                if key not in MOSQUITTO_OPTIONS:
                    pytest.skip(f"mosquitto has no equivalent of --{key}")
                conf_key, fmt = MOSQUITTO_OPTIONS[key]
                lines.append(f"{conf_key} {fmt(value)}")
            conf = self.workdir / f"mosquitto-{self.port}.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [shutil.which("mosquitto") or "mosquitto", "-c", str(conf)], env
        raise ValueError(f"unknown broker kind {self.kind!r}")

    def start(self, timeout: float = 15.0) -> "BrokerProcess":
        cmd, env = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, timeout, interval=0.05,
                 message=lambda: f"{self.kind} to listen on {self.port}\n{self.log_tail()}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode} at start:\n"
                                 f"{self.log_tail()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        if self.has_admin:
            try:
                return self.healthz().get("status") == "ok"
            except (OSError, ValueError, urllib.error.URLError):
                return False
        return True

    def restart(self, timeout: float = 15.0) -> "BrokerProcess":
        """SIGTERM the node and start it again on the same ports and data directory."""
        for client in self.clients:
            client.close()
        self.clients = []
        self.stop()
        return self.start(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the node's process group (default: kill -9: no shutdown, no
        store flush) and reap it; after SIGKILL its clients' dead sockets are dropped.
        Returns the pid."""
        assert self.proc is not None
        pid = self.proc.pid
        assert self.alive(), f"node died before the kill:\n{self.log_tail()}"
        os.killpg(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.proc.wait(timeout=10)
        if sig == signal.SIGKILL:
            assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
            for client in self.clients:
                client.close()
            self.clients = []
            if self._log:
                self._log.close()
                self._log = None
        return pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- admin API
    def _get(self, path: str, timeout: float = 3.0) -> dict:
        import pytest
        if not self.has_admin:
            pytest.skip(f"{self.kind} has no admin API")
        url = f"http://{self.host}:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            assert resp.status == 200, f"GET {path} -> {resp.status}"
            return json.loads(resp.read())

    def healthz(self) -> dict:
        return self._get("/healthz")

    def stats(self) -> dict:
        return self._get("/api/v1/stats")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    # -- clients
    def raw(self, version: int = 5, **kw: Any) -> RawClient:
        client = RawClient(self.host, self.port, version, **kw)
        self.clients.append(client)
        return client

    def paho(self, client_id: str = "", version: int = 5, **kw: Any) -> PahoClient:
        connect = kw.pop("connect", True)
        client = PahoClient(self, client_id, version, connect=False, **kw)
        self.clients.append(client)
        if connect:
            client.connect()
        return client


# --------------------------------------------------------------------------- cluster nodes


#: Ports handed out by unique_free_port / free_port_pair in this test process: a port
#: found free is not bound until its node starts, so without this two of one cluster's
#: ports (say node 2's MQTT and its transport port) could come out the same.
_HANDED_OUT: set[int] = set()


def unique_free_port() -> int:
    """A free port never handed out before by this function or free_port_pair."""
    for _ in range(200):
        port = _kernel_free_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no fresh free port")


def free_port_pair() -> int:
    """A free port C whose neighbour C + 1 is free too (a cluster node's transport and
    Raft ports); neither was handed out before."""
    for _ in range(200):
        port = _kernel_free_port()
        if port < 65535 and not {port, port + 1} & _HANDED_OUT and \
                ports_free([port, port + 1]):
            _HANDED_OUT.update((port, port + 1))
            return port
    raise AssertionError("no free pair of neighbouring ports")


def free_port_block(count: int, low: int = _PORT_LOW, high: int = _PORT_HIGH) -> int:
    """A base port B such that B .. B + count - 1 are all free (for commands that take a
    base port and count up from it)."""
    import random
    rng = random.Random(time.monotonic_ns() ^ os.getpid())
    for _ in range(500):
        base = rng.randrange(low, high - count)
        if ports_free(range(base, base + count)):
            return base
    raise AssertionError(f"no block of {count} free ports")


def ports_free(ports) -> bool:
    socks = []
    try:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True
    finally:
        for s in socks:
            s.close()


def http_json(method: str, url: str, timeout: float = 3.0, body: Any = None,
              headers: dict | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body or text) of an HTTP call (``body``: sent as JSON); HTTP
    errors are answers too. Raises OSError / URLError when nothing answers."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    sent = dict(headers or {})
    if body:
        sent["Content-Type"] = "application/json"
    req = urllib.request.Request(url, method=method, data=data, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class ClusterNodeProcess(BrokerProcess):
    """One cluster node (``python -m cluster run``) as a child process.

    Same life cycle and clients as BrokerProcess (``paho()``, ``raw()``, ``stop()``,
    ``log_tail()``), plus the cluster flags, ``kill()`` with a real signal, ``start()`` on the
    same ports and data directory again, and the cluster part of the admin API."""

    def __init__(self, workdir: Path, node_id: str, secret: str, cluster_name: str,
                 join: str | None = None, options: dict | None = None) -> None:
        super().__init__("shoal", workdir, options, node_id=node_id)
        self.port = unique_free_port()
        self.admin_port = unique_free_port()
        self.cluster_port = free_port_pair()
        self.raft_port = self.cluster_port + 1
        self.secret = secret
        self.cluster_name = cluster_name
        self.join = join
        self.data_dir = workdir / f"data-{node_id}"
        self.log_path = workdir / f"{node_id}.log"
        #: extra environment of the next start(), e.g. SHOAL_FAILPOINTS (node/failpoints.py)
        self.env_extra: dict[str, str] = {}

    @property
    def address(self) -> str:
        """host:port of the node-to-node transport (what ``--join`` takes)."""
        return f"{self.host}:{self.cluster_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def command(self) -> tuple[list[str], dict]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env_extra)
        cmd = [sys.executable, "-m", "cluster", "run", "--node-id", self.node_id,
               "--host", self.host, "--mqtt-port", str(self.port),
               "--admin-port", str(self.admin_port), "--cluster-port", str(self.cluster_port),
               "--data-dir", str(self.data_dir), "--cluster-secret", self.secret,
               "--cluster-name", self.cluster_name]
        if self.join:
            cmd += ["--join", self.join]
        cmd += option_flags(self.options)
        return cmd, env

    def start(self, timeout: float = 30.0) -> "ClusterNodeProcess":
        with open(self.log_path, "ab") as f:
            f.write(f"---- test harness: starting {self.node_id} "
                    f"(join={self.join}) ----\n".encode())
        return super().start(timeout)

    def _ready(self) -> bool:
        if not super()._ready():
            return False
        try:
            status, view = self.api("/api/v1/cluster")
        except (OSError, urllib.error.URLError):
            return False
        return status == 200 and any(n.get("id") == self.node_id
                                     for n in view.get("nodes", []))

    # -- admin API
    def api(self, path: str, method: str = "GET", timeout: float = 3.0) -> tuple[int, Any]:
        # (a node started with admin_token: the harness sends it, as the CLI would)
        token = (self.options or {}).get("admin_token")
        return http_json(method, self.admin_url + path, timeout,
                         headers={"Authorization": f"Bearer {token}"} if token else None)

    def cluster_view(self, timeout: float = 3.0) -> dict:
        status, body = self.api("/api/v1/cluster", timeout=timeout)
        assert status == 200, f"{self.node_id}: GET /api/v1/cluster -> {status} {body!r}"
        return body

    def metrics_text(self) -> str:
        """GET /metrics (Prometheus text)."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=3.0) as resp:
            return resp.read().decode()

    def session_view(self, client_id: str) -> dict | None:
        """GET /api/v1/sessions/<client_id>; None for 404."""
        from urllib.parse import quote
        status, body = self.api(f"/api/v1/sessions/{quote(client_id, safe='')}")
        if status == 404:
            return None
        assert status == 200, f"{self.node_id}: GET session {client_id} -> {status} {body!r}"
        return body


def probe_until_seen(publish: Callable[[bytes], Any], seen: Callable[[bytes], bool],
                     timeout: float = 10.0, what: str = "subscription route") -> float:
    """Publish numbered probe payloads with ``publish`` until ``seen`` reports that one
    arrived: a subscription made on one node is now known on the publishing node (routes
    travel through Raft, so they reach other nodes shortly after the SUBACK). Returns the
    seconds it took; raises AssertionError at ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    i = 0
    while True:
        marker = f"probe-{os.getpid()}-{time.monotonic_ns()}-{i}".encode()
        publish(marker)
        if poll_until(lambda: seen(marker), min(0.25, max(deadline - time.monotonic(), 0.01))):
            return time.monotonic() - start
        i += 1
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} "
                                 f"({i} probes published, none arrived)")


# --------------------------------------------------------------------------- HAProxy

#: Debian's haproxy (tests/system-packages.sh installs it), or None
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
    None)
HAPROXY_CONFIG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"


class Balancer:
    """HAProxy with deploy/haproxy/haproxy.cfg in the foreground (``-db``), its ports
    filled in through the environment variables the file documents. Duck-types as a
    node for PahoClient (``host``, ``port``, ``node_id``).

    ``send_proxy=False``: the shipped file with ``send-proxy-v2`` taken out, written to
    ``workdir``, for nodes that also take direct connections (proxy_protocol off)."""

    node_id = "lb"

    def __init__(self, workdir: Path, nodes, send_proxy: bool = True) -> None:
        assert HAPROXY is not None, "haproxy is not installed (CI installs it: .ci/run)"
        self.config = HAPROXY_CONFIG
        if not send_proxy:
            self.config = workdir / "haproxy-no-proxy-protocol.cfg"
            text = HAPROXY_CONFIG.read_text()
            assert " send-proxy-v2" in text
            self.config.write_text(text.replace(" send-proxy-v2", ""))
        self.host = "127.0.0.1"
        self.port = unique_free_port()
        self.stats_port = unique_free_port()
        # a unix socket path must stay under 108 bytes: not below pytest's tmp_path
        self.sockdir = tempfile.mkdtemp(prefix="shoal-lb-")
        self.stats_socket = os.path.join(self.sockdir, "stats.sock")
        self.log_path = workdir / "haproxy.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        self.env.update(SHOAL_LB_HOST=self.host, SHOAL_LB_PORT=str(self.port),
                        SHOAL_LB_STATS_PORT=str(self.stats_port),
                        SHOAL_LB_STATS_SOCKET=self.stats_socket)
        for i, node in enumerate(nodes, 1):
            self.env[f"SHOAL_NODE{i}_HOST"] = node.host
            self.env[f"SHOAL_NODE{i}_MQTT"] = str(node.port)
            self.env[f"SHOAL_NODE{i}_ADMIN"] = str(node.admin_port)
        self.proc: subprocess.Popen | None = None
        self.clients: list = []

    def check_config(self) -> subprocess.CompletedProcess:
        return subprocess.run([HAPROXY, "-c", "-f", str(self.config)], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def start(self) -> "Balancer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._listening, 10.0, interval=0.05,
                 message=lambda: f"haproxy to listen on {self.port}\n{self.log_tail()}")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
        return os.path.exists(self.stats_socket) and bool(self.servers())

    def command(self, line: str) -> str:
        """One command on HAProxy's stats socket (its CLI); the answer's text."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3.0)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            for _ in range(10_000):  # HAProxy closes after one answer
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, "UP 1/2"...) in the MQTT backend."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows
                if r.get("pxname") == "shoal_mqtt" and r["svname"] not in ("FRONTEND",
                                                                          "BACKEND")}

    def wait_status(self, want: dict[str, str], timeout: float = 15.0) -> None:
        last = {}

        def matches():
            last.update(self.servers())
            return all(last.get(name) == status for name, status in want.items())
        wait_for(matches, timeout, interval=0.1,
                 message=lambda: f"haproxy to show {want}: {last}\n{self.log_tail()}")

    def paho(self, client_id: str, **kw) -> PahoClient:
        client = PahoClient(self, client_id, 5, connect=False, **kw)
        self.clients.append(client)
        return client

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no haproxy log)"

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


# --------------------------------------------------------------------------- operator CLI

def shoal_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``.venv/bin/shoal ARGS`` (``python -m cluster`` where the script is not installed),
    without the caller's SHOAL_* environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "shoal")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "cluster"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(cmd + list(args), cwd=str(REPO_ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def raft_voters(node: "ClusterNodeProcess", timeout: float = 5.0) -> set[str]:
    """The Raft voter set straight from the node's pysyncobj (its ``status`` utility
    command on the Raft port, with the cluster secret), not from Shoal's own API."""
    from pysyncobj.utility import TcpUtility
    status = TcpUtility(password=node.secret, timeout=timeout).executeCommand(
        f"{node.host}:{node.raft_port}", ["status"])
    prefix = "partner_node_status_server_"
    return {status["self"].address} | {k[len(prefix):] for k in status if k.startswith(prefix)}

