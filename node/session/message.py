"""An application message as the broker holds it: frozen after creation and shared by
every session it is delivered to (like Mosquitto's ref-counted msg store)."""

from __future__ import annotations

import time

from ..mqtt.codes import PropertyId

_MEI = PropertyId.MESSAGE_EXPIRY_INTERVAL
_SUB_ID = PropertyId.SUBSCRIPTION_IDENTIFIER
_WILL_DELAY = PropertyId.WILL_DELAY_INTERVAL


class Message:
    __slots__ = ("topic", "payload", "qos", "retain", "properties", "expires_at", "origin",
                 "parts", "via", "store_ref", "size")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: dict | None, expires_at: float | None, origin: str) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        # v5 properties forwarded to subscribers, without Message Expiry Interval (it is
        # recomputed from ``expires_at`` at delivery) and without Topic Alias.
        self.properties = properties
        self.expires_at = expires_at  # wall clock (time.time()), None = never
        self.origin = origin  # ClientID of the publisher ("" for system messages)
        self.parts: dict | None = None  # encoding cache owned by the delivering side
        self.via: str | None = None  # the node that forwarded it here; None = published here
        self.store_ref = None  # node.store.MessageRef once a persistent session stored it
        self.size = len(payload) + len(topic)  # what it weighs in a queue (max_queue_bytes)

    @classmethod
    def from_publish(cls, pkt, origin: str, now: float | None = None) -> "Message":
        props = pkt.properties
        expires_at = None
        if props:
            mei = props.get(_MEI)
            if mei is not None:
                props = dict(props)
                del props[_MEI]
                expires_at = (now if now is not None else time.time()) + mei
        return cls(pkt.topic, pkt.payload, pkt.qos, pkt.retain, props or None, expires_at, origin)

    @classmethod
    def from_will(cls, will, origin: str) -> "Message":
        """The PUBLISH a Will becomes; Will Delay Interval is for the broker only."""
        props = will.properties
        if props and _WILL_DELAY in props:
            props = {k: v for k, v in props.items() if k != _WILL_DELAY}
        expires_at = None
        if props and _MEI in props:
            props = dict(props)
            expires_at = time.time() + props.pop(_MEI)
        return cls(will.topic, will.payload, will.qos, will.retain, props or None, expires_at,
                   origin)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def delivery_properties(self, sub_ids, now: float) -> dict | None:
        """Properties of one v5 delivery: the forwarded ones, the subscription identifiers
        of the matching subscriptions, the remaining expiry interval."""
        if not sub_ids and self.expires_at is None:
            return self.properties
        props = dict(self.properties) if self.properties else {}
        if sub_ids:
            props[_SUB_ID] = list(sub_ids)
        if self.expires_at is not None:
            props[_MEI] = max(0, int(self.expires_at - now + 0.999))
        return props

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)}B, qos={self.qos})"
