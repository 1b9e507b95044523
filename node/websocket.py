"""MQTT over WebSocket: an aiohttp listener that hands each WebSocket to ``MqttProtocol``.

``ws_port`` (and ``wss_port``, with node/tls.py's context) serve one aiohttp Application,
separate from the admin API, with one route at ``ws_path`` (default ``/mqtt``). There is
no second MQTT implementation: ``WsTransport`` is an ``asyncio.Transport`` over a
``WebSocketResponse``, so the very ``MqttProtocol`` of the TCP listener runs on it
unchanged (connection_made, data_received, pause/resume_writing, connection_lost).

The WebSocket rules of MQTT (3.1.1 §6, 5.0 §6):

- the client must offer the subprotocol ``mqtt`` and the server echoes it
  [MQTT-6.0.0-3/4]. A handshake that does not offer it is refused with HTTP 400 (we
  decide so: a client that does not speak MQTT's WebSocket binding would otherwise get a
  connection it cannot use); a plain HTTP request to the path gets 426 Upgrade Required,
  any other path 404;
- MQTT travels in binary frames only; a frame may hold part of a packet or several
  packets (the MQTT parser takes any chunking) [MQTT-6.0.0-2]. A text frame ends the
  connection [MQTT-6.0.0-1] (WebSocket close 1003, the will is published as on any
  other abnormal end).

Flow control is the TCP listener's: output is queued and sent by one task per connection;
past the ``write_buffer_high`` mark the protocol is told ``pause_writing`` (its session
queues, bounded) and below a quarter of it ``resume_writing``. Reading stops while the
protocol pauses it (aiohttp then stops reading the socket once its own small buffer is
full). The peer address is the TCP peer of the HTTP request: an ``X-Forwarded-For``
header is not trusted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["SUBPROTOCOL", "WsListeners", "WsTransport"]

log = logging.getLogger("shoal.websocket")

SUBPROTOCOL = "mqtt"
SEND_BATCH = 256 * 1024  # largest WebSocket message the sender joins queued writes into
CLOSE_TIMEOUT = 5.0  # seconds for the closing handshake, and for flushing before it
DEFAULT_HIGH = 65536


class TextFrame(ConnectionError):
    """The client sent a text frame: MQTT over WebSocket is binary only [MQTT-6.0.0-1]."""


class WsTransport(asyncio.Transport):
    """The transport ``MqttProtocol`` sees on a WebSocket connection.

    ``write`` only queues (never blocks, never awaits); a sender task joins what is queued
    into binary messages. ``close`` sends what is queued, then the WebSocket close frame;
    ``connection_lost`` follows once the WebSocket is closed, as with a socket."""

    __slots__ = ("_ws", "_request", "_protocol", "_out", "_out_bytes", "_high", "_low",
                 "_write_paused", "_closing", "_lost", "_wake", "_reading", "_sender")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, protocol) -> None:
        super().__init__()
        self._ws = ws
        self._request = request
        self._protocol = protocol
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0  # queued plus the message being sent
        self._high = DEFAULT_HIGH
        self._low = DEFAULT_HIGH // 4
        self._write_paused = False
        self._closing = False
        self._lost = False
        self._wake = asyncio.Event()  # the sender: output was queued, or closing
        self._reading = asyncio.Event()  # the reader: set while reading is allowed
        self._reading.set()
        self._sender: asyncio.Task | None = None

    # -- asyncio.Transport, as MqttProtocol uses it -------------------------------------------

    def get_extra_info(self, name: str, default=None):
        tr = self._request.transport
        if tr is None:
            return default
        return tr.get_extra_info(name, default)  # peername, sslcontext, peercert, ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = DEFAULT_HIGH if high is None else high
        self._high = high
        self._low = high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._out_bytes

    def write(self, data) -> None:
        if self._closing or not data:
            return  # like a socket transport after close(): nothing more goes out
        self._out.append(bytes(data))
        self._out_bytes += len(data)
        self._wake.set()
        if not self._write_paused and self._out_bytes > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()  # the sender flushes, then closes the WebSocket
        self._reading.set()  # a paused reader wakes up to see it is over

    def abort(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self.close()
        if self._request.transport is not None:
            self._request.transport.abort()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    # -- the connection's life ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the WebSocket is closed (by either side)."""
        protocol = self._protocol
        protocol.connection_made(self)
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        exc: BaseException | None = None
        try:
            exc = await self._read_loop()
        except Exception as err:  # a bug of ours: it ends this connection only
            log.exception("internal error in the WebSocket reader peer=%s", protocol.peer)
            exc = err
        finally:
            await self._end(exc)

    async def _read_loop(self) -> BaseException | None:
        ws = self._ws
        protocol = self._protocol
        reading = self._reading
        while True:
            if not reading.is_set():
                await reading.wait()
            if self._closing:
                return None  # we close: the sender flushes and sends the close frame
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.BINARY:
                protocol.data_received(msg.data)
            elif kind is WSMsgType.TEXT:
                log.info("text frame from peer=%s: closing (MQTT over WebSocket is binary "
                         "only)", protocol.peer)
                return TextFrame("text frame")
            elif kind is WSMsgType.ERROR:
                log.info("WebSocket error peer=%s: %r", protocol.peer, msg.data)
                return msg.data if isinstance(msg.data, BaseException) else None
            elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            else:  # PING/PONG are answered by aiohttp and never come here
                log.debug("ignored WebSocket message type=%s peer=%s", kind, protocol.peer)

    async def _end(self, exc: BaseException | None) -> None:
        sender = self._sender
        ours = self._closing and exc is None  # close() came first: let the sender finish
        if not ours:
            # the client closed, the connection broke or it sent a text frame: what is
            # still queued can no longer be delivered
            self._closing = True
            self._out.clear()
            self._out_bytes = 0
            if sender is not None:
                sender.cancel()
        try:
            if sender is not None:
                done, _ = await asyncio.wait({sender}, timeout=2 * CLOSE_TIMEOUT)
                if not done:
                    log.info("WebSocket close timed out peer=%s", self._protocol.peer)
                    sender.cancel()
                    self.abort()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
            if isinstance(exc, TextFrame):
                await self._ws.close(code=WSCloseCode.UNSUPPORTED_DATA,
                                     message=b"MQTT over WebSocket takes binary frames only")
        finally:
            if not self._lost:
                self._lost = True
                self._protocol.connection_lost(exc)

    async def _send_loop(self) -> None:
        ws = self._ws
        out = self._out
        wake = self._wake
        try:
            while True:
                if not out:
                    if self._closing:
                        break
                    wake.clear()
                    await wake.wait()
                    continue
                data = out.popleft()
                if out and len(data) < SEND_BATCH:
                    parts = [data]
                    size = len(data)
                    while out and size < SEND_BATCH:
                        part = out.popleft()
                        parts.append(part)
                        size += len(part)
                    data = b"".join(parts)
                await ws.send_bytes(data)  # awaits only while the socket's buffer is full
                self._out_bytes -= len(data)
                if self._write_paused and self._out_bytes <= self._low and not self._closing:
                    self._write_paused = False
                    self._protocol.resume_writing()
            await ws.close()
        except ConnectionError as err:
            log.debug("WebSocket send failed peer=%s: %r", self._protocol.peer, err)
            self._drop_connection()
        except Exception:
            log.exception("internal error in the WebSocket sender peer=%s",
                          self._protocol.peer)
            self._drop_connection()

    def _drop_connection(self) -> None:
        """The sender cannot go on: end the connection, so that the reader ends too."""
        self._closing = True
        self._out.clear()
        self._out_bytes = 0
        self._reading.set()
        if self._request.transport is not None:
            self._request.transport.close()


class _Site(web.TCPSite):
    """aiohttp's TCP site with a TLS handshake deadline (``connect_timeout``; aiohttp's
    own leaves asyncio's 60 s)."""

    def __init__(self, *args, handshake_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # (registers the site with its runner)
        extra = {"ssl_handshake_timeout": self.handshake_timeout} if self._ssl_context else {}
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, **extra)
        self._bound_port = self._server.sockets[0].getsockname()[1]


class WsListeners:
    """The WebSocket listeners of one node: ``ws_port`` and ``wss_port`` (either may be 0),
    one aiohttp runner. ``protocol_factory()`` makes the ``MqttProtocol`` of a connection."""

    def __init__(self, config, protocol_factory: Callable[[], asyncio.Protocol],
                 ssl_context=None) -> None:
        self.config = config
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.runner: web.AppRunner | None = None
        self.addresses: list[str] = []
        # HTTP connections that have not asked for the WebSocket upgrade: when each was
        # first seen; closed after connect_timeout (idle or slowloris sockets)
        # (aiohttp's handlers take no weak references: pruned at each sweep instead)
        self._first_seen: dict = {}
        self._upgraded: set = set()
        self._sweeper: asyncio.Task | None = None
        self.timed_out = 0

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.config.ws_path, self.handle)
        return app

    async def start(self) -> None:
        config = self.config
        if not (config.ws_port or config.wss_port):
            return
        self.runner = web.AppRunner(self.make_app(), access_log=None,
                                    shutdown_timeout=config.shutdown_grace)
        await self.runner.setup()
        for port, ssl_context, scheme in ((config.ws_port, None, "ws"),
                                          (config.wss_port, self.ssl_context, "wss")):
            if port:
                site = _Site(self.runner, config.host, port, ssl_context=ssl_context,
                             backlog=2048, handshake_timeout=config.connect_timeout)
                await site.start()
                self.addresses.append(f"{scheme}://{config.host}:{port}{config.ws_path}")
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        """Close the HTTP connections that did not ask for the WebSocket upgrade within
        ``connect_timeout`` (once upgraded, MqttProtocol's own CONNECT deadline applies)."""
        timeout = self.config.connect_timeout
        loop = asyncio.get_running_loop()
        while self.runner is not None and self.runner.server is not None:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            server = self.runner.server if self.runner is not None else None
            current = set(server.connections if server is not None else ())
            self._upgraded &= current
            for gone in [h for h in self._first_seen if h not in current]:
                del self._first_seen[gone]
            closed = 0
            for handler in current:
                if handler in self._upgraded:
                    continue
                since = self._first_seen.setdefault(handler, now)
                if now - since > timeout and handler.transport is not None:
                    closed += 1
                    handler.transport.abort()
            if closed:
                self.timed_out += closed
                log.info("WebSocket listener closed %d connection(s) that asked for no "
                         "upgrade within %.1fs (connect_timeout)", closed, timeout)

    async def stop_accepting(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()

    async def cleanup(self) -> None:
        """Wait (up to shutdown_grace) for the connections' handlers, then close."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False,
                                   max_msg_size=config.max_packet_size + 65536,
                                   timeout=CLOSE_TIMEOUT, autoping=True)
        ready = ws.can_prepare(request)
        if not ready.ok:
            return web.Response(status=426, headers={"Upgrade": "websocket"},
                                text=f"{config.ws_path} serves MQTT over WebSocket: connect "
                                "with a WebSocket client offering the subprotocol 'mqtt'\n")
        if ready.protocol != SUBPROTOCOL:
            log.info("WebSocket handshake without the 'mqtt' subprotocol refused peer=%s "
                     "offered=%r", request.remote,
                     request.headers.get("Sec-WebSocket-Protocol", ""))
            return web.Response(status=400, text="MQTT over WebSocket needs the subprotocol "
                                "'mqtt' (Sec-WebSocket-Protocol: mqtt)\n")
        self._upgraded.add(request.protocol)
        await ws.prepare(request)
        await WsTransport(ws, request, self.protocol_factory()).run()
        return ws
