"""Shoal's sans-IO MQTT 3.1.1 / 5.0 codec: bytes <-> packet objects, no sockets.

``MqttConnection`` (server role) frames, decodes and checks the packet order;
``codec.encode`` / ``codec.decode`` / ``codec.publish_parts`` are the pure functions
under it; ``topic_rules`` checks topic names and filters.
"""

from .codec import decode, encode, publish_parts
from .codes import (
    ALLOWED_PROPERTIES, CONNACK_V5_TO_311, EXPIRY_NEVER, MAX_REMAINING_LENGTH, MQTT_3_1,
    MQTT_3_1_1, MQTT_5, PROPERTY_TYPES, REPEATABLE_PROPERTIES, WILL, ConnackCode311,
    PacketType, PropertyId, PropertyType, ReasonCode,
)
from .connection import NEED_DATA, ConnectionState, MqttConnection
from .errors import (
    LocalMqttError, MalformedPacket, MqttError, PacketTooLarge, ProtocolViolation,
    RemoteMqttError, UnsupportedProtocolVersion,
)
from .packets import (
    PACKET_CLASSES, Auth, Connack, Connect, Disconnect, Packet, Pingreq, Pingresp, Puback,
    Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe, Will,
)
from .topic_rules import parse_shared, valid_topic_filter, valid_topic_name

__all__ = [
    "decode", "encode", "publish_parts",
    "ALLOWED_PROPERTIES", "CONNACK_V5_TO_311", "EXPIRY_NEVER", "MAX_REMAINING_LENGTH",
    "MQTT_3_1", "MQTT_3_1_1", "MQTT_5", "PROPERTY_TYPES", "REPEATABLE_PROPERTIES", "WILL",
    "ConnackCode311", "PacketType", "PropertyId", "PropertyType", "ReasonCode",
    "NEED_DATA", "ConnectionState", "MqttConnection",
    "LocalMqttError", "MalformedPacket", "MqttError", "PacketTooLarge", "ProtocolViolation",
    "RemoteMqttError", "UnsupportedProtocolVersion",
    "PACKET_CLASSES", "Auth", "Connack", "Connect", "Disconnect", "Packet", "Pingreq",
    "Pingresp", "Puback", "Pubcomp", "Publish", "Pubrec", "Pubrel", "Suback", "Subscribe",
    "Subscription", "Unsuback", "Unsubscribe", "Will",
    "parse_shared", "valid_topic_filter", "valid_topic_name",
]
