"""Typed protocol errors. The reason code is the hint of what to answer (like h11's
``error_status_hint``): the connection turns a ``RemoteMqttError`` into a v5 DISCONNECT
with that reason (or a CONNACK before the session exists), or a plain close for 3.1.1.
"""

from __future__ import annotations

from .codes import ReasonCode


class MqttError(Exception):
    """Base class: ``reason`` is the 5.0 reason code that describes the fault."""

    def __init__(self, msg: str, reason: int = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(msg)
        self.msg = msg
        self.reason = ReasonCode(reason)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.msg!r}, {self.reason.name})"


class LocalMqttError(MqttError):
    """We tried to do something illegal (send a packet the state does not allow,
    encode an invalid value). A bug on our side, never the peer's."""


class RemoteMqttError(MqttError):
    """The peer broke the protocol. After one of these the connection is in ERROR."""


class MalformedPacket(RemoteMqttError):
    def __init__(self, msg: str) -> None:
        super().__init__(msg, ReasonCode.MALFORMED_PACKET)


class ProtocolViolation(RemoteMqttError):
    def __init__(self, msg: str, reason: int = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(msg, reason)


class PacketTooLarge(RemoteMqttError):
    def __init__(self, msg: str) -> None:
        super().__init__(msg, ReasonCode.PACKET_TOO_LARGE)


class UnsupportedProtocolVersion(RemoteMqttError):
    """CONNECT with a protocol level we do not speak: answer CONNACK 0x84 (5.0) or
    0x01 (3.1.1), then close. ``level`` is what the client sent."""

    def __init__(self, msg: str, level: int) -> None:
        super().__init__(msg, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
        self.level = level
