"""``MqttConnection``: the sans-IO MQTT connection, server role (the broker's side).

Three verbs, as in h11: ``receive_data(bytes)`` only appends (``b""`` is EOF),
``next_packet()`` returns one packet or ``NEED_DATA``, ``send(packet)`` returns bytes.
No socket, clock or logging inside. The transitions are the tables of ``_state``.

    conn.receive_data(chunk)
    while (pkt := conn.next_packet()) is not NEED_DATA:
        out.extend(handle(session, pkt))
    transport.writelines([conn.send(p) for p in out])

Receive buffer: the unparsed bytes are ``_buf[_pos:]`` (an immutable ``bytes``); new
chunks wait in ``_chunks`` and are joined to the leftover only when the packet being
read needs them (``_merge``), so every byte is copied O(1) times however the stream is
chunked, and a packet is decoded in place, never sliced out of the buffer first.
"""

from __future__ import annotations

from ._framing import encode_varint, read_varint, remaining_length as _remaining_length
from .codec import DECODERS, encode, publish_parts, publish_parts_with_block
from .codes import ALLOWED_PROPERTIES, MAX_REMAINING_LENGTH, PacketType, PropertyId, ReasonCode
from .errors import (
    LocalMqttError, MalformedPacket, PacketTooLarge, ProtocolViolation, RemoteMqttError,
    UnsupportedProtocolVersion,
)
from .packets import Connack, Connect, Disconnect, Publish
from .properties import encode_properties
from ._state import (
    CLIENT_TRANSITIONS, CONNACK_REFUSED, SERVER_ONLY, SERVER_TRANSITIONS, ConnectionState,
    public_state,
)

__all__ = ["MqttConnection", "ConnectionState", "NEED_DATA", "DEFAULT_MAX_PACKET_SIZE"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by ``next_packet()`` when the buffer holds no complete packet.
NEED_DATA = _Sentinel("NEED_DATA")

#: Largest packet MQTT can frame: 1 + 4 header bytes + 268,435,455.
DEFAULT_MAX_PACKET_SIZE = MAX_REMAINING_LENGTH + 5

_S = ConnectionState
_AWAIT_CONNECT = _S.AWAIT_CONNECT
_CONNECTED = _S.CONNECTED
_CLOSED = _S.CLOSED
_ERROR = _S.ERROR
_CONNECT = PacketType.CONNECT
_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS
_A_PUBLISH = ALLOWED_PROPERTIES[PacketType.PUBLISH]
_SUBSCRIPTION_IDENTIFIER = PropertyId.SUBSCRIPTION_IDENTIFIER
_MAXIMUM_PACKET_SIZE = PropertyId.MAXIMUM_PACKET_SIZE
_TOPIC_ALIAS_MAXIMUM = PropertyId.TOPIC_ALIAS_MAXIMUM
_VALID_DISCONNECT_REASONS = frozenset({
    0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
})


#: outbound topic aliases one connection keeps at most, and the topic characters they hold
OUT_ALIASES = 1024
OUT_ALIAS_BYTES = 64 * 1024


class MqttConnection:
    """One client connection, seen from the broker.

    ``max_packet_size``: our limit on an incoming packet's total size (fixed header
    included), checked as soon as the fixed header is read. ``topic_alias_maximum``:
    how many inbound topic aliases we accept (the broker tells the client in CONNACK).
    """

    __slots__ = (
        "version", "state", "peer_max_packet_size", "peer_topic_alias_maximum",
        "max_packet_size", "topic_alias_maximum",
        "_client", "_server", "_accept", "_error", "_halt",
        "_buf", "_pos", "_chunks", "_chunks_len", "_eof",
        "_in_aliases", "_out_aliases", "_out_alias_bytes",
    )

    def __init__(self, *, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 topic_alias_maximum: int = 0) -> None:
        self.version: int | None = None
        self.state = _AWAIT_CONNECT
        self.peer_max_packet_size = DEFAULT_MAX_PACKET_SIZE
        self.peer_topic_alias_maximum = 0
        self.max_packet_size = max_packet_size
        self.topic_alias_maximum = topic_alias_maximum
        self._client = _AWAIT_CONNECT  # the client's side of the state machine
        self._server = _AWAIT_CONNECT  # ours
        self._accept = CLIENT_TRANSITIONS[_AWAIT_CONNECT]
        self._error: RemoteMqttError | None = None
        self._halt = False  # ERROR or CLOSED: next_packet parses nothing more
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] = []
        self._chunks_len = 0
        self._eof = False
        self._in_aliases: dict[int, str] = {}
        self._out_aliases: dict[str, int] = {}
        self._out_alias_bytes = 0  # topic characters kept by _out_aliases

    def __repr__(self) -> str:
        return (f"<MqttConnection v{self.version} {self.state.name} "
                f"buffered={len(self._buf) - self._pos + self._chunks_len}>")

    # ------------------------------------------------------------------ receiving --

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalMqttError("receive_data after EOF")
        if self._error is not None:
            return  # nothing will be parsed any more: do not let the buffer grow
        if type(data) is not bytes:
            data = bytes(data)
        self._chunks.append(data)
        self._chunks_len += len(data)

    def unparsed(self, limit: int) -> bytes:
        """Up to ``limit`` received bytes not parsed yet, for diagnostics (after a
        protocol error they are what the peer sent that could not be parsed)."""
        head = self._buf[self._pos:self._pos + limit]
        if len(head) < limit and self._chunks:
            head += b"".join(self._chunks)[:limit - len(head)]
        return head

    def next_packet(self):
        """The next complete packet, or ``NEED_DATA``. A protocol error raises
        ``RemoteMqttError``; the connection is then in ERROR and every later call raises
        the same error. Once CLOSED it parses nothing more and returns ``NEED_DATA``,
        except that bytes after the client's own DISCONNECT raise ``ProtocolViolation``
        (h11's ``expect_nothing``)."""
        if self._halt:
            return self._halted()
        try:
            while True:
                buf = self._buf
                pos = self._pos
                n = len(buf)
                if n - pos >= 2:
                    b0 = buf[pos]
                    rl = buf[pos + 1]
                    if rl < 0x80:
                        start = pos + 2
                    else:
                        r = _remaining_length(buf, pos + 1, n)
                        if r is None:
                            if not self._merge(n - pos + 1):
                                return self._need_data()
                            continue
                        rl, start = r
                    need = start - pos + rl
                    if need > self.max_packet_size:
                        raise PacketTooLarge(
                            f"packet of {need} bytes exceeds the maximum {self.max_packet_size}")
                    nxt = self._accept.get(b0 >> 4)
                    if nxt is None:
                        raise self._refused(b0 >> 4)
                    end = start + rl
                    if end <= n:
                        self._pos = end
                        pkt = DECODERS[b0](b0, buf, start, end, self.version)
                        if b0 >> 4 == 3:  # PUBLISH
                            if pkt.properties:
                                self._inbound_publish_properties(pkt)
                            return pkt
                        if nxt is not self._client:
                            self._client_transition(pkt, nxt)
                        return pkt
                else:
                    need = 2
                if not self._merge(need):
                    return self._need_data()
        except RemoteMqttError as exc:
            self._fail(exc)
            raise

    def _merge(self, need: int) -> bool:
        """Join the waiting chunks to the leftover if together they hold ``need`` bytes
        (counted from ``_pos``); False when the packet needs more than has arrived."""
        chunks = self._chunks
        have = len(self._buf) - self._pos
        if not chunks or have + self._chunks_len < need:
            return False
        if have:
            chunks.insert(0, self._buf[self._pos:])
        self._buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._pos = 0
        chunks.clear()
        self._chunks_len = 0
        return True

    def _need_data(self):
        if self._eof and (len(self._buf) - self._pos or self._chunks_len):
            raise MalformedPacket("connection closed in the middle of a packet")
        return NEED_DATA

    def _halted(self):
        if self._error is not None:
            raise self._error
        pending = len(self._buf) - self._pos or self._chunks_len
        self._buf, self._pos, self._chunks, self._chunks_len = b"", 0, [], 0
        if pending and self._client is _CLOSED:
            # The client sent DISCONNECT and then more: its protocol error.
            exc = ProtocolViolation("data after DISCONNECT")
            self._fail(exc)
            raise exc
        # We closed (DISCONNECT or a refusing CONNACK sent): what the client had already
        # sent is dropped unread.
        return NEED_DATA

    def _fail(self, exc: RemoteMqttError) -> None:
        self._error = exc
        self._halt = True
        self.state = _ERROR

    def _refused(self, ptype: int) -> RemoteMqttError:
        if ptype == 0:
            return MalformedPacket("packet type 0 is reserved")
        if self._client is _AWAIT_CONNECT:
            return ProtocolViolation(f"first packet is {PacketType(ptype).name}, not CONNECT")
        if ptype == _CONNECT:
            return ProtocolViolation("second CONNECT")
        if ptype in SERVER_ONLY:
            return ProtocolViolation(f"a client may not send {PacketType(ptype).name}")
        return ProtocolViolation(f"{PacketType(ptype).name} not allowed now")

    def _client_transition(self, pkt, nxt: ConnectionState) -> None:
        if pkt.type == _CONNECT:
            self._on_connect(pkt)
        self._client = nxt
        self._accept = CLIENT_TRANSITIONS[nxt]
        self.state = public_state(nxt, self._server)
        if self.state is _CLOSED:
            self._halt = True

    def _on_connect(self, pkt: Connect) -> None:
        self.version = pkt.protocol_level
        props = pkt.properties
        if props:
            self.peer_max_packet_size = props.get(_MAXIMUM_PACKET_SIZE,
                                                  DEFAULT_MAX_PACKET_SIZE)
            self.peer_topic_alias_maximum = props.get(_TOPIC_ALIAS_MAXIMUM, 0)

    def _inbound_publish_properties(self, pkt: Publish) -> None:
        # Only 5.0 PUBLISHes have properties.
        props = pkt.properties
        if _SUBSCRIPTION_IDENTIFIER in props:
            raise ProtocolViolation("a client may not send a subscription identifier")
        alias = props.pop(_TOPIC_ALIAS, None)
        if alias is None:
            return
        if alias == 0 or alias > self.topic_alias_maximum:
            raise ProtocolViolation(f"topic alias {alias} out of range 1.."
                                    f"{self.topic_alias_maximum}", ReasonCode.TOPIC_ALIAS_INVALID)
        if pkt.topic:
            self._in_aliases[alias] = pkt.topic
        else:
            topic = self._in_aliases.get(alias)
            if topic is None:
                raise ProtocolViolation(f"unknown topic alias {alias}")
            pkt.topic = topic

    # -------------------------------------------------------------------- sending --

    def send(self, packet) -> bytes:
        """The bytes of ``packet`` in the connection's version. Only CONNACK (or AUTH in
        5.0) before the connection is accepted; nothing after we sent DISCONNECT or a
        refusing CONNACK. Only our side's state counts (as in h11): replies to packets
        read before the client's DISCONNECT or before a protocol error can still be
        encoded."""
        if self.version is None:
            raise LocalMqttError(f"cannot send {type(packet).__name__} before CONNECT")
        key = packet.type
        if key == PacketType.CONNACK and packet.reason_code >= 0x80:
            key = CONNACK_REFUSED
        nxt = SERVER_TRANSITIONS[self._server].get(key)
        if nxt is None:
            raise LocalMqttError(f"cannot send {type(packet).__name__} when the server "
                                 f"side is {self._server.name}")
        data = encode(packet, self.version)
        if nxt is not self._server:
            self._server = nxt
            if self._error is None:
                self.state = public_state(self._client, nxt)
                if self.state is _CLOSED:
                    self._halt = True
        return data

    def encode_publish(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                       packet_id: int, properties: dict | None) -> bytes:
        """A PUBLISH for delivery, with outbound topic aliases when the client allows
        them: the first PUBLISH of a topic takes the next free alias (topic and alias
        are sent), later ones send an empty topic and the alias; once every alias is
        taken, topics without one go in full.

        An alias is only spent on a frame that fits the client's Maximum Packet Size.
        A frame that does not fit is still returned (without alias): the caller compares
        ``len(frame)`` with ``peer_max_packet_size`` and discards it [MQTT-3.1.2-24]."""
        version = self.version
        if version is None or self._server is _CLOSED:
            # Before the CONNACK is allowed: a resumed session's re-sends may be encoded
            # first and written after the CONNACK (the caller orders the bytes).
            raise LocalMqttError(f"cannot send PUBLISH in state {self.state.name}")
        limit = self.peer_max_packet_size
        extra = 2 if qos else 0
        if version == 5 and self.peer_topic_alias_maximum:
            aliases = self._out_aliases
            alias = aliases.get(topic)
            # (the client may allow 65,535: we keep at most OUT_ALIASES of them, and
            # OUT_ALIAS_BYTES of topics, whatever it allows)
            new = alias is None and len(aliases) < self.peer_topic_alias_maximum and \
                len(aliases) < OUT_ALIASES and \
                self._out_alias_bytes + len(topic) <= OUT_ALIAS_BYTES
            if new:
                alias = len(aliases) + 1
            if alias is not None:
                # The property block with TOPIC_ALIAS in front of the caller's properties
                # (whose dict is shared between subscribers and stays untouched).
                if properties:
                    if _TOPIC_ALIAS in properties:
                        raise LocalMqttError("the connection assigns topic aliases itself")
                    block = encode_properties(properties, _A_PUBLISH)
                    n, start = read_varint(block, 0, len(block))
                    block = (encode_varint(n + 3) + bytes((0x23, alias >> 8, alias & 0xFF))
                             + block[start:])
                else:
                    block = bytes((3, 0x23, alias >> 8, alias & 0xFF))
                head, tail = publish_parts_with_block("" if not new else topic, payload, qos,
                                                      retain, dup, block)
                if len(head) + len(tail) + extra <= limit:
                    if new:
                        aliases[topic] = alias
                        self._out_alias_bytes += len(topic)
                    return _join(head, tail, qos, packet_id)
        head, tail = publish_parts(version, topic, payload, qos, retain, dup, properties)
        return _join(head, tail, qos, packet_id)

    def error_reply(self, err: RemoteMqttError) -> bytes:
        """What to write before closing after ``err``: a 5.0 DISCONNECT with its reason
        once connected; a CONNACK for an unsupported protocol level; else nothing."""
        if self._server is _CONNECTED and self.version == 5:
            self._server = _CLOSED
            if self.state is not _ERROR:
                self.state = _CLOSED
            self._halt = True
            reason = err.reason if err.reason in _VALID_DISCONNECT_REASONS \
                else ReasonCode.UNSPECIFIED_ERROR
            return encode(Disconnect(reason, {}), 5)
        if self._server is _AWAIT_CONNECT and isinstance(err, UnsupportedProtocolVersion):
            self._server = _CLOSED
            if err.level == 5:
                return encode(Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, {}), 5)
            return b"\x20\x02\x00\x01"
        return b""


def _join(head: bytes, tail: bytes, qos: int, packet_id: int) -> bytes:
    if qos:
        if not 0 < packet_id <= 0xFFFF:
            raise LocalMqttError(f"PUBLISH QoS {qos} with packet identifier {packet_id}")
        return b"".join((head, packet_id.to_bytes(2, "big"), tail))
    return head + tail

