"""Listeners and the per-connection protocol object; ``run_node`` is ``shoal run``.

``MqttProtocol`` (an ``asyncio.Protocol`` with ``__slots__``, uvicorn's shape) feeds the
sans-IO ``MqttConnection`` one read at a time, hands each packet to the handler of the
dispatch table, and writes what they produce once per event-loop iteration
(``write`` buffers, a ``call_soon`` flush joins the buffer into one ``transport.write``).
An idle connection is an object, not a task. When the transport's buffer passes its
high-water mark, ``writable`` turns False and the session queues (bounded) instead of
writing; ``resume_writing`` pumps the queue again. No publisher ever awaits a subscriber.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import signal
import time

from .admin import load_admin_token, make_admin_app, start_admin
from .broker import Broker
from .config import ConfigError, is_loopback, parse_networks
from .mqtt.codec import publish_parts
from .mqtt.codes import MQTT_5, ReasonCode
from .mqtt.connection import NEED_DATA, MqttConnection
from .mqtt.errors import RemoteMqttError
from .mqtt.packets import Connack, Disconnect
from .session.dispatch import AUTHENTICATING, HANDLERS
from .ownership import ConnectRefused
from .persist import STORE_COMMIT_TIMEOUT
from .proxy_protocol import NEED_DATA as PROXY_NEED_DATA
from .proxy_protocol import ProxyHeaderReader, ProxyProtocolError, looks_like_header
from .session.on_connect import finish_connect, open_connect_session
from .session.session import SessionState
from .store import SessionStore, StoreError
from .tls import server_ssl_context
from .websocket import WsListeners

log = logging.getLogger("shoal.server")

FLUSH_BYTES = 65536  # write at once when this much output is pending (else once per iteration)
# A read this large means the socket has more: take a turn, read the rest next iteration.
# libuv reads a socket until it is empty, so one fast publisher could otherwise hold the
# loop (and every other connection, timer and cluster link) for a long time.
FAIR_READ_BYTES = 65536

_PINGRESP = b"\xd0\x00"


def _ack(first_byte: int):
    prefix = bytes((first_byte, 2))

    def frame(pid: int, reason: int, v5: bool) -> bytes:
        if reason and v5:
            return bytes((first_byte, 3)) + pid.to_bytes(2, "big") + bytes((reason,))
        return prefix + pid.to_bytes(2, "big")
    return frame


_puback = _ack(0x40)
_pubrec = _ack(0x50)
_pubrel = _ack(0x62)
_pubcomp = _ack(0x70)


class MqttProtocol(asyncio.Protocol):
    """One client connection. The ``client`` interface the broker and handlers use:
    ``write``, ``send``, ``writable``, ``publish_frame``, ``write_puback``
    and friends, ``accept``, ``kick``, ``close_by_client``."""

    __slots__ = ("broker", "loop", "transport", "conn", "session", "client_id", "version",
                 "v5", "writable", "out", "out_bytes", "flush_pending", "keep_alive_timeout", "last_rx",
                 "timer", "closing", "finished", "peer", "waiting", "acks", "acks_timer",
                 "handlers", "auth_flow", "address")

    def __init__(self, broker: Broker) -> None:
        config = broker.config
        self.broker = broker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn = MqttConnection(max_packet_size=config.max_packet_size,
                                   topic_alias_maximum=config.topic_alias_maximum)
        self.session = None
        self.client_id = ""
        self.version = 4
        self.v5 = False
        self.writable = True  # False while the transport is paused (its buffer is full)
        self.out: list[bytes] = []  # written at the next flush, once per loop iteration
        self.out_bytes = 0
        self.flush_pending = False
        self.keep_alive_timeout = 0.0
        self.last_rx = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.finished = False
        self.peer = ""
        # reading paused while the cluster decides (a CONNECT's claim, a SUBSCRIBE's route)
        self.waiting = False
        # acknowledgements waiting for the store, in the order of their packets
        self.acks: collections.deque | None = None
        self.acks_timer: asyncio.TimerHandle | None = None
        # packet class -> handler: the dispatch table, another one during an MQTT 5
        # enhanced authentication (node/session/on_connect.py), whose state is auth_flow
        self.handlers = HANDLERS
        self.auth_flow = None
        self.address: str | None = None  # counted in broker.admission per address until closed

    # -- asyncio.Protocol ------------------------------------------------------------------

    #: the per-address limits apply at connection_made (False: once the PROXY header
    #: named the real address)
    COUNTS_ADDRESS = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        broker = self.broker
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        why = broker.admission.admit_total(len(broker.clients))
        if why is None and self.COUNTS_ADDRESS:
            why = self._admit(str(peer[0]) if peer else "?")
        if why is not None:
            self._turn_away(why)
            return
        transport.set_write_buffer_limits(high=broker.config.write_buffer_high)
        broker.clients.add(self)
        self.timer = self.loop.call_later(broker.config.connect_timeout,
                                          self._connect_timeout)

    def _admit(self, address: str) -> str | None:
        why = self.broker.admission.admit_address(address, self.loop.time())
        if why is None:
            self.address = address
        return why

    def _turn_away(self, why: str) -> None:
        """Refuse the connection before any MQTT (node/limits.py)."""
        skipped = self.broker.admission.log_due(self.loop.time())
        if skipped is not None:
            log.warning("connection refused peer=%s node=%s: %s%s", self.peer,
                        self.broker.node_id, why,
                        f" ({skipped} more refused since the last such line)" if skipped else "")
        if self in self.broker.clients:
            self._close(None, send_will=False)
            return
        self.closing = self.finished = True  # (never counted as a client)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_rx = self.loop.time()
        self.conn.receive_data(data)
        if not self.waiting:
            self._process()
            if len(data) >= FAIR_READ_BYTES and not self.closing and not self.waiting:
                self.transport.pause_reading()
                self.loop.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        if not self.closing and not self.waiting and self.transport is not None:
            self.transport.resume_reading()

    def _process(self) -> None:
        """Handle every complete packet in the receive buffer."""
        conn = self.conn
        broker = self.broker
        try:
            while True:
                pkt = conn.next_packet()
                if pkt is NEED_DATA:
                    return
                # (the table is read per packet: a CONNECT may switch it, enhanced_auth)
                self.handlers[pkt.__class__](broker, self, pkt)
                if self.closing or self.waiting:
                    return
        except RemoteMqttError as err:
            self._protocol_error(err)
        except ConnectRefused as err:
            self._refuse(err)
        except Exception:
            # A bug of ours: it ends this connection only, never the node.
            log.exception("internal error client_id=%s peer=%s node=%s", self.client_id,
                          self.peer, broker.node_id)
            self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)

    def defer_connect(self, plan, claim_awaitable) -> None:
        """The ClientID claim needs the cluster: stop reading until it is decided."""
        self.waiting = True
        self.transport.pause_reading()
        self.loop.create_task(self._finish_deferred_connect(plan, claim_awaitable))

    def defer_until(self, waits: list, timeout: float, then, what: str = "a route",
                    required: list = ()) -> None:
        """Stop reading until ``waits`` and ``required`` are done (or ``timeout``), then
        call ``then`` and go on with what the client sent meanwhile (packets stay in
        order). When a ``required`` wait (a store commit) fails or times out, ``then``
        must not run (an acknowledgement that would promise what is not on disk): the
        connection is closed instead; the others are retried in the background."""
        self.waiting = True
        self.transport.pause_reading()
        self.loop.create_task(self._after(list(waits), list(required), timeout, then, what))

    async def _after(self, waits: list, required: list, timeout: float, then,
                     what: str) -> None:
        done, pending = await asyncio.wait(waits + required, timeout=timeout)
        failed = {w for w in done if not w.cancelled() and w.exception() is not None}
        self.waiting = False
        if pending or failed:
            must = [w for w in required if w in pending or w in failed]
            log.warning("waited for %s in vain client_id=%s node=%s%s", what, self.client_id,
                        self.broker.node_id, ": closing the connection unacknowledged"
                        if must else " (it is retried in the background)")
            if must and not self.closing:
                self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)
                return
        if self.closing:
            return
        try:
            then()
            if self.closing or self.waiting:
                return  # (``then`` refused, or waits for something else now)
            self.transport.resume_reading()
            self._process()
        except ConnectRefused as err:
            self._refuse(err)
        except Exception:
            log.exception("internal error client_id=%s peer=%s node=%s", self.client_id,
                          self.peer, self.broker.node_id)
            self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)

    def ack_after(self, wait, write, pid: int, reason: int) -> None:
        """``write(pid, reason)`` once ``wait`` (a store commit future, or None) is done
        and every acknowledgement queued before it went out: acknowledgements keep the
        order of their packets [MQTT-4.6.0-2..4] while reading goes on (many PUBLISHes
        share one fsync). A failed or stalled commit closes the connection instead."""
        acks = self.acks
        if acks is None:
            if wait is None:
                write(pid, reason)
                return
            acks = self.acks = collections.deque()
            self.acks_timer = self.loop.call_later(STORE_COMMIT_TIMEOUT, self._acks_stalled)
        if wait is not None and (not acks or acks[-1][0] is not wait):
            wait.add_done_callback(self._acks_ready)  # once per future (shared by a batch)
        acks.append((wait, write, pid, reason, self.loop.time()))

    def write_after(self, wait, frame: bytes) -> None:
        """Write ``frame`` once ``wait`` (a store commit future, or None) is done, in
        order with the acknowledgements queued before it (``ack_after``)."""
        self.ack_after(wait, self._write_queued, 0, frame)

    def _write_queued(self, _pid: int, frame: bytes) -> None:
        self.write(frame)

    def _acks_ready(self, _fut=None) -> None:
        acks = self.acks
        if acks is None or self.closing:
            return
        while acks:
            wait, write, pid, reason, _ = acks[0]
            if wait is not None:
                if not wait.done():
                    return
                if wait.cancelled() or wait.exception() is not None:
                    log.error("store commit failed client_id=%s node=%s: %r; closing the "
                              "connection unacknowledged", self.client_id,
                              self.broker.node_id, None if wait.cancelled() else wait.exception())
                    self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)
                    return
            acks.popleft()
            write(pid, reason)
        self.acks = None
        if self.acks_timer is not None:
            self.acks_timer.cancel()
            self.acks_timer = None

    def _acks_stalled(self) -> None:
        self.acks_timer = None
        acks = self.acks
        if acks is None or self.closing:
            return
        waited = self.loop.time() - acks[0][4]
        if waited < STORE_COMMIT_TIMEOUT:
            self.acks_timer = self.loop.call_later(STORE_COMMIT_TIMEOUT - waited,
                                                   self._acks_stalled)
            return
        log.warning("waited %.1fs for the store commit in vain client_id=%s node=%s: closing "
                    "the connection unacknowledged", waited, self.client_id,
                    self.broker.node_id)
        self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)

    async def _finish_deferred_connect(self, plan, claim_awaitable) -> None:
        broker = self.broker
        try:
            claim = await claim_awaitable
        except ConnectRefused as err:
            self.waiting = False
            if not self.closing:
                self._refuse(err)
            return
        except Exception:
            log.exception("claim failed client_id=%s node=%s", plan.client_id, broker.node_id)
            self.waiting = False
            if not self.closing:
                self._refuse(ConnectRefused(ReasonCode.SERVER_UNAVAILABLE, "claim failed"))
            return
        try:
            opened = open_connect_session(broker, plan, claim)
            if claim.confirm is not None and not await self._confirm(claim, opened[0]):
                return
        except Exception:
            self.waiting = False
            log.exception("internal error client_id=%s peer=%s node=%s", plan.client_id,
                          self.peer, broker.node_id)
            if not self.closing:
                self._refuse(ConnectRefused(ReasonCode.SERVER_UNAVAILABLE, "claim failed"))
            return
        self.waiting = False
        if self.closing:
            # The client left while its claim was decided: the claim is ours all the same,
            # so the session is opened and at once treated as disconnected.
            broker.orphaned(opened[0])  # stored (or not) by its disconnection
            return
        try:
            finish_connect(broker, self, plan, claim, opened)
            self.transport.resume_reading()
            self._process()  # packets the client sent right after CONNECT
        except Exception:
            log.exception("internal error client_id=%s peer=%s node=%s", plan.client_id,
                          self.peer, broker.node_id)
            self._close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, send_will=True)

    async def _confirm(self, claim, session) -> bool:
        """A hand-over's CONNACK waits for ``claim.confirm``; False when the connection
        is refused instead (and the session dropped, or kept for a move that may still
        commit)."""
        broker = self.broker
        verdict = await broker.confirm_claim(claim, session)
        if verdict and session.state is SessionState.ENDED:
            # (the cluster dropped it while the move committed: it is not here)
            log.warning("session ended while its hand-over was confirmed client_id=%s "
                        "node=%s", session.client_id, broker.node_id)
            verdict = False
        if verdict:
            return True
        self.waiting = False
        session.will = None  # this connection never started: no will of its own
        if verdict is False:
            refused = ConnectRefused(ReasonCode.SERVER_BUSY,
                                     "a newer connection of this ClientID took over")
        else:
            broker.orphaned(session)
            refused = ConnectRefused(ReasonCode.SERVER_UNAVAILABLE,
                                     "session hand-over not confirmed by the cluster in time")
        if not self.closing:
            self._refuse(refused)
        return False

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._finish(send_will=True)
        self.transport = None
        self.out.clear()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        session = self.session
        if session is not None and not self.closing:
            session.pump()

    # -- output ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes >= FLUSH_BYTES:
            # One loop iteration can read megabytes from publishers (libuv reads a socket
            # until it is empty): hand full batches to the transport right away, so that
            # its buffer limit (pause_writing) bounds what a slow subscriber holds.
            self._flush()
        elif not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        out = self.out
        if not out or self.transport is None:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self.out_bytes = 0
        if not self.writable and self.transport.get_write_buffer_size() > \
                self.broker.config.max_output_buffer:
            self._output_overflow()

    def _output_overflow(self) -> None:
        """The client does not read what it asks for (acknowledgements, PINGRESPs: what
        flow control cannot hold back): past max_output_buffer the connection goes."""
        if self.closing:
            return
        self.broker.counters.output_overflows += 1
        log.warning("client does not read: %d bytes waiting, over max_output_buffer; "
                    "closing client_id=%s peer=%s node=%s",
                    self.transport.get_write_buffer_size(), self.client_id, self.peer,
                    self.broker.node_id)
        self._close(None, send_will=True)
        if self.transport is not None:
            self.transport.abort()  # (what is buffered would never be read)

    def send(self, packet) -> None:
        self.write(self.conn.send(packet))

    def write_puback(self, pid: int, reason: int) -> None:
        self.write(_puback(pid, reason, self.v5))

    def write_pubrec(self, pid: int, reason: int) -> None:
        self.write(_pubrec(pid, reason, self.v5))

    def write_pubrel(self, pid: int, reason: int = 0) -> None:
        self.write(_pubrel(pid, reason, self.v5))

    def write_pubcomp(self, pid: int, reason: int) -> None:
        self.write(_pubcomp(pid, reason, self.v5))

    def write_pingresp(self) -> None:
        self.write(_PINGRESP)

    def publish_frame(self, msg, qos: int, retain: bool, dup: bool, pid: int, sub_ids,
                      now: float | None) -> bytes | None:
        """The PUBLISH frame of one delivery, or None when it is larger than the client's
        Maximum Packet Size (then it is discarded [MQTT-3.1.2-25])."""
        v5 = self.v5
        conn = self.conn
        if v5 and (sub_ids or msg.expires_at is not None):
            props = msg.delivery_properties(sub_ids, now if now is not None else time.time())
            cacheable = False
        else:
            props = msg.properties if v5 else None
            cacheable = True
        if v5 and conn.peer_topic_alias_maximum:
            frame = conn.encode_publish(msg.topic, msg.payload, qos, retain, dup, pid, props)
        else:
            if cacheable:
                # the same message to many subscribers: encode once per flag combination
                key = (v5 << 4) | (qos << 2) | (retain << 1) | dup
                parts = msg.parts
                if parts is None:
                    parts = msg.parts = {}
                head_tail = parts.get(key)
                if head_tail is None:
                    head_tail = parts[key] = publish_parts(self.version, msg.topic, msg.payload,
                                                           qos, retain, dup, props)
            else:
                head_tail = publish_parts(self.version, msg.topic, msg.payload, qos, retain,
                                          dup, props)
            head, tail = head_tail
            frame = head + pid.to_bytes(2, "big") + tail if qos else head + tail
        if len(frame) > conn.peer_max_packet_size:
            return None
        return frame

    # -- connection life -------------------------------------------------------------------

    def accept(self, client_id: str, keep_alive: int) -> None:
        """The CONNECT is accepted: protocol version, ClientID, keep-alive (which replaces
        the CONNECT timeout)."""
        self.client_id = client_id
        self.version = self.conn.version
        self.v5 = self.version == MQTT_5
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if keep_alive:
            self.keep_alive_timeout = keep_alive * 1.5  # [MQTT-3.1.2-24]
            self.timer = self.loop.call_later(self.keep_alive_timeout, self._check_keep_alive)

    def _check_keep_alive(self) -> None:
        self.timer = None
        if self.closing:
            return
        idle = self.loop.time() - self.last_rx
        if idle >= self.keep_alive_timeout:
            log.info("keep-alive timeout client_id=%s peer=%s node=%s", self.client_id,
                     self.peer, self.broker.node_id)
            self._close(ReasonCode.KEEP_ALIVE_TIMEOUT, send_will=True)
        else:
            self.timer = self.loop.call_later(self.keep_alive_timeout - idle,
                                              self._check_keep_alive)

    def _connect_timeout(self) -> None:
        self.timer = None
        if self.session is None and not self.closing:
            log.info("no CONNECT in time peer=%s node=%s", self.peer, self.broker.node_id)
            self._close(None, send_will=False)

    def kick(self, reason: int) -> None:
        """Server-initiated end of a connection whose session was already dealt with
        (takeover, shutdown): v5 DISCONNECT with ``reason``, then close."""
        self.session = None
        self._close(reason, send_will=False)

    def enhanced_auth(self, flow) -> None:
        """An MQTT 5 enhanced authentication starts (``flow``: its state) or ends (None):
        until it ends only AUTH and DISCONNECT are read."""
        self.auth_flow = flow
        self.handlers = HANDLERS if flow is None else AUTHENTICATING

    def close_by_client(self, send_will: bool) -> None:
        """The client sent DISCONNECT."""
        self._close(None, send_will)

    def _protocol_error(self, err: RemoteMqttError) -> None:
        if self.conn.version is None and looks_like_header(self.conn.unparsed(12)):
            # a load balancer sends PROXY headers (send-proxy / send-proxy-v2) here
            log.warning("PROXY protocol header on a listener without proxy_protocol peer=%s "
                        "node=%s: turn proxy_protocol on for this node, or send-proxy off in "
                        "the load balancer", self.peer, self.broker.node_id)
            self._close(None, send_will=False)
            return
        log.info("protocol error client_id=%s peer=%s node=%s reason=%s: %s", self.client_id,
                 self.peer, self.broker.node_id, err.reason.name, err.msg)
        reply = self.conn.error_reply(err)
        if reply:
            self.write(reply)
        self._close(None, send_will=True)

    def _refuse(self, err: ConnectRefused) -> None:
        log.info("connect refused peer=%s node=%s reason=%s: %s", self.peer,
                 self.broker.node_id, ReasonCode(err.reason).name, err)
        self.write(self.conn.send(Connack(False, err.reason)))
        self._close(None, send_will=False)

    def _close(self, reason: int | None, send_will: bool) -> None:
        if self.closing:
            return
        self.closing = True
        if reason is not None and self.v5:  # v5 is set once the CONNECT was accepted
            self.write(self.conn.send(Disconnect(reason)))
        self._finish(send_will)
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def _finish(self, send_will: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.acks_timer is not None:
            self.acks_timer.cancel()
            self.acks_timer = None
        self.acks = None  # never sent: the client re-sends what they acknowledge
        if self.address is not None:
            self.broker.admission.release(self.address)
            self.address = None
        self.broker.connection_lost(self, self.session, send_will)
        self.session = None


class ProxiedMqttProtocol(MqttProtocol):
    """A connection of a listener with ``proxy_protocol`` on: a load balancer in front
    opened it and first sends a PROXY protocol v1/v2 header naming the client. Until the
    header is complete, reads go to the sans-IO ``ProxyHeaderReader`` (the CONNECT timeout
    covers it); then ``peer`` becomes the client's real address (the balancer's stays in
    ``via``; a ``LOCAL`` or ``UNKNOWN`` header keeps the connection's own) and the rest goes
    to MQTT as in ``MqttProtocol``. After the header a read costs one attribute test more."""

    __slots__ = ("proxy", "via", "trusted")
    COUNTS_ADDRESS = False  # (the balancer's address: counted once the header is read)

    def __init__(self, broker: Broker, trusted: tuple = ()) -> None:
        super().__init__(broker)
        self.proxy: ProxyHeaderReader | None = ProxyHeaderReader()  # None once read
        self.via = ""
        self.trusted = trusted  # ip_networks allowed to connect; () = any

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.via = self.peer
        if self.trusted:
            peer = transport.get_extra_info("peername")
            try:
                addr = ipaddress.ip_address(peer[0]) if peer else None
            except ValueError:
                addr = None
            if addr is None or not any(addr in net for net in self.trusted):
                log.warning("connection from outside proxy_protocol_trusted peer=%s node=%s: "
                            "closed (only the load balancer may connect to this listener)",
                            self.peer, self.broker.node_id)
                self._close(None, send_will=False)

    def data_received(self, data: bytes) -> None:
        reader = self.proxy
        if reader is None:
            MqttProtocol.data_received(self, data)
            return
        if self.closing:
            return
        reader.receive_data(data)
        try:
            header = reader.next_header()
        except ProxyProtocolError as err:
            log.warning("no valid PROXY protocol header peer=%s node=%s: %s (proxy_protocol is "
                        "on: clients must come through the load balancer, with send-proxy-v2)",
                        self.peer, self.broker.node_id, err)
            self._close(None, send_will=False)
            return
        if header is PROXY_NEED_DATA:
            return
        self.proxy = None
        if header.source is not None:
            self.peer = f"{header.source[0]}:{header.source[1]}"
        why = self._admit(str(header.source[0]) if header.source is not None
                          else self.via.rsplit(":", 1)[0])
        if why is not None:
            self._turn_away(why)
            return
        log.debug("PROXY v%d %s peer=%s via=%s node=%s", header.version, header.command,
                  self.peer, self.via, self.broker.node_id)
        if reader.trailing_data:
            MqttProtocol.data_received(self, reader.trailing_data)

    def _connect_timeout(self) -> None:
        if self.proxy is not None and not self.closing:
            self.timer = None
            log.info("no PROXY protocol header in time peer=%s node=%s", self.peer,
                     self.broker.node_id)
            self._close(None, send_will=False)
            return
        super()._connect_timeout()


def mqtt_protocol_factory(broker: Broker, config):
    """What the MQTT TCP listener creates per connection (``proxy_protocol``: the
    PROXY header first)."""
    if not config.proxy_protocol:
        return lambda: MqttProtocol(broker)
    trusted = parse_networks(config.proxy_protocol_trusted)
    return lambda: ProxiedMqttProtocol(broker, trusted)


async def serve(config, stop: asyncio.Event, extensions=()) -> None:
    """Run one node until ``stop`` is set: MQTT listener, admin API, housekeeping.

    ``extensions`` are async context manager factories called with (broker, admin_app)
    before anything listens: the cluster plugs in this way (aiohttp's cleanup contexts),
    so that ``node`` never imports ``cluster``. They are exited in reverse order after
    the listeners closed."""
    loop = asyncio.get_running_loop()
    # tls_port / wss_port: None without them; a bad file is a ConfigError (exit 2) here,
    # before anything is opened or listens
    tls_context = server_ssl_context(config)
    broker = Broker(config)
    _reload_on_sighup(loop, broker)
    _log_access(config, broker.auth)
    admin_app = make_admin_app(broker, load_admin_token(config), config.admin_metrics_open,
                               is_loopback(config.admin_host)) if config.admin_port else None
    async with contextlib.AsyncExitStack() as stack:
        store, loaded, report = open_store(config)

        def store_failed(err: BaseException) -> None:
            # After a failed write or fsync nothing more can be acknowledged as stored and
            # the page cache cannot be trusted: stop, so that recovery runs at the next
            # start (a supervisor restarts the node), rather than serve without the disk.
            log.critical("store failed node=%s: %r; stopping the node (recovery runs at "
                         "the next start; check the disk under %s)", config.node_id, err,
                         store.data_dir)
            failures.append(err)
            stop.set()

        failures: list = []
        store.on_failure = store_failed
        stack.push_async_callback(store.close)
        broker.attach_store(store, loaded, report)
        for ext in extensions:
            # a start can wait long (a cluster node waits for its peers): SIGTERM still
            # stops it
            entering = asyncio.ensure_future(stack.enter_async_context(ext(broker, admin_app)))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({entering, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not entering.done():
                entering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await entering
                log.info("stopped while starting node=%s", config.node_id)
                return
            entering.result()  # its error, if it failed
        # the plaintext listener unless mqtt_port = 0 (a TLS-only node)
        servers: list = [await loop.create_server(
            mqtt_protocol_factory(broker, config), config.host, config.mqtt_port,
            backlog=2048, reuse_address=True)] if config.mqtt_port else []
        # the other listeners (node/tls.py, node/websocket.py): the same MqttProtocol
        tls_servers: list = []
        ws_listeners = WsListeners(config, lambda: MqttProtocol(broker), tls_context)
        broker.start()
        admin = None
        try:
            if config.tls_port:
                tls_servers.append(await loop.create_server(
                    lambda: MqttProtocol(broker), config.host, config.tls_port,
                    ssl=tls_context, ssl_handshake_timeout=config.connect_timeout,
                    backlog=2048, reuse_address=True))
            await ws_listeners.start()
            if config.tls_port or ws_listeners.addresses:
                log.info("listening node=%s tls=%s websocket=%s", config.node_id,
                         f"{config.host}:{config.tls_port}" if config.tls_port else "off",
                         ",".join(ws_listeners.addresses) or "off")
            if admin_app is not None:
                admin = await start_admin(admin_app, config.admin_host, config.admin_port)
            mqtt_addr = ",".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}"
                                 for server in servers for s in server.sockets) or "off"
            broker.listening = True  # GET /readyz: every listener is open
            log.info("listening node=%s mqtt=%s admin=%s", config.node_id, mqtt_addr,
                     f"{config.admin_host}:{config.admin_port}" if admin else "off")
            await stop.wait()
        finally:
            broker.listening = False  # GET /readyz: not ready while stopping
            log.info("shutting down node=%s connections=%d", config.node_id,
                     len(broker.clients))
            for server in servers + tls_servers:
                server.close()
            await ws_listeners.stop_accepting()
            broker.kick_all(ReasonCode.SERVER_SHUTTING_DOWN, send_will=False)
            for server in servers + tls_servers:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), config.shutdown_grace)
            await ws_listeners.cleanup()  # waits for the WebSocket handlers (shutdown_grace)
            await broker.stop()
            if admin is not None:
                await admin.cleanup()


def open_store(config) -> tuple[SessionStore, object, object]:
    """Open the node's store under data_dir, repairing what recovery can; every problem
    it found is logged (never a silent start with wrong state)."""
    path = os.path.join(config.data_dir, "store")
    os.makedirs(path, exist_ok=True)
    store = SessionStore(path, durability=config.durability,
                         compact_min_bytes=config.store_compact_bytes)
    loaded, report = store.open()
    for problem in report.problems:
        log.error("store recovery node=%s: %s", config.node_id, problem)
    return store, loaded, report


def _log_access(config, auth) -> None:
    """Who may connect, said once at start."""
    users = len(auth.passwords.users) if auth.passwords is not None else None
    if auth.anonymous:
        log.info("anonymous clients accepted node=%s (allow_anonymous=%s, host=%s)%s",
                 config.node_id, config.allow_anonymous, config.host,
                 f"; password_file users={users}" if users is not None else "")
    elif users is not None or auth.plugin is not None:
        log.info("clients log in node=%s: password_file=%s users=%s auth_plugin=%s; "
                 "anonymous clients refused", config.node_id, config.password_file or "-",
                 users, config.auth_plugin or "-")
    else:
        log.warning("anonymous clients refused node=%s: host %s is not a loopback address "
                    "and no password_file is set, so nobody can connect: set password_file "
                    "(users: `shoal passwd`) or allow_anonymous = true", config.node_id,
                    config.host)
    if config.tls_identity_as_username:
        log.info("TLS client certificates log in node=%s: their common name is the username",
                 config.node_id)
    if auth.acl is not None:
        log.info("acl_file %s node=%s rules=%d: what it does not grant is denied",
                 config.acl_file, config.node_id, auth.acl.rule_count())


def _reload_on_sighup(loop, broker) -> None:
    """SIGHUP rereads the password and ACL files (a bad file keeps what was loaded)."""
    def reload() -> None:
        try:
            loaded = broker.reload_auth()
        except ConfigError as err:
            log.error("password / acl file not reloaded node=%s: %s", broker.node_id, err)
            return
        log.warning("auth reloaded node=%s users=%s acl_rules=%s subscriptions_removed=%d",
                    broker.node_id, loaded["users"], loaded["acl_rules"],
                    loaded["subscriptions_removed"])
    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        # (not the main thread: a node served inside another program reloads through it)
        log.info("no SIGHUP reload node=%s: %s", broker.node_id, err)


async def _main(config, extensions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop, extensions)


def run_node(config, extensions=()) -> int:
    """``shoal run``: serve until SIGINT/SIGTERM; returns the process exit code."""
    loop_factory = None
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        log.info("uvloop not installed, using the default asyncio loop")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_main(config, extensions))
    except OSError as err:
        log.error("cannot start node=%s: %s (is the port in use? pick another with "
                  "--mqtt-port / --admin-port / --cluster-port / --tls-port / --ws-port / "
                  "--wss-port)", config.node_id, err)
        return 1
    except StoreError as err:
        # the data directory is in use by another node, or the disk failed under it
        log.error("stopped: %s (%r)", err, err.__cause__)
        return 1
    return 0
