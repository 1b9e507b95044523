"""CONNECT: ClientID rules, clean start / session expiry, will, limits, CONNACK."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ..auth import ACCEPT, CHECK, cert_identity
from ..mqtt.codes import EXPIRY_NEVER, MQTT_5, PropertyId, ReasonCode
from ..mqtt.errors import ProtocolViolation
from ..mqtt.packets import Auth, Connack, Connect
from ..mqtt.topic_rules import valid_topic_name
from ..ownership import Claim, ConnectRefused
from ..scram import METHOD as SCRAM_METHOD, ScramError, ScramServer

log = logging.getLogger("shoal.session")

P = PropertyId


class ConnectPlan:
    """What the CONNECT asked for, checked; the session is opened once the ClientID is
    claimed (at once on a single node, after a Raft commit in a cluster)."""

    __slots__ = ("client_id", "assigned", "clean_start", "expiry", "receive_maximum",
                 "keep_alive", "version", "will", "will_delay", "connack_props", "username")

    def __init__(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


#: seconds a CONNECT waits for its password check (a node flooded with checks refuses)
AUTH_TIMEOUT = 10.0


def on_connect(broker, client, pkt: Connect) -> None:
    plan = plan_connect(broker, pkt)
    banned = broker.flapping.check(plan.client_id, time.monotonic())
    if banned is not None:
        raise ConnectRefused(ReasonCode.CONNECTION_RATE_EXCEEDED,
                             f"this ClientID connects too often (flapping): refused for "
                             f"{banned:.0f} s more")
    auth = broker.auth
    cert = client.transport.get_extra_info("peercert") if client.transport else None
    if broker.config.tls_identity_as_username and cert:
        # a certificate verified against tls_ca is the login: its common name the user
        identity = cert_identity(cert)
        if identity is None:
            auth.refused += 1
            raise ConnectRefused(ReasonCode.NOT_AUTHORIZED, "the client certificate has no "
                                 "common name to use as username")
        plan.username = identity
        _claim(broker, client, plan)
        return
    if plan.version == MQTT_5 and P.AUTHENTICATION_METHOD in pkt.properties:
        _start_enhanced_auth(broker, client, plan, pkt.properties.get(P.AUTHENTICATION_DATA))
        return
    verdict = auth.decide(pkt.username, pkt.password)
    if verdict is CHECK:
        fut = auth.check_later(asyncio.get_running_loop(), plan.client_id, pkt.username,
                               pkt.password, client.peer, cert)
        client.defer_until([fut], AUTH_TIMEOUT, lambda: _checked(broker, client, plan, fut),
                           what="a password check")
        return
    if verdict is not ACCEPT:
        raise ConnectRefused(*verdict)
    _claim(broker, client, plan)


def _checked(broker, client, plan: ConnectPlan, fut) -> None:
    """After the password check (``fut``): go on to the claim, or refuse."""
    refused = None
    if not fut.done():
        refused = ConnectRefused(ReasonCode.SERVER_BUSY, "the password check took too long")
    elif fut.cancelled() or fut.exception() is not None:
        log.error("login check failed client_id=%s node=%s: %r", plan.client_id,
                  broker.node_id, None if fut.cancelled() else fut.exception())
        refused = ConnectRefused(ReasonCode.SERVER_UNAVAILABLE, "the login check failed")
    elif fut.result().refusal is not None:
        refused = ConnectRefused(*fut.result().refusal)
    if refused is not None:
        broker.auth.refused += 1
        raise refused
    plan.username = fut.result().identity
    _claim(broker, client, plan)


def _start_enhanced_auth(broker, client, plan: ConnectPlan, data: bytes | None) -> None:
    """SCRAM-SHA-256 (node/scram.py): answer the client-first message with AUTH 0x18;
    until the client's AUTH comes, only AUTH and DISCONNECT are read (connect_timeout
    still ends a client that never answers)."""
    scram = ScramServer()
    passwords = broker.auth.passwords
    try:
        server_first = scram.first(data or b"", passwords.users.get)
    except ScramError as err:
        broker.auth.refused += 1
        raise ConnectRefused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, f"SCRAM: {err}") from None
    client.enhanced_auth((scram, plan))
    client.send(Auth(ReasonCode.CONTINUE_AUTHENTICATION,
                     {P.AUTHENTICATION_METHOD: SCRAM_METHOD,
                      P.AUTHENTICATION_DATA: server_first}))


def on_auth_during_connect(broker, client, pkt: Auth) -> None:
    """The client-final message: the proof checked, CONNACK carries the server-final."""
    scram, plan = client.auth_flow
    client.enhanced_auth(None)
    props = pkt.properties
    if pkt.reason_code != ReasonCode.CONTINUE_AUTHENTICATION or \
            props.get(P.AUTHENTICATION_METHOD) != SCRAM_METHOD:
        # [MQTT-4.12.0-5]: the same method throughout; only "continue" from the client here
        raise ProtocolViolation("AUTH must continue the CONNECT's authentication method")
    try:
        server_final = scram.final(props.get(P.AUTHENTICATION_DATA) or b"")
    except ScramError as err:
        broker.auth.refused += 1
        raise ConnectRefused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, f"SCRAM: {err}") from None
    if server_final is None:
        broker.auth.refused += 1
        raise ConnectRefused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad username or password")
    plan.username = scram.user
    plan.connack_props[P.AUTHENTICATION_METHOD] = SCRAM_METHOD
    plan.connack_props[P.AUTHENTICATION_DATA] = server_final
    _claim(broker, client, plan)


def not_during_auth(broker, client, pkt) -> None:
    raise ProtocolViolation(f"{type(pkt).__name__} before the CONNACK of an enhanced "
                            "authentication (only AUTH or DISCONNECT)")


def disconnect_during_auth(broker, client, pkt) -> None:
    client.enhanced_auth(None)
    client.close_by_client(False)


def _claim(broker, client, plan: ConnectPlan) -> None:
    """The login is known: rules on the will and the ClientID's owner, then the claim."""
    auth = broker.auth
    if auth.acl is not None and plan.will is not None and \
            not auth.acl.rights(plan.username, plan.client_id).may_publish(plan.will.topic):
        auth.refused += 1
        raise ConnectRefused(ReasonCode.NOT_AUTHORIZED, "the will topic is not writable for "
                             "this client (acl_file)")
    bind = broker.config.bind_client_id
    if bind:
        local = broker.sessions.get(plan.client_id)
        if local is not None and local.username != plan.username:
            auth.refused += 1
            raise ConnectRefused(ReasonCode.NOT_AUTHORIZED, "this ClientID belongs to "
                                 "another user (bind_client_id)")
    claim = broker.cluster.claim(plan.client_id, plan.clean_start,
                                 _owner(plan.username) if bind else None)
    if isinstance(claim, Claim):
        finish_connect(broker, client, plan, claim)
    else:
        client.defer_connect(plan, claim)


def plan_connect(broker, pkt: Connect) -> ConnectPlan:
    config = broker.config
    v5 = pkt.protocol_level == MQTT_5
    props = pkt.properties
    client_id = pkt.client_id
    if len(client_id) > config.max_client_id_length:
        raise ConnectRefused(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                             f"ClientID longer than {config.max_client_id_length} characters "
                             "(max_client_id_length)")
    assigned = None
    if not client_id:
        if not v5 and not pkt.clean_start:
            # [MQTT-3.1.3-8]: empty ClientID needs Clean Session = 1 in 3.1.1
            raise ConnectRefused(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                                 "empty ClientID with Clean Session 0")
        client_id = assigned = f"shoal-{uuid.uuid4().hex}"
    if v5 and P.AUTHENTICATION_METHOD in props and \
            props[P.AUTHENTICATION_METHOD] != (config.enhanced_auth or None):
        raise ConnectRefused(ReasonCode.BAD_AUTHENTICATION_METHOD,
                             f"authentication method {props[P.AUTHENTICATION_METHOD]!r} is not "
                             "offered here" + (f" (only {config.enhanced_auth})"
                                               if config.enhanced_auth else ""))
    will = pkt.will
    if will is not None:
        if not valid_topic_name(will.topic):
            raise ConnectRefused(ReasonCode.TOPIC_NAME_INVALID, "invalid will topic")
        if topic_too_big(config, will.topic):
            raise ConnectRefused(ReasonCode.TOPIC_NAME_INVALID, "will topic beyond "
                                 "max_topic_levels / max_topic_length")
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

    return ConnectPlan(
        client_id=client_id, assigned=assigned, clean_start=pkt.clean_start, expiry=expiry,
        receive_maximum=receive_maximum, keep_alive=keep_alive, version=pkt.protocol_level,
        will=will, will_delay=will.properties.get(P.WILL_DELAY_INTERVAL, 0) if (will and v5)
        else 0, connack_props=connack_props, username=pkt.username)


def _owner(username: str | None) -> str:
    """The ClientID binding's name of a login (anonymous clients share one)."""
    return "" if username is None else "u:" + username


def open_connect_session(broker, plan: ConnectPlan, claim: Claim):
    """Open (or resume) the session of the claimed ClientID, with the CONNECT's will,
    and store it: ``(session, present)``."""
    session, present = broker.open_session(plan.client_id, plan.clean_start, plan.expiry,
                                           plan.version, claim)
    session.will = plan.will
    session.will_delay = plan.will_delay
    session.username = plan.username  # (the user travels with the session: ACL rights)
    broker.persist(session)
    return session, present


def finish_connect(broker, client, plan: ConnectPlan, claim: Claim, opened=None) -> None:
    """Answer CONNACK for the session ``opened`` (opened here when None), re-send, then
    the queue."""
    config = broker.config
    v5 = plan.version == MQTT_5
    client.accept(plan.client_id, plan.keep_alive)  # before attach: re-sends use its version
    session, present = opened or open_connect_session(broker, plan, claim)
    client.session = session
    connack_props = plan.connack_props
    if v5:
        if plan.assigned is not None:
            connack_props[P.ASSIGNED_CLIENT_IDENTIFIER] = plan.assigned
        if config.receive_maximum < 65535:
            connack_props[P.RECEIVE_MAXIMUM] = config.receive_maximum
        if config.topic_alias_maximum:
            connack_props[P.TOPIC_ALIAS_MAXIMUM] = config.topic_alias_maximum
        connack_props[P.MAXIMUM_PACKET_SIZE] = config.max_packet_size
        if config.max_qos < 2:
            connack_props[P.MAXIMUM_QOS] = config.max_qos
        if not config.retain_available:
            connack_props[P.RETAIN_AVAILABLE] = 0
        if claim.fresh_reason is not None:
            connack_props[P.REASON_STRING] = f"previous session lost: {claim.fresh_reason}"
    client.send(Connack(present, ReasonCode.SUCCESS, connack_props))
    # after CONNACK: re-send what is inflight, then the queue
    session.attach(client, plan.receive_maximum)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("connected client_id=%s node=%s version=%d clean_start=%s present=%s "
                  "expiry=%s epoch=%d", plan.client_id, broker.node_id, plan.version,
                  plan.clean_start, present,
                  "never" if plan.expiry == EXPIRY_NEVER else plan.expiry, claim.epoch)


def topic_too_big(config, topic: str) -> bool:
    """Beyond ``max_topic_levels`` or ``max_topic_length`` (a name or a filter)?"""
    return topic.count("/") >= config.max_topic_levels or (
        len(topic) > config.max_topic_length // 4 and
        len(topic.encode("utf-8", "surrogatepass")) > config.max_topic_length)


def check_disconnect_expiry(session, props: dict) -> None:
    """[MQTT-3.14.2-2]: DISCONNECT may change the expiry, but not from 0."""
    new = props.get(P.SESSION_EXPIRY_INTERVAL)
    if new is None:
        return
    if session.expiry_interval == 0 and new != 0:
        raise ProtocolViolation("Session Expiry Interval changed from 0 at DISCONNECT")
    session.expiry_interval = new
