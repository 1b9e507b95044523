"""One slotted dataclass per MQTT control packet (3.1.1 and 5.0 share them).

Conventions
-----------
* Reason codes are always 5.0 ``ReasonCode`` values; the encoder says them the 3.1.1
  way when the connection speaks 3.1.1 (CONNACK return codes, SUBACK 0x80).
* ``properties`` is a ``dict[PropertyId, value]``. ``USER_PROPERTY`` and
  ``SUBSCRIPTION_IDENTIFIER`` are lists (they may repeat); every other value is an int,
  ``str`` or ``bytes`` by the property's wire type. 3.1.1 packets carry ``{}``.
* Packets are values: treat them as immutable. The rarely built ones are frozen; PUBLISH
  and its acknowledgements are not, because a frozen dataclass's ``__init__`` costs about
  4x more (0.55 vs 0.12 us measured with 7 fields on CPython 3.11) and they are built
  once per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .codes import PacketType, ReasonCode

Properties = dict  # dict[PropertyId, Any]


@dataclass(slots=True, frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Connect:
    client_id: str = ""
    protocol_level: int = 4
    protocol_name: str = "MQTT"
    clean_start: bool = True
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)
    type = PacketType.CONNECT


@dataclass(slots=True, frozen=True)
class Connack:
    session_present: bool = False
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.CONNACK


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0  # 0 when qos == 0
    properties: Properties = field(default_factory=dict)
    type = PacketType.PUBLISH


@dataclass(slots=True)
class Puback:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.PUBACK


@dataclass(slots=True)
class Pubrec:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.PUBREC


@dataclass(slots=True)
class Pubrel:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.PUBREL


@dataclass(slots=True)
class Pubcomp:
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.PUBCOMP


@dataclass(slots=True, frozen=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (5.0 section 3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0  # 0 send retained, 1 only if new subscription, 2 never


@dataclass(slots=True, frozen=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = field(default_factory=dict)
    type = PacketType.SUBSCRIBE


@dataclass(slots=True, frozen=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = field(default_factory=dict)
    type = PacketType.SUBACK


@dataclass(slots=True, frozen=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = field(default_factory=dict)
    type = PacketType.UNSUBSCRIBE


@dataclass(slots=True, frozen=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 3.1.1 has none on the wire
    properties: Properties = field(default_factory=dict)
    type = PacketType.UNSUBACK


@dataclass(slots=True, frozen=True)
class Pingreq:
    type = PacketType.PINGREQ


@dataclass(slots=True, frozen=True)
class Pingresp:
    type = PacketType.PINGRESP


@dataclass(slots=True, frozen=True)
class Disconnect:
    reason_code: int = ReasonCode.NORMAL_DISCONNECTION
    properties: Properties = field(default_factory=dict)
    type = PacketType.DISCONNECT


@dataclass(slots=True, frozen=True)
class Auth:
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)
    type = PacketType.AUTH


Packet = Union[
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback,
    Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth,
]

PACKET_CLASSES: dict[int, type] = {
    cls.type: cls
    for cls in (Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe,
                Suback, Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth)
}

__all__ = [name for name in dir() if not name.startswith("_") and name != "Union"]
