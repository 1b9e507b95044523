"""Node-to-node links: length-prefixed msgpack frames over TCP, one link per peer pair.

Wire format
-----------
Every frame is a 4-byte big-endian body length followed by a msgpack body, which is a
list whose first element is the frame type:

    [HELLO, {v, node_id, cluster, nonce, inc, info}]      handshake, both sides, first
    [AUTH,  {mac, known_inc, rx}]                          handshake, both sides, second
    [DATA,  ack, first_seq, [msg, msg, ...]]               numbered messages + piggybacked ack
    [ACK,   ack]                                           ack only; also the keepalive

A message is ``[MSG, kind, body]``, ``[REQ, kind, body, id, timeout]``,
``[RESP, id, ok, result_or_error_text]`` or ``[VOID]`` (a message that could not be
encoded: it keeps its sequence number so the stream has no gap).

Handshake: each side sends HELLO (16 random nonce bytes, its incarnation: a random id per
``Transport`` instance), checks the peer's HELLO (cluster name, not our own node id, the
node id we dialled), then sends AUTH with ``mac = HMAC-SHA256(secret, "shoal-link-1" ||
role || peer_nonce || own_nonce || own_id || peer_id || cluster)`` (role is ``D`` for the
dialling side and ``A`` for the accepting one, so a MAC cannot be reflected or relayed in
the other role) and the last sequence number it delivered from that peer incarnation.

Reliability: messages to a peer are numbered 1, 2, ... and stay in a retransmit buffer
until the peer acknowledges them (cumulative ack). A new link retransmits everything after
the ack the peer's AUTH carries; the receiver drops what it already delivered. When a
peer's incarnation changes (it restarted) both sides restart numbering; what the old
incarnation received but never acknowledged is dropped (and counted in a warning), what was
never written is sent to the new incarnation, and pending requests to the old one fail with
``PeerUnreachable``.

One link per pair: the side with the smaller node id dials peers it knows (``set_peer``);
any authenticated inbound connection is accepted, the newest replacing an older one. A
link that has been silent for ``IDLE_TIMEOUT`` seconds is dropped (keepalives are sent
every ``KEEPALIVE`` seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable

import msgpack

log = logging.getLogger("shoal.transport")

__all__ = ["PeerUnreachable", "RequestTimeout", "RemoteError", "Transport"]

# frame types
F_HELLO, F_AUTH, F_DATA, F_ACK = 0, 1, 2, 3
# message types (first element of a message inside a DATA frame)
M_MSG, M_REQ, M_RESP, M_VOID = 0, 1, 2, 3

PROTOCOL_VERSION = 1
MAC_LABEL = b"shoal-link-1"


class PeerUnreachable(Exception):
    """No link to the peer within the deadline, the peer is unknown, or it restarted."""


class RequestTimeout(Exception):
    """The peer is linked but did not answer the request before its deadline."""


class RemoteError(Exception):
    """The peer's request handler raised; the message carries its text."""


class _HandshakeError(Exception):
    pass


class _ProtocolError(Exception):
    pass


class _Link:
    """One authenticated TCP connection to a peer."""

    __slots__ = ("peer_id", "reader", "writer", "tr", "direction", "task", "drain_task",
                 "last_read", "last_write", "paused", "closed", "up_at", "chunk", "sockname",
                 "peername")

    def __init__(self, peer_id: str, reader, writer, direction: str) -> None:
        self.peer_id = peer_id
        self.reader = reader
        self.writer = writer
        self.tr = writer.transport
        self.direction = direction  # "out" (we dialled) or "in"
        self.task: asyncio.Task | None = None
        self.drain_task: asyncio.Task | None = None
        now = time.monotonic()
        self.last_read = now
        self.last_write = now
        self.up_at = now
        self.paused = False
        self.closed = False
        self.chunk = 256  # messages per DATA frame, adapted to keep frames near FRAME_TARGET
        self.sockname = writer.get_extra_info("sockname")
        self.peername = writer.get_extra_info("peername")


class _Peer:
    """Everything this side keeps about one peer: address, link, both sequence states."""

    __slots__ = ("id", "addr", "info", "inc", "tx_inc", "rx_last", "ack_sent", "acked",
                 "pending", "unacked", "link", "dialer", "changed", "drain_waiters",
                 "requests", "flush_scheduled", "removed", "heard_at")

    def __init__(self, peer_id: str) -> None:
        self.id = peer_id
        self.addr: tuple[str, int] | None = None
        self.info: Any = None
        self.inc: str | None = None      # the peer incarnation our receive state belongs to
        self.tx_inc: str | None = None   # the peer incarnation our send numbering belongs to
        self.rx_last = 0                 # highest seq delivered from the peer (in order)
        self.ack_sent = 0                # highest rx_last we told the peer about
        self.acked = 0                   # highest seq of ours the peer acknowledged
        self.pending: deque = deque()    # queued, not yet written on the current link
        self.unacked: deque = deque()    # written, not yet acknowledged (seq acked+1, ...)
        self.link: _Link | None = None
        self.dialer: asyncio.Task | None = None
        self.heard_at = time.monotonic()  # last read on a link (or when first known)
        self.changed = asyncio.Event()   # link went down / peer forgotten: wakes the dialer
        self.drain_waiters: list[asyncio.Future] = []
        self.requests: set[int] = set()  # ids of our pending requests to this peer
        self.flush_scheduled = False
        self.removed = False

    def depth(self) -> int:
        return len(self.pending) + len(self.unacked)


class Transport:
    HANDSHAKE_TIMEOUT = 5.0   # connect + HELLO + AUTH
    ACK_PERIOD = 0.05         # send a bare ACK at least this often while receiving
    KEEPALIVE = 1.0           # send an ACK frame when nothing was written for this long
    IDLE_TIMEOUT = 5.0        # drop a link that has been silent this long
    WRITE_STALL_TIMEOUT = 10.0  # drop a link whose peer does not read for this long
    BACKOFF_MIN = 0.05
    BACKOFF_MAX = 1.0
    FRAME_TARGET = 1 << 20    # aim DATA frames at about 1 MiB
    MAX_CHUNK = 8192          # messages per DATA frame at most
    WRITE_BUDGET = 4 << 20    # bytes written per flush before yielding to the loop
    WRITE_HIGH = 4 << 20      # transport write buffer: pause above, resume below WRITE_LOW
    WRITE_LOW = 1 << 20
    MAX_HANDLERS = 1024       # concurrent on_request handlers; beyond: answered "busy"
    MAX_HANDSHAKES = 64       # concurrent inbound handshakes
    HANDLER_TIMEOUT_MAX = 300.0
    HANDSHAKE_FRAME_MAX = 1 << 20

    def __init__(self, node_id: str, cluster_name: str, secret: bytes, host: str, port: int,
                 *, on_message: Callable[[str, str, Any], None],
                 on_request: Callable[[str, str, Any], Awaitable[Any]],
                 on_peer_up: Callable[[str], None] | None = None,
                 on_peer_down: Callable[[str], None] | None = None,
                 on_peer_restarted: Callable[[str], None] | None = None,
                 on_peer_process: Callable[[str], None] | None = None,
                 queue_limit: int = 100_000, max_frame: int = 16 * 1024 * 1024) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        if isinstance(secret, str):
            secret = secret.encode()
        self.node_id = node_id
        self.cluster_name = cluster_name
        self.host = host
        self.port = port
        self.info: dict = {}
        self.incarnation = secrets.token_hex(8)
        self.queue_limit = queue_limit
        self.max_frame = max_frame
        self._secret = bytes(secret)
        self._on_message = on_message
        self._on_request = on_request
        self._on_peer_up = on_peer_up
        self._on_peer_down = on_peer_down
        # a peer came back as a new process: nothing its old one queued will arrive now
        self._on_peer_restarted = on_peer_restarted
        self._on_peer_process = on_peer_process
        self._peers: dict[str, _Peer] = {}
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._rids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._handlers: set[asyncio.Task] = set()
        self._handshakes = 0
        self._server: asyncio.AbstractServer | None = None
        self._tick_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ack_every = max(1, min(4096, queue_limit // 4))
        self._drain_level = max(1, queue_limit // 2)
        self.stats = {"links_up": 0, "links_down": 0, "dials": 0, "dial_failures": 0,
                      "accepts": 0, "handshake_failures": 0, "frames_out": 0, "frames_in": 0,
                      "msgs_out": 0, "msgs_in": 0, "retransmitted": 0, "dropped_restart": 0,
                      "dropped_unencodable": 0, "duplicates": 0}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await asyncio.start_server(self._on_accept, self.host, self.port,
                                                  limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tick_task = self._spawn(self._tick_loop())
        for st in self._peers.values():
            self._ensure_dialer(st)
        log.info("transport listening node=%s inc=%s addr=%s:%d", self.node_id,
                 self.incarnation, self.host, self.port)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for st in self._peers.values():
            link = st.link
            if link is not None:
                # last words: what is queued, and the ack of what we delivered, so the peer
                # does not count delivered messages as lost with this incarnation
                if not link.closed and not link.paused and not link.tr.is_closing():
                    self._flush(st)
                    if st.rx_last > st.ack_sent and not link.tr.is_closing():
                        self._write_ack(st, link)
                self._close_link(link, graceful=True)
                st.link = None
            self._fail_waiters(st, PeerUnreachable("transport stopped"))
        for rid, (peer_id, fut) in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(PeerUnreachable(f"transport stopped (request to {peer_id})"))
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for st in self._peers.values():
            st.dialer = None
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort at shutdown
                pass
            self._server = None
        log.info("transport stopped node=%s", self.node_id)

    # -- peers -------------------------------------------------------------------------

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        if peer_id == self.node_id:
            return
        st = self._peers.get(peer_id)
        if st is None:
            st = self._peers[peer_id] = _Peer(peer_id)
            log.info("peer known node=%s peer=%s addr=%s:%d", self.node_id, peer_id, host, port)
        st.addr = (host, int(port))
        self._ensure_dialer(st)

    def remove_peer(self, peer_id: str) -> None:
        st = self._peers.pop(peer_id, None)
        if st is None:
            return
        st.removed = True
        dropped = st.depth()
        st.pending.clear()
        st.unacked.clear()
        link, st.link = st.link, None
        if link is not None:
            self._close_link(link)
        st.changed.set()
        if st.dialer is not None:
            st.dialer.cancel()
            st.dialer = None
        self._fail_waiters(st, PeerUnreachable(f"peer {peer_id} removed"))
        log.info("peer forgotten node=%s peer=%s dropped_messages=%d", self.node_id, peer_id,
                 dropped)
        if link is not None:
            self._call(self._on_peer_down, peer_id)

    def is_up(self, peer_id: str) -> bool:
        st = self._peers.get(peer_id)
        return st is not None and st.link is not None and not st.link.closed

    def silent_for(self, peer_id: str) -> float:
        """Seconds since anything was read from the peer (on any link; since it became
        known if never): the failure detector's input."""
        st = self._peers.get(peer_id)
        if st is None:
            return 0.0
        heard = st.heard_at
        link = st.link
        if link is not None and not link.closed and link.last_read > heard:
            heard = link.last_read
        return time.monotonic() - heard

    def peers_up(self) -> set[str]:
        return {p for p, st in self._peers.items() if st.link is not None and not st.link.closed}

    def queue_depth(self, peer_id: str) -> int:
        st = self._peers.get(peer_id)
        return 0 if st is None else st.depth()

    def peer_incarnation(self, peer_id: str) -> str | None:
        """The incarnation (process) of the peer this node last linked with (None if
        never): a message sent now is meant for that process."""
        st = self._peers.get(peer_id)
        return None if st is None else st.inc

    def peer_info(self, peer_id: str) -> Any:
        """The ``info`` the peer advertised in its last handshake (None if never linked)."""
        st = self._peers.get(peer_id)
        return None if st is None else st.info

    # -- sending -----------------------------------------------------------------------

    def send(self, peer_id: str, kind: str, body, force: bool = False) -> bool:
        """``force``: queue even past ``queue_limit`` (for what must not be lost, such as
        an acknowledged QoS 1/2 message; the caller bounds it another way)."""
        st = self._peers.get(peer_id)
        if st is None or self._stopping:
            return False
        if not force and len(st.pending) + len(st.unacked) >= self.queue_limit:
            return False
        st.pending.append((M_MSG, kind, body))
        if not st.flush_scheduled and st.link is not None:
            st.flush_scheduled = True
            self._loop.call_soon(self._flush, st)
        return True

    async def request(self, peer_id: str, kind: str, body, timeout: float) -> Any:
        st = self._peers.get(peer_id)
        if st is None or self._stopping:
            raise PeerUnreachable(f"unknown peer {peer_id!r}")
        if st.depth() >= self.queue_limit:
            raise PeerUnreachable(f"queue to {peer_id} is full ({st.depth()} messages)")
        rid = next(self._rids)
        fut = self._loop.create_future()
        self._pending[rid] = (peer_id, fut)
        st.requests.add(rid)
        self._enqueue(st, (M_REQ, kind, body, rid, float(timeout)))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:  # ours: the futures never carry a TimeoutError
            if not self.is_up(peer_id):
                raise PeerUnreachable(
                    f"no link to {peer_id} within {timeout:.3g}s ({kind})") from None
            raise RequestTimeout(f"{kind} to {peer_id}: no answer within {timeout:.3g}s") from None
        finally:
            self._pending.pop(rid, None)
            st.requests.discard(rid)

    async def drain(self, peer_id: str, timeout: float) -> None:
        """Wait until the peer's queue is below half of ``queue_limit``.

        Raises PeerUnreachable (unknown peer, or not linked at the deadline) or
        RequestTimeout (linked but still too full at the deadline)."""
        st = self._peers.get(peer_id)
        if st is None or self._stopping:
            raise PeerUnreachable(f"unknown peer {peer_id!r}")
        if st.depth() < self._drain_level:
            return
        fut = self._loop.create_future()
        st.drain_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:  # ours: the futures never carry a TimeoutError
            if not self.is_up(peer_id):
                raise PeerUnreachable(f"no link to {peer_id} within {timeout:.3g}s") from None
            raise RequestTimeout(
                f"queue to {peer_id} still {st.depth()} after {timeout:.3g}s") from None
        finally:
            if fut in st.drain_waiters:
                st.drain_waiters.remove(fut)

    async def hello(self, host: str, port: int, timeout: float) -> tuple[str, Any]:
        """Link to an address whose node id we do not know yet (a join seed).

        Returns ``(peer_id, peer_info)``; the peer is then known (``set_peer``) and the new
        connection is its link. Raises PeerUnreachable (or OSError) on failure."""
        if self._stopping or self._loop is None:
            raise PeerUnreachable("transport not running")
        try:
            st = await self._dial(host, port, None, timeout)
        except (_HandshakeError, TimeoutError, asyncio.IncompleteReadError) as err:
            raise PeerUnreachable(f"hello {host}:{port}: {err or 'timed out'}") from None
        self.set_peer(st.id, host, port)
        return st.id, st.info

    # -- internals: queue and writing --------------------------------------------------

    def _enqueue(self, st: _Peer, item: tuple) -> None:
        st.pending.append(item)
        if not st.flush_scheduled and st.link is not None:
            st.flush_scheduled = True
            self._loop.call_soon(self._flush, st)

    def _schedule_flush(self, st: _Peer) -> None:
        if not st.flush_scheduled and st.link is not None and not self._stopping:
            st.flush_scheduled = True
            self._loop.call_soon(self._flush, st)

    def _pack(self, obj) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def _flush(self, st: _Peer) -> None:
        """Write what is queued for ``st`` as DATA frames; called once per loop iteration."""
        st.flush_scheduled = False
        link = st.link
        if link is None or link.closed or link.paused:
            return
        tr = link.tr
        if tr.is_closing():
            return
        pending = st.pending
        budget = self.WRITE_BUDGET
        limit = self.max_frame
        wrote = 0
        while pending and wrote < budget:
            n = min(len(pending), link.chunk)
            if n == len(pending):
                batch = list(pending)
                pending.clear()
            else:
                popleft = pending.popleft
                batch = [popleft() for _ in range(n)]
            first = st.acked + len(st.unacked) + 1
            try:
                body = self._pack([F_DATA, st.rx_last, first, batch])
            except (TypeError, ValueError, OverflowError):
                batch = self._sanitize(st, batch)
                body = self._pack([F_DATA, st.rx_last, first, batch])
            size = len(body)
            if size > limit:
                if n > 1:
                    pending.extendleft(reversed(batch))
                    link.chunk = max(1, n // 2)
                    continue
                batch = self._sanitize(st, batch, too_big=True)
                body = self._pack([F_DATA, st.rx_last, first, batch])
                size = len(body)
            if size > self.FRAME_TARGET:
                link.chunk = max(1, n // 2)
            elif n == link.chunk and size < self.FRAME_TARGET // 4:
                link.chunk = min(self.MAX_CHUNK, n * 2)
            st.unacked.extend(batch)
            st.ack_sent = st.rx_last
            tr.write(size.to_bytes(4, "big") + body)
            wrote += size
            self.stats["frames_out"] += 1
            self.stats["msgs_out"] += len(batch)
            if tr.get_write_buffer_size() > self.WRITE_HIGH:
                link.last_write = time.monotonic()
                self._start_drain(st, link)
                return
        if wrote:
            link.last_write = time.monotonic()
        elif st.rx_last > st.ack_sent:
            self._write_ack(st, link)
        if pending:  # budget used up: continue next iteration, let reads run meanwhile
            self._schedule_flush(st)

    def _write_ack(self, st: _Peer, link: _Link) -> None:
        body = self._pack([F_ACK, st.rx_last])
        st.ack_sent = st.rx_last
        link.tr.write(len(body).to_bytes(4, "big") + body)
        link.last_write = time.monotonic()
        self.stats["frames_out"] += 1

    def _sanitize(self, st: _Peer, batch: list, too_big: bool = False) -> list:
        """Replace messages that cannot be encoded (or exceed max_frame) by placeholders
        that keep their sequence numbers; fail or answer the requests among them."""
        out = []
        for item in batch:
            try:
                size = len(self._pack(item))
                if too_big and size > self.max_frame - 64:
                    raise ValueError(f"{size} bytes exceeds max_frame {self.max_frame}")
                out.append(item)
                continue
            except (TypeError, ValueError, OverflowError) as err:
                why = str(err)
            self.stats["dropped_unencodable"] += 1
            mtype = item[0]
            if mtype == M_RESP:
                log.error("response not sendable node=%s peer=%s id=%s: %s", self.node_id,
                          st.id, item[1], why)
                out.append((M_RESP, item[1], False, f"response not sendable: {why}"))
                continue
            if mtype == M_REQ:
                log.error("request not sendable node=%s peer=%s kind=%s: %s", self.node_id,
                          st.id, item[1], why)
                entry = self._pending.get(item[3])
                if entry is not None and not entry[1].done():
                    entry[1].set_exception(ValueError(f"request not sendable: {why}"))
            else:
                log.error("message dropped, not sendable node=%s peer=%s kind=%s: %s",
                          self.node_id, st.id, item[1], why)
            out.append((M_VOID,))
        return out

    def _start_drain(self, st: _Peer, link: _Link) -> None:
        link.paused = True
        link.drain_task = self._spawn(self._drain_link(st, link))

    async def _drain_link(self, st: _Peer, link: _Link) -> None:
        try:
            async with asyncio.timeout(self.WRITE_STALL_TIMEOUT):
                await link.writer.drain()
        except TimeoutError:
            log.warning("link dropped, peer not reading node=%s peer=%s for=%.1fs",
                        self.node_id, st.id, self.WRITE_STALL_TIMEOUT)
            self._close_link(link)
            return
        except (ConnectionError, OSError, RuntimeError):
            return
        link.paused = False
        link.drain_task = None
        if st.link is link and not link.closed:
            self._flush(st)

    # -- internals: receiving ----------------------------------------------------------

    async def _read_loop(self, st: _Peer, link: _Link) -> None:
        reader = link.reader
        max_frame = self.max_frame
        reason = "closed by peer"
        try:
            while True:
                hdr = await reader.readexactly(4)
                n = int.from_bytes(hdr, "big")
                if n > max_frame:
                    reason = f"frame of {n} bytes exceeds max_frame {max_frame}"
                    log.warning("link closed node=%s peer=%s: %s", self.node_id, st.id, reason)
                    break
                data = await reader.readexactly(n)
                if link.closed:
                    break
                link.last_read = time.monotonic()
                self.stats["frames_in"] += 1
                self._on_frame(st, link, msgpack.unpackb(data, raw=False, strict_map_key=False))
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError) as err:
            reason = repr(err)
        except (_ProtocolError, msgpack.UnpackException, ValueError, TypeError, IndexError,
                KeyError) as err:
            reason = f"protocol error: {err!r}"
            log.warning("link closed node=%s peer=%s: %s", self.node_id, st.id, reason)
        finally:
            self._link_lost(st, link, reason)

    def _on_frame(self, st: _Peer, link: _Link, frame) -> None:
        tag = frame[0]
        if tag == F_DATA:
            _, ack, first, msgs = frame
            if ack > st.acked:
                self._on_ack(st, ack)
            skip = st.rx_last + 1 - first
            if skip < 0:
                raise _ProtocolError(f"sequence gap: expected {st.rx_last + 1}, got {first}")
            if skip:
                self.stats["duplicates"] += min(skip, len(msgs))
                msgs = msgs[skip:]
            on_message = self._on_message
            pid = st.id
            for m in msgs:
                st.rx_last += 1
                t = m[0]
                if t == M_MSG:
                    try:
                        on_message(pid, m[1], m[2])
                    except Exception:  # noqa: BLE001 - a handler bug must not kill the link
                        log.exception("on_message failed node=%s peer=%s kind=%s",
                                      self.node_id, pid, m[1])
                elif t == M_REQ:
                    self._start_handler(st, m)
                elif t == M_RESP:
                    self._on_response(st, m)
                if link.closed:
                    break
            self.stats["msgs_in"] += len(msgs)
            if st.rx_last - st.ack_sent >= self._ack_every:
                self._schedule_flush(st)
        elif tag == F_ACK:
            if frame[1] > st.acked:
                self._on_ack(st, frame[1])
        else:
            raise _ProtocolError(f"unexpected frame type {tag!r} after handshake")

    def _on_ack(self, st: _Peer, ack: int) -> None:
        n = ack - st.acked
        unacked = st.unacked
        if n > len(unacked):
            raise _ProtocolError(f"ack {ack} beyond what was sent ({st.acked + len(unacked)})")
        if n == len(unacked):
            unacked.clear()
        else:
            popleft = unacked.popleft
            for _ in range(n):
                popleft()
        st.acked = ack
        if st.drain_waiters and st.depth() < self._drain_level:
            self._wake_drain(st)

    def _wake_drain(self, st: _Peer) -> None:
        waiters, st.drain_waiters = st.drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _on_response(self, st: _Peer, m) -> None:
        _, rid, ok, result = m
        entry = self._pending.get(rid)
        if entry is None or entry[0] != st.id or entry[1].done():
            return  # the caller gave up (timeout) or the id is not ours
        if ok:
            entry[1].set_result(result)
        else:
            entry[1].set_exception(RemoteError(result))

    def _start_handler(self, st: _Peer, m) -> None:
        _, kind, body, rid, timeout = m
        if len(self._handlers) >= self.MAX_HANDLERS or self._stopping:
            self._enqueue(st, (M_RESP, rid, False, "busy: too many concurrent requests"))
            return
        task = self._spawn(self._serve(st, st.inc, rid, kind, body, timeout))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, st: _Peer, inc, rid: int, kind: str, body, timeout) -> None:
        try:
            limit = min(float(timeout), self.HANDLER_TIMEOUT_MAX)
        except (TypeError, ValueError):
            limit = self.HANDLER_TIMEOUT_MAX
        try:
            async with asyncio.timeout(limit):
                result = await self._on_request(st.id, kind, body)
            resp = (M_RESP, rid, True, result)
        except TimeoutError:
            resp = (M_RESP, rid, False, f"handler for {kind} timed out after {limit:.3g}s")
        except Exception as err:  # noqa: BLE001 - becomes RemoteError at the caller
            resp = (M_RESP, rid, False, f"{type(err).__name__}: {err}")
        if st.removed or st.inc != inc or self._stopping:
            return  # the requester restarted or was forgotten: nobody waits for this
        self._enqueue(st, resp)

    # -- internals: links --------------------------------------------------------------

    async def _on_accept(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        if self._stopping or self._handshakes >= self.MAX_HANDSHAKES:
            writer.transport.abort()
            return
        self._handshakes += 1
        self.stats["accepts"] += 1
        try:
            async with asyncio.timeout(self.HANDSHAKE_TIMEOUT):
                peer_id, hello, auth = await self._handshake(reader, writer, None, b"A")
        except (_HandshakeError, TimeoutError, ConnectionError, OSError,
                asyncio.IncompleteReadError) as err:
            self.stats["handshake_failures"] += 1
            log.warning("inbound handshake refused node=%s from=%s: %s", self.node_id,
                        peername, err or "timed out")
            writer.transport.abort()
            return
        finally:
            self._handshakes -= 1
        if self._stopping:
            writer.transport.abort()
            return
        self._adopt(peer_id, hello, auth, reader, writer, "in")

    async def _dial(self, host: str, port: int, expect: str | None, timeout: float) -> _Peer:
        self.stats["dials"] += 1
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                peer_id, hello, auth = await self._handshake(reader, writer, expect, b"D")
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            raise
        if self._stopping:
            writer.transport.abort()
            raise PeerUnreachable("transport stopped")
        return self._adopt(peer_id, hello, auth, reader, writer, "out")

    async def _read_handshake_frame(self, reader: asyncio.StreamReader, tag: int) -> dict:
        n = int.from_bytes(await reader.readexactly(4), "big")
        if n > min(self.max_frame, self.HANDSHAKE_FRAME_MAX):
            raise _HandshakeError(f"handshake frame of {n} bytes")
        try:
            frame = msgpack.unpackb(await reader.readexactly(n), raw=False,
                                    strict_map_key=False)
        except (msgpack.UnpackException, ValueError) as err:
            raise _HandshakeError(f"undecodable handshake frame: {err}") from None
        if not (isinstance(frame, list) and len(frame) == 2 and frame[0] == tag
                and isinstance(frame[1], dict)):
            raise _HandshakeError(f"expected handshake frame {tag}, got something else")
        return frame[1]

    def _mac(self, role: bytes, to_nonce: bytes, from_nonce: bytes, from_id: str,
             to_id: str) -> bytes:
        data = b"\0".join((MAC_LABEL, role, to_nonce, from_nonce, from_id.encode(),
                           to_id.encode(), self.cluster_name.encode()))
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    async def _handshake(self, reader, writer, expect: str | None,
                         role: bytes) -> tuple[str, dict, dict]:
        nonce = secrets.token_bytes(16)
        hello = {"v": PROTOCOL_VERSION, "node_id": self.node_id, "cluster": self.cluster_name,
                 "nonce": nonce, "inc": self.incarnation, "info": self.info}
        body = self._pack([F_HELLO, hello])
        writer.write(len(body).to_bytes(4, "big") + body)
        theirs = await self._read_handshake_frame(reader, F_HELLO)
        peer_id = theirs.get("node_id")
        peer_nonce = theirs.get("nonce")
        peer_inc = theirs.get("inc")
        if theirs.get("cluster") != self.cluster_name:
            raise _HandshakeError(f"wrong cluster name {theirs.get('cluster')!r} "
                                  f"(peer {peer_id!r}, ours {self.cluster_name!r})")
        if not (isinstance(peer_id, str) and 0 < len(peer_id) <= 256
                and isinstance(peer_nonce, bytes) and len(peer_nonce) == 16
                and isinstance(peer_inc, str) and len(peer_inc) <= 64):
            raise _HandshakeError("malformed HELLO")
        if peer_id == self.node_id:
            raise _HandshakeError(f"peer claims our own node id {peer_id!r}")
        if expect is not None and peer_id != expect:
            raise _HandshakeError(f"dialled {expect!r} but {peer_id!r} answered")
        st = self._peers.get(peer_id)
        if st is not None and st.inc == peer_inc:
            known_inc, rx = peer_inc, st.rx_last
        else:
            known_inc, rx = None, 0
        mac = self._mac(role, peer_nonce, nonce, self.node_id, peer_id)
        body = self._pack([F_AUTH, {"mac": mac, "known_inc": known_inc, "rx": rx}])
        writer.write(len(body).to_bytes(4, "big") + body)
        auth = await self._read_handshake_frame(reader, F_AUTH)
        peer_role = b"A" if role == b"D" else b"D"
        want = self._mac(peer_role, nonce, peer_nonce, peer_id, self.node_id)
        got = auth.get("mac")
        if not isinstance(got, bytes) or not hmac.compare_digest(got, want):
            raise _HandshakeError(f"bad MAC from {peer_id!r} (wrong cluster secret?)")
        if not isinstance(auth.get("rx"), int) or auth["rx"] < 0:
            raise _HandshakeError("malformed AUTH")
        return peer_id, theirs, auth

    def _adopt(self, peer_id: str, hello: dict, auth: dict, reader, writer,
               direction: str) -> _Peer:
        """Make an authenticated connection the peer's link (replacing an older one) and
        reconcile both sequence states with what the peer told us."""
        st = self._peers.get(peer_id)
        if st is None:
            st = self._peers[peer_id] = _Peer(peer_id)
        peer_inc = hello["inc"]
        old = st.link
        restarted = st.inc is not None and st.inc != peer_inc
        # (before the callbacks below: what the new process advertises is what they read)
        st.info = hello.get("info")
        was_up = old is not None
        if old is not None:
            st.link = None
            self._close_link(old)
            log.info("link replaced node=%s peer=%s restarted=%s", self.node_id, peer_id,
                     restarted)
        if restarted:
            log.warning("peer restarted node=%s peer=%s old_inc=%s new_inc=%s", self.node_id,
                        peer_id, st.inc, peer_inc)
            if was_up:
                self._call(self._on_peer_down, peer_id)
                was_up = False
            self._fail_requests(st, PeerUnreachable(f"peer {peer_id} restarted"))
            self._call(self._on_peer_restarted, peer_id)
        if st.inc != peer_inc:
            st.inc = peer_inc
            st.rx_last = 0
            st.ack_sent = 0
            # the first link with this process of the peer: what is sent from here on is
            # meant for it (queued after what was never written)
            self._call(self._on_peer_process, peer_id)
        # our send numbering
        if auth.get("known_inc") == self.incarnation and st.tx_inc == peer_inc:
            ack = min(auth["rx"], st.acked + len(st.unacked))
            if ack > st.acked:
                self._on_ack(st, ack)
        else:
            if st.unacked:
                if st.tx_inc is not None and st.tx_inc != peer_inc:
                    n = len(st.unacked)
                    self.stats["dropped_restart"] += n
                    log.warning("peer restarted before acknowledging, messages dropped "
                                "node=%s peer=%s count=%d", self.node_id, peer_id, n)
                    st.unacked.clear()
                # else: the peer forgot us (same process): resend, at-least-once
            if restarted:
                # requests queued for the old incarnation were failed above: do not run
                # them; responses to its requests would match the new one's request ids
                st.pending = deque(m for m in st.pending if m[0] != M_REQ and m[0] != M_RESP)
            st.acked = 0
        st.tx_inc = peer_inc
        resend = len(st.unacked)
        if resend:
            self.stats["retransmitted"] += resend
            st.unacked.extend(st.pending)
            st.pending, st.unacked = st.unacked, deque()
        link = _Link(peer_id, reader, writer, direction)
        link.tr.set_write_buffer_limits(high=self.WRITE_HIGH, low=self.WRITE_LOW)
        st.link = link
        link.task = self._spawn(self._read_loop(st, link))
        self.stats["links_up"] += 1
        log.info("link up node=%s peer=%s dir=%s inc=%s retransmit=%d queued=%d", self.node_id,
                 peer_id, direction, peer_inc, resend, len(st.pending))
        if st.drain_waiters and st.depth() < self._drain_level:
            self._wake_drain(st)
        st.flush_scheduled = False
        self._schedule_flush(st)
        if not was_up:
            self._call(self._on_peer_up, peer_id)
        self._ensure_dialer(st)
        return st

    def _close_link(self, link: _Link, graceful: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        if graceful:
            link.tr.close()
        else:
            link.tr.abort()
        if link.drain_task is not None:
            link.drain_task.cancel()
            link.drain_task = None

    def _link_lost(self, st: _Peer, link: _Link, reason: str) -> None:
        self._close_link(link)
        if st.link is not link:
            return
        st.link = None
        st.heard_at = max(st.heard_at, link.last_read)
        self.stats["links_down"] += 1
        log.info("link down node=%s peer=%s dir=%s after=%.2fs: %s", self.node_id, st.id,
                 link.direction, time.monotonic() - link.up_at, reason)
        st.changed.set()
        if not self._stopping:
            self._call(self._on_peer_down, st.id)

    def _ensure_dialer(self, st: _Peer) -> None:
        if (self._loop is None or self._stopping or st.addr is None or st.removed
                or not self.node_id < st.id):
            return
        if st.dialer is None or st.dialer.done():
            st.dialer = self._spawn(self._dial_loop(st))

    async def _dial_loop(self, st: _Peer) -> None:
        backoff = self.BACKOFF_MIN
        failures = 0
        while not self._stopping and not st.removed and st.addr is not None:
            link = st.link
            if link is not None:
                st.changed.clear()
                try:
                    async with asyncio.timeout(self.KEEPALIVE):
                        await st.changed.wait()
                except TimeoutError:
                    continue
                if st.link is None and time.monotonic() - link.up_at < 1.0:
                    await asyncio.sleep(backoff)  # a link that dies at once: do not spin
                    backoff = min(backoff * 2, self.BACKOFF_MAX)
                else:
                    backoff = self.BACKOFF_MIN
                continue
            host, port = st.addr
            try:
                await self._dial(host, port, st.id, self.HANDSHAKE_TIMEOUT)
                failures = 0
                continue
            except (_HandshakeError, TimeoutError, OSError, asyncio.IncompleteReadError,
                    PeerUnreachable) as err:
                failures += 1
                self.stats["dial_failures"] += 1
                if isinstance(err, _HandshakeError):
                    self.stats["handshake_failures"] += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("dial failed node=%s peer=%s addr=%s:%d attempt=%d: %s",
                                self.node_id, st.id, host, port, failures,
                                err or "timed out")
            await asyncio.sleep(backoff * (0.75 + secrets.randbelow(500) / 1000))
            backoff = min(backoff * 2, self.BACKOFF_MAX)

    async def _tick_loop(self) -> None:
        """Periodic: bare ACKs for received traffic, keepalives, idle-link detection."""
        while not self._stopping:
            await asyncio.sleep(self.ACK_PERIOD)
            now = time.monotonic()
            for st in list(self._peers.values()):
                link = st.link
                if link is None or link.closed:
                    continue
                if now - link.last_read > self.IDLE_TIMEOUT:
                    log.warning("link silent, dropping node=%s peer=%s for=%.1fs",
                                self.node_id, st.id, now - link.last_read)
                    self._close_link(link)
                    continue
                if link.paused or st.flush_scheduled:
                    continue
                if st.rx_last > st.ack_sent or now - link.last_write >= self.KEEPALIVE:
                    self._write_ack(st, link)

    # -- helpers -----------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fail_requests(self, st: _Peer, exc: Exception) -> None:
        for rid in list(st.requests):
            entry = self._pending.get(rid)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(exc)

    def _fail_waiters(self, st: _Peer, exc: Exception) -> None:
        self._fail_requests(st, exc)
        waiters, st.drain_waiters = st.drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    def _call(self, cb, peer_id: str) -> None:
        if cb is None:
            return
        try:
            cb(peer_id)
        except Exception:  # noqa: BLE001 - a callback bug must not break the transport
            log.exception("peer callback failed node=%s peer=%s", self.node_id, peer_id)
