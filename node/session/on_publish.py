"""PUBLISH from the client and the acknowledgement flows of QoS 1 and 2, both ways."""

from __future__ import annotations

import logging

from ..mqtt.codes import MQTT_5, PropertyId, ReasonCode
from ..mqtt.errors import ProtocolViolation
from .message import Message
from .on_connect import topic_too_big

log = logging.getLogger("shoal.session")

_SUB_ID = PropertyId.SUBSCRIPTION_IDENTIFIER


def on_publish(broker, client, pkt) -> None:
    qos = pkt.qos
    config = broker.config
    if qos > config.max_qos:
        raise ProtocolViolation("QoS not supported", ReasonCode.QOS_NOT_SUPPORTED)
    if pkt.retain and not config.retain_available:
        raise ProtocolViolation("retain not supported", ReasonCode.RETAIN_NOT_SUPPORTED)
    props = pkt.properties
    if props and _SUB_ID in props:
        raise ProtocolViolation("Subscription Identifier in a client PUBLISH")  # [MQTT-3.3.4-6]
    session = client.session
    broker.counters.messages_in += 1
    topic = pkt.topic
    # one length test for the usual topic: shorter than broker.topic_check_len, it can
    # have neither max_topic_levels levels nor max_topic_length bytes
    if len(topic) >= broker.topic_check_len and topic_too_big(config, topic):
        _refuse_server_topic(broker, client, pkt, ReasonCode.TOPIC_NAME_INVALID)
        return
    if topic.startswith("$"):
        _refuse_server_topic(broker, client, pkt)
        return
    if pkt.retain and pkt.payload and _retained_full(broker, config, topic, pkt.payload):
        broker.counters.retained_refused += 1
        _refuse_server_topic(broker, client, pkt, ReasonCode.QUOTA_EXCEEDED)
        return
    acl = broker.acl
    if acl is not None:
        rights = session.rights
        if rights is None or rights.acl is not acl:
            rights = acl.rights_of(session)
        if not rights.may_publish(pkt.topic):
            _refuse_server_topic(broker, client, pkt)  # (the same answer: not authorized)
            return
    mark = broker.store_mark()
    if qos == 2:
        broker.counters.messages_in_qos2 += 1
        pid = pkt.packet_id
        inflight_in = session.inflight_in
        if pid in inflight_in:
            # a re-sent PUBLISH: delivered once already (after the first PUBREC)
            client.ack_after(None, client.write_pubrec, pid, 0)
            return
        # (a 3.1.1 client is never told a Receive Maximum: it may use every packet id)
        if len(inflight_in) >= (config.receive_maximum if client.v5 else 65535):
            raise ProtocolViolation("more QoS 2 messages unacknowledged than Receive Maximum",
                                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        inflight_in.add(pid)
        if session.journal is not None:
            session.journal.incoming(session, pid, True)
        n = broker.publish(Message.from_publish(pkt, session.client_id))
        _acknowledge(broker, client, client.write_pubrec, pid, n, mark)
        return
    n = broker.publish(Message.from_publish(pkt, session.client_id))
    if qos == 1:
        broker.counters.messages_in_qos1 += 1
        _acknowledge(broker, client, client.write_puback, pkt.packet_id, n, mark)


def _retained_full(broker, config, topic: str, payload) -> bool:
    """Would a new retained message pass max_retained / max_retained_bytes? (Replacing
    one is judged by the bytes it adds.)"""
    retained = broker.retained
    old = retained.get(topic)
    if old is None and config.max_retained and len(retained) >= config.max_retained:
        return True
    if config.max_retained_bytes:
        grow = len(payload) + (len(topic) if old is None else -len(old.payload))
        return grow > 0 and retained.bytes + grow > config.max_retained_bytes
    return False


def _refuse_server_topic(broker, client, pkt, reason: int = ReasonCode.NOT_AUTHORIZED) -> None:
    """A PUBLISH that is not routed: topics that begin with ``$`` are the server's
    (``$SYS/``; MQTT 4.7.2: the server should prevent clients from exchanging messages
    through them), and topics the ACL does not let the client write. MQTT 5 answers QoS 1/2
    with 0x87 not authorized (a PUBREC of 0x87 ends the QoS 2 flow); 3.1.1 has no such code:
    acknowledged and dropped, as Mosquitto does. Topics beyond ``max_topic_levels`` /
    ``max_topic_length`` the same way, with 0x90 topic name invalid."""
    broker.counters.publishes_refused += 1
    if not pkt.qos:
        return
    reason = reason if client.version == MQTT_5 else 0
    write = client.write_puback if pkt.qos == 1 else client.write_pubrec
    if pkt.qos == 2 and not reason:
        # (3.1.1: the flow goes on, PUBREL answered PUBCOMP; the id is kept meanwhile)
        session = client.session
        session.inflight_in.add(pkt.packet_id)
        if session.journal is not None:
            session.journal.incoming(session, pkt.packet_id, True)
    client.ack_after(None, write, pkt.packet_id, reason)


def _acknowledge(broker, client, write_ack, pid: int, reached: int, mark: int) -> None:
    """PUBACK / PUBREC once what the message changed on disk is durable: the queues of
    the persistent sessions it reached (on this node, and on the nodes it was forwarded
    to), a retained change, the QoS 2 packet id."""
    reason = 0x10 if reached == 0 and client.version == MQTT_5 else 0
    journal = broker.journal
    remote = broker.cluster.take_forward_waits() if broker.clustered else ()
    if client.acks is None and not remote and (journal is None or journal.writes == mark):
        write_ack(pid, reason)  # nothing to wait for, nothing queued before it: at once
        return
    wait = broker.commit_wait(mark)
    if remote:
        wait = broker.all_done(wait, *remote)
    client.ack_after(wait, write_ack, pid, reason)


def on_puback(broker, client, pkt) -> None:
    if not client.session.on_puback(pkt.packet_id):
        log.debug("PUBACK for unknown packet id client_id=%s pid=%d", client.client_id,
                  pkt.packet_id)


def on_pubrec(broker, client, pkt) -> None:
    mark = broker.store_mark()
    result = client.session.on_pubrec(pkt.packet_id, pkt.reason_code)
    if result:
        # PUBREL once the new stage is durable: after a crash before it the PUBLISH would
        # be sent again to a client that got PUBREL and delivered it (a QoS 2 duplicate)
        client.ack_after(broker.commit_wait(mark), client.write_pubrel, pkt.packet_id, 0)
    elif result is False:
        client.ack_after(None, client.write_pubrel, pkt.packet_id,
                         ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if client.version == MQTT_5
                         else 0)


def on_pubrel(broker, client, pkt) -> None:
    inflight_in = client.session.inflight_in
    pid = pkt.packet_id
    if pid in inflight_in:
        inflight_in.discard(pid)
        session = client.session
        wait = None
        if session.journal is not None:
            # PUBCOMP waits for the id's removal: one kept by a crash would make the
            # client's next QoS 2 message with this id look like a re-send, and lose it
            session.journal.incoming(session, pid, False)
            wait = session.journal.commit_wait()
        client.ack_after(wait, client.write_pubcomp, pid, 0)
    else:
        client.ack_after(None, client.write_pubcomp, pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
                         if client.version == MQTT_5 else 0)


def on_pubcomp(broker, client, pkt) -> None:
    if not client.session.on_pubcomp(pkt.packet_id):
        log.debug("PUBCOMP for unknown packet id client_id=%s pid=%d", client.client_id,
                  pkt.packet_id)
