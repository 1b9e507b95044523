"""``GET /metrics``: the node's numbers in the Prometheus text exposition format (0.0.4).

Written by hand (no ``prometheus_client`` at run time): an :class:`Exposition` collects
families (``HELP``, ``TYPE``, samples) and renders them; every sample carries the label
``node="<node id>"``. :func:`broker_metrics` fills one from the broker at scrape time
(nothing here is on a message's path); the cluster adds its families through the admin
extension (``node.admin.ClusterAdmin.metrics``). :class:`Histogram` is a cumulative
bucket counter for latencies observed as they happen (takeovers).
"""

from __future__ import annotations

import bisect
import math
import time

__all__ = ["CONTENT_TYPE", "Exposition", "Histogram", "broker_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: per-session queue lengths, as a histogram computed at scrape time
QUEUE_BUCKETS = (0, 1, 10, 100, 1000, 10000)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Histogram:
    """Cumulative histogram: ``observe(v)`` counts v in the first bucket whose upper
    bound is >= v (and in +Inf); ``sum`` and ``count`` as Prometheus wants them."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            acc += n
            out.append((bound, acc))
        return out


class Exposition:
    """Families in the order they were first named; samples added to a family by name
    (the cluster adds samples to a family the node started, e.g. drops by reason)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._families: dict[str, tuple[str, str, list]] = {}

    def _family(self, name: str, kind: str, help_text: str) -> list:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = (kind, help_text, [])
        elif fam[0] != kind:
            raise ValueError(f"metric {name} declared as {fam[0]} and {kind}")
        return fam[2]

    def _labels(self, labels: dict | None) -> str:
        items = [("node", self.node_id)] + sorted((labels or {}).items())
        return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in items) + "}"

    def gauge(self, name: str, help_text: str, value: float, **labels) -> None:
        self._family(name, "gauge", help_text).append((name, labels, value))

    def counter(self, name: str, help_text: str, value: float, **labels) -> None:
        """``name`` must end in ``_total`` (the sample name of a counter)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._family(name, "counter", help_text).append((name, labels, value))

    def histogram(self, name: str, help_text: str, buckets: list[tuple[float, int]],
                  total: float, count: int, **labels) -> None:
        """``buckets``: cumulative (upper bound, count), the last bound +Inf."""
        samples = self._family(name, "histogram", help_text)
        for bound, n in buckets:
            samples.append((name + "_bucket", dict(labels, le=_num(float(bound))), n))
        samples.append((name + "_sum", labels, total))
        samples.append((name + "_count", labels, count))

    def histogram_of(self, name: str, help_text: str, hist: Histogram, **labels) -> None:
        self.histogram(name, help_text, hist.cumulative(), hist.sum, hist.count, **labels)

    def render(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            for sample, labels, value in samples:
                lines.append(f"{sample}{self._labels(labels)} {_num(value)}")
        return "\n".join(lines) + "\n"


def broker_metrics(expo: Exposition, broker, ready: bool) -> None:
    """The node's own families: connections, sessions, messages in/out by QoS, drops,
    queues, retained, store."""
    stats = broker.stats()  # one pass over the sessions for the sums
    c = broker.counters
    expo.gauge("shoal_ready", "1 when the node takes clients (GET /readyz is 200).", ready)
    expo.gauge("shoal_uptime_seconds", "Seconds since the node started.",
               round(max(0.0, time.time() - broker.started_at), 3))
    expo.gauge("shoal_connections", "Open MQTT connections (CONNECTed or not yet).",
               stats["connections"])
    expo.gauge("shoal_sessions", "Sessions held by this node.", stats["sessions"])
    expo.gauge("shoal_sessions_connected", "Sessions with a connection attached.",
               stats["sessions_connected"])
    expo.gauge("shoal_subscriptions", "Subscriptions of the sessions on this node.",
               stats["subscriptions"])
    expo.gauge("shoal_retained_messages", "Retained messages stored.", stats["retained"])
    name = "shoal_messages_received_total"
    help_text = "PUBLISH packets received from clients, by QoS."
    q1, q2 = c.messages_in_qos1, c.messages_in_qos2
    for qos, value in ((0, c.messages_in - q1 - q2), (1, q1), (2, q2)):
        expo.counter(name, help_text, value, qos=str(qos))
    name = "shoal_messages_sent_total"
    help_text = "PUBLISH packets sent to clients (first sends, not re-sends), by QoS."
    q1, q2 = c.messages_out_qos1, c.messages_out_qos2
    for qos, value in ((0, c.messages_out - q1 - q2), (1, q1), (2, q2)):
        expo.counter(name, help_text, value, qos=str(qos))
    name = "shoal_messages_dropped_total"
    help_text = ("Messages not delivered: queue_full (the drop policy), expired (Message "
                 "Expiry), qos0_offline (QoS 0 for an offline session).")
    expo.counter(name, help_text, c.dropped_messages, reason="queue_full")
    expo.counter(name, help_text, c.expired_messages, reason="expired")
    expo.counter(name, help_text, c.qos0_offline_discarded, reason="qos0_offline")
    expo.counter("shoal_connects_refused_total", "CONNECTs refused by authentication "
                 "(bad or unknown credentials, anonymous where not allowed, checks busy).",
                 broker.auth.refused)
    expo.counter("shoal_flapping_refused_total", "CONNECTs refused because their ClientID "
                 "connects too often (flapping_connects).", broker.flapping.refused)
    expo.counter("shoal_retained_refused_total", "Retained PUBLISHes not accepted past "
                 "max_retained / max_retained_bytes.", c.retained_refused)
    expo.counter("shoal_output_overflows_total", "Connections closed because the client "
                 "did not read past max_output_buffer.", c.output_overflows)
    for reason, count in broker.admission.refused.items():
        expo.counter("shoal_connections_refused_total", "Connections closed at once by "
                     "max_connections, max_connections_per_address or max_connection_rate.",
                     count, reason=reason)
    expo.counter("shoal_publishes_refused_total", "Client PUBLISHes to server topics ($...) "
                 "or denied by acl_file, not routed.", c.publishes_refused)
    expo.counter("shoal_subscriptions_refused_total", "Subscriptions denied by acl_file "
                 "(SUBACK 0x87 / 0x80).", c.subscriptions_refused)
    expo.counter("shoal_deliveries_refused_total", "Messages not delivered to a subscriber "
                 "because an acl_file deny rule covers their topic.", c.deliveries_refused)
    expo.gauge("shoal_queued_messages", "Messages waiting in session queues.",
               stats["queued_messages"])
    expo.gauge("shoal_inflight_messages", "Outgoing QoS 1/2 messages awaiting acknowledgement.",
               stats["inflight_messages"])
    hist = Histogram(QUEUE_BUCKETS)
    for session in broker.sessions.values():
        hist.observe(len(session.queue))
    expo.histogram_of("shoal_session_queue_length",
                      "Queue length per session, at scrape time.", hist)
    store = stats.get("store")
    if store is not None:
        help_text = ("Size of the durable store: on_disk (its files), live (what a "
                     "snapshot of the live state takes).")
        expo.gauge("shoal_store_bytes", help_text, store["bytes_on_disk"], kind="on_disk")
        expo.gauge("shoal_store_bytes", help_text, store["live_bytes"], kind="live")
        expo.gauge("shoal_store_records", "Live records in the store.", store["records"])
        expo.counter("shoal_store_fsyncs_total", "Log batches written and fdatasync'ed.",
                     store["fsyncs"])
        expo.counter("shoal_store_compactions_total", "Store compactions.",
                     store["compactions"])
