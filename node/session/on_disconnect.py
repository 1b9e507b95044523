"""DISCONNECT, PINGREQ and AUTH from the client."""

from __future__ import annotations

from ..mqtt.codes import ReasonCode
from ..mqtt.errors import ProtocolViolation
from .on_connect import check_disconnect_expiry


def on_disconnect(broker, client, pkt) -> None:
    session = client.session
    check_disconnect_expiry(session, pkt.properties)
    # Normal disconnection discards the will [MQTT-3.1.2-10]; 0x04 asks for it.
    send_will = pkt.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
    client.close_by_client(send_will)


def on_pingreq(broker, client, pkt) -> None:
    client.write_pingresp()


def on_auth(broker, client, pkt) -> None:
    # After the CONNACK (or without an Authentication Method in the CONNECT) an
    # AUTH packet is out of place [MQTT-4.12.0-7] (during one: on_connect.py).
    raise ProtocolViolation("AUTH without enhanced authentication")
