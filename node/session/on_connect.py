"""CONNECT: ClientID rules, clean start / session expiry, will, limits, CONNACK."""

from __future__ import annotations

import logging
import uuid

from ..mqtt.codes import EXPIRY_NEVER, MQTT_5, PropertyId, ReasonCode
from ..mqtt.errors import ProtocolViolation
from ..mqtt.packets import Connack, Connect
from ..mqtt.topic_rules import valid_topic_name

log = logging.getLogger("shoal.session")

P = PropertyId


class ConnectRefused(Exception):
    """CONNECT answered with a CONNACK carrying an error reason, then the close."""

    def __init__(self, reason: int, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


def on_connect(broker, client, pkt: Connect) -> None:
    config = broker.config
    v5 = pkt.protocol_level == MQTT_5
    props = pkt.properties
    client_id = pkt.client_id
    assigned = None
    if not client_id:
        if not v5 and not pkt.clean_start:
            # [MQTT-3.1.3-8]: empty ClientID needs Clean Session = 1 in 3.1.1
            raise ConnectRefused(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                 "empty ClientID with Clean Session 0")
        client_id = assigned = f"shoal-{uuid.uuid4().hex}"
    if v5 and P.AUTHENTICATION_METHOD in props:
        raise ConnectRefused(ReasonCode.BAD_AUTHENTICATION_METHOD,
                             "enhanced authentication is not supported")
    will = pkt.will
    if will is not None:
        if not valid_topic_name(will.topic):
            raise ConnectRefused(ReasonCode.TOPIC_NAME_INVALID, "invalid will topic")
        if will.qos > config.max_qos:
            raise ConnectRefused(ReasonCode.QOS_NOT_SUPPORTED, "will QoS above maximum")
        if will.retain and not config.retain_available:
            raise ConnectRefused(ReasonCode.RETAIN_NOT_SUPPORTED, "retained will not available")

    connack_props: dict = {}
    if v5:
        expiry = props.get(P.SESSION_EXPIRY_INTERVAL, 0)
        if expiry > config.max_session_expiry:
            expiry = config.max_session_expiry
            connack_props[P.SESSION_EXPIRY_INTERVAL] = expiry
        receive_maximum = props.get(P.RECEIVE_MAXIMUM, 65535)
    else:
        expiry = 0 if pkt.clean_start else config.session_expiry_311
        receive_maximum = 65535

    keep_alive = pkt.keep_alive
    if config.max_keep_alive and (keep_alive == 0 or keep_alive > config.max_keep_alive):
        keep_alive = config.max_keep_alive
        if v5:
            connack_props[P.SERVER_KEEP_ALIVE] = keep_alive

    client.accept(client_id, keep_alive)  # before attach: re-sends use the client's version
    session, present = broker.open_session(client_id, pkt.clean_start, expiry,
                                           pkt.protocol_level)
    session.will = will
    session.will_delay = will.properties.get(P.WILL_DELAY_INTERVAL, 0) if (will and v5) else 0
    client.session = session

    if v5:
        if assigned is not None:
            connack_props[P.ASSIGNED_CLIENT_IDENTIFIER] = assigned
        if config.receive_maximum < 65535:
            connack_props[P.RECEIVE_MAXIMUM] = config.receive_maximum
        if config.topic_alias_maximum:
            connack_props[P.TOPIC_ALIAS_MAXIMUM] = config.topic_alias_maximum
        connack_props[P.MAXIMUM_PACKET_SIZE] = config.max_packet_size
        if config.max_qos < 2:
            connack_props[P.MAXIMUM_QOS] = config.max_qos
        if not config.retain_available:
            connack_props[P.RETAIN_AVAILABLE] = 0
    client.send(Connack(present, ReasonCode.SUCCESS, connack_props))
    # after CONNACK: re-send what is inflight, then the queue
    session.attach(client, receive_maximum)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("connected client_id=%s node=%s version=%d clean_start=%s present=%s "
                  "expiry=%s", client_id, broker.node_id, pkt.protocol_level, pkt.clean_start,
                  present, "never" if expiry == EXPIRY_NEVER else expiry)


def check_disconnect_expiry(session, props: dict) -> None:
    """[MQTT-3.14.2-2]: DISCONNECT may change the expiry, but not from 0."""
    new = props.get(P.SESSION_EXPIRY_INTERVAL)
    if new is None:
        return
    if session.expiry_interval == 0 and new != 0:
        raise ProtocolViolation("Session Expiry Interval changed from 0 at DISCONNECT")
    session.expiry_interval = new
