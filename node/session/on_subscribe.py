"""SUBSCRIBE and UNSUBSCRIBE."""

from __future__ import annotations

from ..mqtt.codes import MQTT_5, PropertyId, ReasonCode
from ..mqtt.errors import ProtocolViolation
from ..mqtt.packets import Suback, Unsuback
from ..mqtt.topic_rules import parse_shared, valid_topic_filter
from ..persist import STORE_COMMIT_TIMEOUT
from ..topics import SubEntry
from .on_connect import topic_too_big


def on_subscribe(broker, client, pkt) -> None:
    session = client.session
    v5 = client.version == MQTT_5
    max_qos = broker.config.max_qos
    sub_id = None
    if v5:
        ids = pkt.properties.get(PropertyId.SUBSCRIPTION_IDENTIFIER)
        if ids:
            sub_id = ids[0]
    codes = []
    retained = []
    mark = broker.store_mark()
    acl = broker.auth.acl
    rights = acl.rights_of(session) if acl is not None else None
    max_subs = broker.config.max_subscriptions
    for s in pkt.subscriptions:
        if not valid_topic_filter(s.topic_filter):
            codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else ReasonCode.UNSPECIFIED_ERROR)
            continue
        group, levels = parse_shared(s.topic_filter)
        if topic_too_big(broker.config, levels):
            codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else ReasonCode.UNSPECIFIED_ERROR)
            continue
        if max_subs and len(session.subscriptions) >= max_subs and \
                s.topic_filter not in session.subscriptions:
            codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else ReasonCode.UNSPECIFIED_ERROR)
            continue
        if rights is not None and not rights.may_subscribe(levels):
            # (0x87 not authorized in MQTT 5; 3.1.1 knows only 0x80 failure)
            broker.counters.subscriptions_refused += 1
            codes.append(ReasonCode.NOT_AUTHORIZED if v5 else ReasonCode.UNSPECIFIED_ERROR)
            continue
        if group is not None and s.no_local:
            raise ProtocolViolation("No Local on a shared subscription")  # [MQTT-3.8.3-4]
        qos = s.qos if s.qos < max_qos else max_qos
        entry = SubEntry(session.client_id, s.topic_filter, qos, s.no_local,
                         s.retain_as_published, s.retain_handling, sub_id, group)
        new = broker.subscribe(session, entry, levels)
        codes.append(qos)
        # retained messages: never for shared subscriptions; Retain Handling 0 always,
        # 1 only for a new subscription, 2 never [MQTT-3.3.1-9..11]
        if group is None and (s.retain_handling == 0 or (s.retain_handling == 1 and new)):
            retained.append((entry, levels))
    def answer() -> None:
        client.send(Suback(pkt.packet_id, tuple(codes)))
        for entry, levels in retained:
            broker.send_retained(session, entry, levels)

    broker.persist(session)
    waits = broker.take_route_waits()
    commit = broker.commit_wait(mark)
    if waits or commit is not None:
        # In a cluster, SUBACK waits until the other nodes know the new route: a message
        # published anywhere after the SUBACK then reaches this subscription. A stored
        # session's SUBACK waits for the subscription to be on disk.
        client.defer_until(waits, max(broker.config.takeover_timeout, STORE_COMMIT_TIMEOUT),
                           answer, what="the new routes" if waits else "the store commit",
                           required=[commit] if commit is not None else [])
    else:
        answer()


def on_unsubscribe(broker, client, pkt) -> None:
    session = client.session
    mark = broker.store_mark()
    codes = tuple(ReasonCode.SUCCESS if broker.unsubscribe(session, f)
                  else ReasonCode.NO_SUBSCRIPTION_EXISTED for f in pkt.topic_filters)
    broker.persist(session)
    unsuback = Unsuback(pkt.packet_id, codes)
    client.ack_after(broker.commit_wait(mark), lambda _pid, _reason: client.send(unsuback),
                     pkt.packet_id, 0)
