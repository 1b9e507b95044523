"""The Raft port's wire: bounded frames, a handshake deadline, and no free pickle.

pysyncobj (the Raft layer, cluster/routing.py) speaks this on every node's Raft port::

    frame   = length (4 bytes, struct "i", native order) + body (length bytes)
    body    = Fernet token (key derived from the cluster secret; AES-CBC + HMAC-SHA256,
              with the sender's monotonic second as its timestamp)
    token   -> zlib -> pickle (protocol 2) of the message

and on a new connection both ends first swap a 32-byte random key: the connecting side
sends its key, the accepting side answers ``(that key, its own key)``, and from then on
every message a side sends carries the key the other side chose, so a frame recorded on
one connection is refused on any other (but for the first, which carries no key: replayed,
it gets an answer, and the replayer can go no further). pysyncobj's own connection reads everything
the socket has into one buffer before it looks at any length, has no limit on a frame,
keeps a silent connection forever, unpickles with no restriction, and its listener
closes for good on an accept error (out of file descriptors, say).

This module keeps the wire format (nodes of the previous version still talk to these)
and replaces the code around it, through pysyncobj's supported hook
``SyncObj(..., transportClass=RaftTransport)``:

* :class:`RaftConnection` (used for every connection, both directions) checks each
  frame's length *before* it buffers the body. Until the peer has proved it holds the
  secret **on this connection** (a frame that decrypts and carries the random key this
  side chose: the second frame of the handshake), a frame may be at most
  :data:`HANDSHAKE_FRAME_BYTES` and a read never asks for more than one such frame; after
  that, :data:`MAX_FRAME_BYTES` (a whole message of the largest batch of routing
  operations we propose, compressed and encrypted; the snapshots pysyncobj sends go in
  chunks of ``logCompactionBatchSize``, 64 KiB, and appendEntries batches stop once they
  pass ``appendEntriesBatchSizeBytes``, 64 KiB, but may carry one entry of any size, and
  a follower forwards a whole entry to the leader in one ``apply_command``). A
  decompressed message may be at most :data:`MAX_MESSAGE_BYTES`. The read buffer never
  holds more than one frame and one read of read-ahead, and one connection reads at most
  :data:`READ_BUDGET_BYTES` per poll event, so one busy socket cannot starve the others.
* The order of the checks on a frame: length, then the Fernet signature (a frame made
  without the secret is dropped here: nothing of it is decompressed or unpickled), the
  timestamp (never older than the previous frame's), bounded decompression, then the
  restricted unpickler, then the session key.
* :class:`RaftTransport` keeps every connection that has not proved the secret yet in a
  pending list: at most :data:`MAX_PENDING_PER_ADDRESS` per peer IP address and
  :data:`MAX_PENDING` in all (the oldest goes when a new one comes), each closed if it has
  not proved it within :data:`HANDSHAKE_DEADLINE` seconds. So silent sockets cost one
  file descriptor for a bounded time and cannot fill the process's descriptors or the
  accept queue (the listener has a backlog of :data:`LISTEN_BACKLOG` and drains it). An
  accept error never closes the listener.
* Whatever breaks a rule closes that connection, with no traceback: one warning line per
  peer address per :data:`REJECT_LOG_INTERVAL` seconds (with how many more it refused
  since), counted by reason in :attr:`RaftTransport.refused`.

The unpickler. pysyncobj pickles its messages, the commands in its log (our batches of
routing operations), its snapshots (the routing table, sent to lagging nodes in chunks and
kept in ``raft.dump``) and its journal's metadata. :func:`install_restricted_unpickler`
routes every unpickling pysyncobj does through :class:`RestrictedUnpickler`, which
resolves only the globals of :data:`ALLOWED_GLOBALS` (found by running the cluster suites
with a find_class that logged every request; the routing table's dataclass, pysyncobj's
node class, sets, and the two helpers protocol 2 uses for ``bytes``, replaced by
functions that only make bytes). It is a monkeypatch of the ``load``/``loads`` functions
of pysyncobj's own pickle shim (``pysyncobj.pickle``) and of the ``loads`` that
``pysyncobj.journal`` imported from it, because pysyncobj has no hook for
deserialization: done in this one place, idempotent, checked by
:func:`restricted_unpickler_installed`. (Its wire has none either: pickle stays on the
wire, restricted, which keeps the format of the previous version.)

What the cluster secret protects, then: without it a peer cannot get a byte it made past
the signature check (so never into zlib or pickle), and what it can make a node hold is
bounded as above. With it, a peer is a full Raft member (it can vote, append entries,
change the voter set, install a snapshot: rewrite the routing table), but it can no longer
make a node run code through pickle: a global outside the allow-list is refused.
"""

from __future__ import annotations

import errno
import hmac
import io
import logging
import pickle
import socket
import struct
import time
import zlib
from collections import Counter, OrderedDict
from typing import Callable

import pysyncobj.journal
import pysyncobj.pickle
from cryptography.fernet import InvalidToken
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, _getAddrType, set_keepalive
from pysyncobj.transport import TCPTransport

log = logging.getLogger("shoal.raftwire")

# -- the bounds ------------------------------------------------------------------------------

#: largest frame before the peer proved the secret on the connection: the handshake's
#: frames are a few hundred bytes (a 32-byte key, a "host:port", a utility command)
HANDSHAKE_FRAME_BYTES = 16 * 1024
#: largest frame after that (compressed and encrypted): room for one log entry of a very
#: large batch of routing operations (a follower forwards an entry whole)
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: largest message once decompressed
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: bytes one connection reads per poll event (then the others get their turn)
READ_BUDGET_BYTES = 1024 * 1024
#: seconds a connection has to prove the secret (the handshake is one round trip)
HANDSHAKE_DEADLINE = 2.5
#: connections not proved yet, per peer IP address and in all
MAX_PENDING_PER_ADDRESS = 16
MAX_PENDING = 256
#: the listener's backlog, and connections accepted per poll event
LISTEN_BACKLOG = 128
ACCEPTS_PER_EVENT = 64
#: seconds between two warning lines about one peer address
REJECT_LOG_INTERVAL = 30.0
#: peer addresses remembered for the rate limit of those lines
REJECT_LOG_ADDRESSES = 1024
#: seconds between two sweeps of the pending connections
SWEEP_INTERVAL = 0.1

_HEADER = struct.Struct("i")  # pysyncobj's: native byte order, signed
_KEY_BYTES = 32  # pysyncobj's random session key (os.urandom(32))


# -- the restricted unpickler ------------------------------------------------------------------

class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`ALLOWED_GLOBALS`."""


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as protocol 2 uses it for non-empty bytes, and nothing more."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise ForbiddenGlobal("_codecs.encode only makes bytes from latin-1 text here")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()`` as protocol 2 uses it for ``b""``, and nothing more (``bytes(n)``
    would allocate n bytes)."""
    if args:
        raise ForbiddenGlobal("bytes() takes no argument here")
    return b""


def _routing_tables():
    from .routing import Tables  # (routing imports this module)
    return Tables


#: (module, name) -> the object it resolves to (or, for _LATE, a function returning it).
#: Exactly what the cluster suites asked for (pysyncobj pickles with protocol 2, which
#: names builtins ``__builtin__``); anything else is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    # bytes, as protocol 2 writes them: _codecs.encode(text, "latin1"), and bytes() for b""
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    # Tables.routes values, and the voter set in a snapshot
    ("__builtin__", "set"): set,
    # pysyncobj's membership commands and its snapshots' voter set
    ("pysyncobj.node", "TCPNode"): TCPNode,
    # the routing table in a snapshot (RoutingState's only replicated attribute)
    ("cluster.routing", "Tables"): _routing_tables,
}
_LATE = frozenset({("cluster.routing", "Tables")})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (so no pickle can call
    ``os.system``, ``eval`` or any other function) and has no persistent ids."""

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in ALLOWED_GLOBALS:
            raise ForbiddenGlobal(f"global {module}.{name} is not allowed in Raft data")
        value = ALLOWED_GLOBALS[key]
        return value() if key in _LATE else value


def restricted_loads(data) -> object:
    if isinstance(data, str):  # (pysyncobj's shim accepts text too)
        data = data.encode("utf-8")
    return RestrictedUnpickler(io.BytesIO(data)).load()


def restricted_load(file) -> object:
    return RestrictedUnpickler(file).load()


restricted_loads.shoal_restricted = True
restricted_load.shoal_restricted = True


def install_restricted_unpickler() -> None:
    """Make every unpickling pysyncobj does (messages, log commands, snapshots from a peer
    or from disk, the journal's metadata) go through :class:`RestrictedUnpickler`.

    The one monkeypatch of this module, and idempotent: pysyncobj calls
    ``pysyncobj.pickle.loads``/``load`` through the module at every use (syncobj.py,
    serializer.py, tcp_connection.py), and journal.py imported ``loads`` by name."""
    pysyncobj.pickle.loads = restricted_loads
    pysyncobj.pickle.load = restricted_load
    pysyncobj.journal.loads = restricted_loads


def restricted_unpickler_installed() -> bool:
    return all(getattr(f, "shoal_restricted", False) for f in
               (pysyncobj.pickle.loads, pysyncobj.pickle.load, pysyncobj.journal.loads))


# -- one frame ---------------------------------------------------------------------------------

class FrameRejected(Exception):
    """A frame (or a connection) broke a rule of the wire; ``reason`` names which."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def frame_limit(trusted: bool) -> int:
    return MAX_FRAME_BYTES if trusted else HANDSHAKE_FRAME_BYTES


def check_length(length: int, trusted: bool) -> None:
    """The frame's length prefix, before any of its body is buffered."""
    limit = frame_limit(trusted)
    if length <= 0 or length > limit:
        raise FrameRejected("frame-length", f"{length} bytes, limit {limit}"
                            f"{'' if trusted else ' until the peer proves the secret'}")


def decode_body(body: bytes, encryptor, last_timestamp: int) -> tuple[object, int]:
    """A frame's body -> (message, its timestamp). Authenticates before anything else:
    a body not signed with the secret never reaches zlib or the unpickler."""
    try:
        timestamp = encryptor.extract_timestamp(body)  # (verifies the signature)
        data = encryptor.decrypt(body)
    except InvalidToken:
        raise FrameRejected("not-authentic", "not signed with the cluster secret") from None
    if timestamp < last_timestamp:
        raise FrameRejected("stale", "timestamp older than the previous frame's")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(data, MAX_MESSAGE_BYTES)
    except zlib.error as err:
        raise FrameRejected("bad-compression", str(err)) from None
    if inflate.unconsumed_tail:
        raise FrameRejected("message-size", f"over {MAX_MESSAGE_BYTES} bytes decompressed")
    try:
        message = restricted_loads(raw)
    except ForbiddenGlobal as err:
        raise FrameRejected("forbidden-global", str(err)) from None
    except Exception as err:  # a signed but malformed pickle: whatever it raised
        raise FrameRejected("bad-pickle", f"{type(err).__name__}: {err}") from None
    return message, timestamp


def encode_message(message, encryptor) -> bytes:
    """One frame, as pysyncobj writes it (so nodes of either version read it)."""
    data = zlib.compress(pysyncobj.pickle.dumps(message), 3)
    data = encryptor.encrypt_at_time(data, int(monotonic_time()))
    return _HEADER.pack(len(data)) + data


# -- the connection ----------------------------------------------------------------------------

class RaftConnection:
    """pysyncobj's ``TcpConnection`` (same interface and wire format) with the bounds of
    this module. Incoming connections come from :class:`RaftServer`; the transport makes
    one per partner for its outgoing connection (reused across reconnects)."""

    def __init__(self, poller, transport: "RaftTransport", sock: socket.socket | None = None,
                 peer: str | None = None, timeout: float = 10.0,
                 sendBufferSize: int = 2 ** 13, recvBufferSize: int = 2 ** 13,
                 keepalive=None) -> None:
        # what pysyncobj's transport reads and sets on a TcpConnection
        self.sendRandKey: bytes | None = None
        self.recvRandKey: bytes | None = None
        self.encryptor = None
        self.recvLastTimestamp = 0
        #: the peer proved the secret on this connection (frames may be large now)
        self.trusted = False
        self.peer = peer
        #: accepted by our listener (not one this node opened to a partner)
        self.incoming = sock is not None
        self.opened_at = monotonic_time()
        self._transport = transport
        self._poller = poller
        self._timeout = timeout
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._keepalive = keepalive
        self._read = bytearray()
        self._write = bytearray()
        self._last_read = monotonic_time()
        self._said_too_big = False
        self._on_message: Callable | None = None
        self._on_connected: Callable | None = None
        self._on_disconnected: Callable | None = None
        self._sock = sock
        if sock is not None:
            self._fileno = sock.fileno()
            self._state = CONNECTION_STATE.CONNECTED
            self._set_keepalive()
            self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ |
                                   POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        else:
            self._fileno = None
            self._state = CONNECTION_STATE.DISCONNECTED

    # pysyncobj's interface
    def setOnConnectedCallback(self, callback) -> None:
        self._on_connected = callback

    def setOnMessageReceivedCallback(self, callback) -> None:
        self._on_message = callback

    def setOnDisconnectedCallback(self, callback) -> None:
        self._on_disconnected = callback

    @property
    def state(self) -> int:
        return self._state

    def fileno(self):
        return self._fileno

    def getSendBufferSize(self) -> int:
        return len(self._write)

    def _set_keepalive(self) -> None:
        if self._sock is not None and self._keepalive is not None:
            set_keepalive(self._sock, *self._keepalive[:3])

    def connect(self, host, port) -> bool:
        if host is None:
            return False
        self._reset()
        self._state = CONNECTION_STATE.DISCONNECTED
        self._fileno = None
        self.peer = host
        sock = socket.socket(_getAddrType(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._set_keepalive()
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except OSError as err:
            if err.errno not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                self._sock = None
                return False
        self._fileno = sock.fileno()
        self._state = CONNECTION_STATE.CONNECTING
        self._transport._pending_opened(self)
        self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ |
                               POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        return True

    def _reset(self) -> None:
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.trusted = False
        self.opened_at = self._last_read = monotonic_time()
        self._read = bytearray()
        self._write = bytearray()

    def send(self, message) -> None:
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        frame = encode_message(message, self.encryptor)
        if len(frame) - _HEADER.size > MAX_FRAME_BYTES and not self._said_too_big:
            # the peer will refuse it and close: say why here, where it comes from (once
            # per connection)
            self._said_too_big = True
            log.warning("raft: sending a frame of %d bytes to %s, over MAX_FRAME_BYTES "
                        "(%d): the peer refuses it", len(frame) - _HEADER.size, self.peer,
                        MAX_FRAME_BYTES)
        self._write += frame
        self._try_send()

    def disconnect(self) -> None:
        notify = self._on_disconnected is not None and \
            self._state != CONNECTION_STATE.DISCONNECTED
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.trusted = False
        self._read = bytearray()
        self._write = bytearray()
        self._state = CONNECTION_STATE.DISCONNECTED
        if notify:
            self._on_disconnected()

    def reject(self, reason: str, detail: str = "") -> None:
        """Close for breaking a rule: counted and logged (rate-limited) by the transport."""
        if self._state == CONNECTION_STATE.DISCONNECTED:
            return
        self._transport._refused(self, reason, detail)
        self.disconnect()

    # the poller's callback
    def _on_event(self, descr, event) -> None:
        if descr != self._fileno:
            self._poller.unsubscribe(descr)
            return
        if event & POLL_EVENT_TYPE.ERROR:
            self.disconnect()
            return
        if self._timed_out():
            return
        if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return
        if self._state == CONNECTION_STATE.CONNECTING:
            if self._on_connected is not None:
                self._on_connected()
            if self._state == CONNECTION_STATE.DISCONNECTED:
                return
            self._state = CONNECTION_STATE.CONNECTED
            self._last_read = monotonic_time()
            return
        if event & POLL_EVENT_TYPE.WRITE:
            self._try_send()
            if self._state == CONNECTION_STATE.DISCONNECTED:
                return
            mask = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
            if self._write:
                mask |= POLL_EVENT_TYPE.WRITE
            self._poller.subscribe(descr, self._on_event, mask)
        if event & POLL_EVENT_TYPE.READ:
            self._read_frames()

    def _timed_out(self) -> bool:
        """pysyncobj's rule: nothing read for ``connectionTimeout`` seconds is a dead link."""
        if monotonic_time() - self._last_read > self._timeout:
            self.disconnect()
            return True
        return False

    def _try_send(self) -> None:
        # (a utility command's answer may come after its connection closed)
        if self._state == CONNECTION_STATE.DISCONNECTED or self._timed_out():
            return
        while self._write:
            try:
                sent = self._sock.send(self._write)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.disconnect()
                return
            if sent <= 0:
                return
            del self._write[:sent]

    def _read_frames(self) -> None:
        budget = READ_BUDGET_BYTES
        sock = self._sock  # (a callback that closes an outgoing link may reconnect it)
        while budget > 0 and self._sock is sock and \
                self._state != CONNECTION_STATE.DISCONNECTED:
            if self.trusted:
                want = self._recv_size
            else:  # never more than one handshake frame in the buffer
                want = _HEADER.size + HANDSHAKE_FRAME_BYTES - len(self._read)
            try:
                chunk = self._sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.disconnect()
                return
            if not chunk:
                self.disconnect()
                return
            self._last_read = monotonic_time()
            budget -= len(chunk)
            self._read += chunk
            self._parse()

    def _parse(self) -> None:
        buf, sock = self._read, self._sock
        while len(buf) >= _HEADER.size and self._sock is sock and \
                self._state != CONNECTION_STATE.DISCONNECTED:
            (length,) = _HEADER.unpack_from(buf)
            try:
                check_length(length, self.trusted)
            except FrameRejected as err:
                self.reject(err.reason, err.detail)
                return
            end = _HEADER.size + length
            if len(buf) < end:
                return
            body = bytes(buf[_HEADER.size:end])
            del buf[:end]
            try:
                message = self._decode(body)
            except FrameRejected as err:
                self.reject(err.reason, err.detail)
                return
            if self._on_message is not None:
                self._on_message(message)
            buf = self._read  # (a callback may have closed or reconnected it)

    def _decode(self, body: bytes):
        message, self.recvLastTimestamp = decode_body(body, self.encryptor,
                                                      self.recvLastTimestamp)
        if self.recvRandKey:
            if not (isinstance(message, tuple) and len(message) == 2 and
                    isinstance(message[0], bytes) and
                    hmac.compare_digest(message[0], self.recvRandKey)):
                raise FrameRejected("session-key", "not this connection's key")
            message = message[1]
            if not self.trusted:
                self.trusted = True
                self._transport._proved(self)
        return message


# -- the listener ------------------------------------------------------------------------------

class RaftServer:
    """pysyncobj's ``TcpServer`` with a real backlog, accepts drained per event, the peer's
    address kept, and an accept error that never closes the listener."""

    def __init__(self, poller, host: str, port, transport: "RaftTransport",
                 sendBufferSize: int, recvBufferSize: int, connectionTimeout: float,
                 keepalive=None) -> None:
        self._poller = poller
        self._host = host
        self._port = int(port)
        self._transport = transport
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._timeout = connectionTimeout
        self._keepalive = keepalive
        self._sock: socket.socket | None = None
        self._fileno = None

    def bind(self) -> None:
        sock = socket.socket(_getAddrType(self._host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._fileno = sock.fileno()
        self._poller.subscribe(self._fileno, self._on_event,
                               POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _on_event(self, descr, event) -> None:
        if self._sock is None:
            return
        if not event & POLL_EVENT_TYPE.READ:
            if event & POLL_EVENT_TYPE.ERROR:  # the listener itself failed: bind again
                log.warning("raft port: the listener on %s:%d failed; binding it again",
                            self._host, self._port)
                self.unbind()
                try:
                    self.bind()
                except OSError as err:
                    log.error("raft port: cannot bind %s:%d again (%s); retrying every "
                              "bindRetryTime", self._host, self._port, err)
                    self._transport._listener_lost()
            return
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # out of descriptors or buffers, or a connection reset before it was
                # accepted: the listener stays; pending connections make room
                self._transport._accept_failed(err)
                return
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:  # reset already: nothing to serve
                sock.close()
                continue
            conn = RaftConnection(self._poller, self._transport, sock=sock, peer=addr[0],
                                  timeout=self._timeout, sendBufferSize=self._send_size,
                                  recvBufferSize=self._recv_size, keepalive=self._keepalive)
            self._transport._onNewIncomingConnection(conn)


# -- the transport -----------------------------------------------------------------------------

class _RejectLog:
    """One warning line per peer address per ``interval`` seconds."""

    def __init__(self, interval: float, addresses: int) -> None:
        self.interval = interval
        self.addresses = addresses
        self._seen: OrderedDict[str, list] = OrderedDict()  # addr -> [last logged, more]

    def note(self, addr: str, reason: str, detail: str) -> None:
        now = time.monotonic()
        entry = self._seen.get(addr)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        more = entry[1] if entry is not None else 0
        self._seen[addr] = [now, 0]
        self._seen.move_to_end(addr)
        while len(self._seen) > self.addresses:
            self._seen.popitem(last=False)
        log.warning("raft port: closed a connection from %s: %s%s%s", addr, reason,
                    f" ({detail})" if detail else "",
                    f"; {more} more refused from it in the last {self.interval:.0f}s"
                    if more else "")


class RaftTransport(TCPTransport):
    """pysyncobj's TCP transport over :class:`RaftConnection` and :class:`RaftServer`,
    with the pending-connection limits and deadline of this module. Pass it as
    ``SyncObj(..., transportClass=RaftTransport)``; needs ``SyncObjConf(password=...)``."""

    def __init__(self, syncObj, selfNode, otherNodes) -> None:
        if syncObj.encryptor is None:
            raise ValueError("the Raft transport needs the cluster secret "
                             "(SyncObjConf(password=...))")
        #: connections that have not proved the secret yet, oldest first
        self._pending: OrderedDict[RaftConnection, None] = OrderedDict()
        self._next_sweep = 0.0
        #: connections closed, by reason (read from other threads: a Counter copy)
        self.refused: Counter[str] = Counter()
        self._reject_log = _RejectLog(REJECT_LOG_INTERVAL, REJECT_LOG_ADDRESSES)
        super().__init__(syncObj, selfNode, otherNodes)

    # -- TCPTransport, with our classes
    def _createServer(self) -> None:
        conf = self._syncObj.conf
        bind_addr = conf.bindAddress
        self_addr = getattr(self._selfNode, "address")
        if bind_addr is not None:
            host, port = bind_addr.rsplit(":", 1)
        elif self_addr is not None:
            host, port = self_addr.rsplit(":", 1)
            host = "::" if ":" in host else "0.0.0.0"
        else:
            raise RuntimeError("Unable to determine bind address")
        if host not in ("0.0.0.0", "::"):
            host = globalDnsResolver().resolve(host)
        self._server = RaftServer(self._syncObj._poller, host, port, self,
                                  sendBufferSize=conf.sendBufferSize,
                                  recvBufferSize=conf.recvBufferSize,
                                  connectionTimeout=conf.connectionTimeout,
                                  keepalive=conf.tcp_keepalive)

    def addNode(self, node) -> None:
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            conn = RaftConnection(self._syncObj._poller, self, timeout=conf.connectionTimeout,
                                  sendBufferSize=conf.sendBufferSize,
                                  recvBufferSize=conf.recvBufferSize,
                                  keepalive=conf.tcp_keepalive)
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(lambda: self._onOutgoingConnected(conn))
            conn.setOnMessageReceivedCallback(lambda m: self._onMessageReceived(node, m))
            conn.setOnDisconnectedCallback(lambda: self._onDisconnected(conn))
            self._connections[node] = conn

    def _onNewIncomingConnection(self, conn: RaftConnection) -> None:
        self._pending_opened(conn)
        super()._onNewIncomingConnection(conn)

    def destroy(self) -> None:
        super().destroy()
        for conn in list(self._pending):
            conn.disconnect()
        self._pending.clear()

    def _onTick(self) -> None:
        super()._onTick()
        now = monotonic_time()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep(now)

    # -- what each message may be
    def _onIncomingMessageReceived(self, conn, message) -> None:
        if not conn.sendRandKey:
            if not (isinstance(message, bytes) and len(message) == _KEY_BYTES):
                conn.reject("handshake", "the first message is not a session key")
                return
        elif isinstance(message, list):
            # (pysyncobj's utility commands: status, add, remove, set_version, transfer)
            if not (message and isinstance(message[0], str) and
                    message[0] in self._onUtilityMessageCallbacks):
                conn.reject("handshake", "not a utility command")
                return
        elif not isinstance(message, str):
            conn.reject("handshake", f"a {type(message).__name__} instead of a node address")
            return
        super()._onIncomingMessageReceived(conn, message)

    def _onOutgoingMessageReceived(self, conn, message) -> None:
        if not conn.sendRandKey and not (isinstance(message, bytes) and
                                         len(message) == _KEY_BYTES):
            conn.reject("handshake", "the answer is not a session key")
            return
        super()._onOutgoingMessageReceived(conn, message)

    def _onMessageReceived(self, node, message) -> None:
        if not (isinstance(message, dict) and isinstance(message.get("type"), str)):
            conn = self._connections.get(node)
            if conn is not None:
                conn.reject("message", f"a {type(message).__name__} instead of a Raft message")
            return
        super()._onMessageReceived(node, message)

    # -- pending connections (called by RaftConnection and RaftServer)
    def _pending_opened(self, conn: RaftConnection) -> None:
        """A connection opened: it has HANDSHAKE_DEADLINE to prove the secret. An incoming
        one may push the oldest incoming one of its address (or of all) out; the few this
        node opens to its partners count against no limit (an attacker sharing a
        partner's address must not be able to evict them)."""
        self._pending.pop(conn, None)
        self._pending[conn] = None
        if not conn.incoming:
            return
        self._prune()
        same = [c for c in self._pending if c.incoming and c.peer == conn.peer]
        for old in same[:max(0, len(same) - MAX_PENDING_PER_ADDRESS)]:
            old.reject("pending-limit", f"over {MAX_PENDING_PER_ADDRESS} unproved "
                       f"connections from one address")
        incoming = [c for c in self._pending if c.incoming]
        for old in incoming[:max(0, len(incoming) - MAX_PENDING)]:
            old.reject("pending-limit", f"over {MAX_PENDING} unproved connections")

    def _proved(self, conn: RaftConnection) -> None:
        self._pending.pop(conn, None)

    def _prune(self) -> None:
        for conn in [c for c in self._pending
                     if c.trusted or c.state == CONNECTION_STATE.DISCONNECTED]:
            del self._pending[conn]

    def _sweep(self, now: float) -> None:
        self._prune()
        while self._pending:
            conn = next(iter(self._pending))
            if now - conn.opened_at < HANDSHAKE_DEADLINE:
                break
            del self._pending[conn]
            conn.reject("handshake-deadline",
                        f"no proof of the secret within {HANDSHAKE_DEADLINE:g}s")

    def _refused(self, conn: RaftConnection, reason: str, detail: str) -> None:
        self._pending.pop(conn, None)
        self.refused[reason] += 1
        self._reject_log.note(conn.peer or "?", reason, detail)

    def _listener_lost(self) -> None:
        # not ready: TCPTransport._maybeBind binds again at a later tick (pysyncobj pauses
        # Raft until then, as at start)
        self._ready = False

    def _accept_failed(self, err: OSError) -> None:
        self.refused["accept-error"] += 1
        self._reject_log.note("(listener)", "accept failed", err.strerror or str(err))
        if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._prune()
            incoming = [c for c in self._pending if c.incoming]
            if incoming:  # make room: the oldest unproved connection goes
                incoming[0].reject("pending-limit", "out of descriptors")
