"""Node-to-node links: authenticated, encrypted, length-prefixed msgpack frames over TCP,
one link per peer pair (link protocol version 2).

Keys
----
Once per ``Transport``: ``K = scrypt(secret, salt = "shoal-link-2" || cluster_name,
n = 2**14, r = 8, p = 1, 32 bytes)`` (about 45 ms and 16 MiB: whoever records a handshake
pays that much per guess of the secret; a different cluster name gives a different key).
Per link, from the two handshake nonces: ``HKDF-SHA256(K, salt = nA || nD, info =
"shoal-link-2 frame keys", 64 bytes)``; the first 32 bytes key the dialler -> acceptor
direction, the last 32 the acceptor -> dialler one.

Wire format
-----------
Every frame, handshake included, is a 4-byte big-endian body length followed by the body.
The first three frames are in clear (``v`` is the byte 2, ``nA``/``nD`` 32 random bytes,
proofs are ``HMAC-SHA256(K, "shoal-link-2" || role || nA || nD)`` with role ``D`` or
``A``)::

    acceptor -> dialler   CHALLENGE  v || nA                       (33 bytes)
    dialler  -> acceptor  ANSWER     v || nD || proof_D            (65 bytes)
    acceptor -> dialler   PROOF      proof_A                       (32 bytes)

Every later frame is sealed: its body is ``ChaCha20-Poly1305(key of its direction, nonce =
the direction's frame counter as 12 big-endian bytes, associated data = the 4-byte length
header)`` of a msgpack list whose first element is the frame type (so the length counts the
16-byte tag). Counters start at 0 for each direction of each link; a frame that fails
authentication (altered, dropped, replayed, reordered, or not sealed by the peer) closes
the link with one warning, and the dialler links again as after any link loss. The length
is checked against ``max_frame`` (+ 16) before the body is read. A link is closed (and
dialled again, with new keys) before a counter reaches ``MAX_LINK_FRAMES``, so a nonce is
never used twice under a key (the handshake's sealed frames are counters 0 and 1)::

    dialler  -> acceptor  [HELLO, {v, node_id, cluster, inc, info}]
    acceptor -> dialler   [HELLO, {v, node_id, cluster, inc, info, known_inc, rx}]
    dialler  -> acceptor  [SYNC,  {known_inc, rx}]
    either way            [DATA,  ack, first_seq, [msg, msg, ...]]   numbered messages + ack
    either way            [ACK,   ack]                               ack only; the keepalive

A message is ``[MSG, kind, body]``, ``[REQ, kind, body, id, timeout]``,
``[RESP, id, ok, result_or_error_text]`` or ``[VOID]`` (a message that could not be
encoded: it keeps its sequence number so the stream has no gap).

Handshake
---------
The accepting node sends nothing but the random challenge until the dialler has proved
the secret: the dialler answers with its nonce and ``proof_D`` (and, in the same write,
its HELLO, sealed); the acceptor checks ``proof_D`` in constant time, closes the
connection if it is wrong, and only then sends ``proof_A``; the dialler checks it (constant
time) before it reads anything else. Then the acceptor reads the sealed HELLO (cluster
name, not our own node id), answers with its own (its node id, incarnation: a random id
per ``Transport`` instance, ``info``, and ``known_inc``/``rx``: the incarnation of the
dialler our receive state belongs to and the last sequence number delivered from it); the
dialler checks it (the node id it dialled, if it knew one) and answers SYNC with the same
two fields about the acceptor. The dialler's link is up once SYNC is written, the
acceptor's once it is read. Until the dialler's proof checks out, the acceptor has sent 33
bytes of which 32 are random: its proof, node id, cluster name, addresses (``info``) and
incarnation go only to a dialler that proved the secret. (The dialler proves first, so
whoever it dials can record its proof: guessing the secret from it costs one scrypt per
guess.)

Unproven connections: an accepted connection whose dialler has not proved the secret
within ``UNPROVEN_TIMEOUT`` (2 s) is closed; at most ``MAX_UNPROVEN_PER_SOURCE`` (8) per
source address and ``MAX_UNPROVEN`` (64) in all are kept, and past either limit the
oldest one goes (new connections are never refused, so silent connections cannot keep a
real peer out: its proof comes one round trip after its connect). The rest of the
handshake has ``HANDSHAKE_TIMEOUT``. Refusals are counted in ``stats``
(``handshakes_refused``: ``bad_proofs``, ``malformed_handshakes``, ``handshake_timeouts``,
``handshakes_evicted``) and logged at most once per kind every ``REFUSAL_LOG_EVERY``
seconds.

Reliability: messages to a peer are numbered 1, 2, ... and stay in a retransmit buffer
until the peer acknowledges them (cumulative ack). A new link retransmits everything after
the ``rx`` the peer's handshake carries; the receiver drops what it already delivered. When
a peer's incarnation changes (it restarted) both sides restart numbering; what the old
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
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("shoal.transport")

__all__ = ["PeerUnreachable", "RequestTimeout", "RemoteError", "Transport"]

# frame types (first element of a sealed frame's body)
F_HELLO, F_SYNC, F_DATA, F_ACK = 0, 1, 2, 3
# message types (first element of a message inside a DATA frame)
M_MSG, M_REQ, M_RESP, M_VOID = 0, 1, 2, 3

PROTOCOL_VERSION = 2
MAC_LABEL = b"shoal-link-2"            # proofs: HMAC(key, MAC_LABEL || role || nA || nD)
KDF_SALT = b"shoal-link-2"             # long-term key: scrypt(secret, KDF_SALT || cluster)
KEYS_INFO = b"shoal-link-2 frame keys"  # per-link keys: HKDF(key, nA || nD, KEYS_INFO)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1  # about 45 ms and 16 MiB per derivation
NONCE_LEN = 32
PROOF_LEN = 32                          # HMAC-SHA256
TAG_LEN = 16                            # Poly1305
CHALLENGE_LEN = 1 + NONCE_LEN           # version, nA
ANSWER_LEN = 1 + NONCE_LEN + PROOF_LEN  # version, nD, the dialler's proof


def derive_key(secret: bytes, cluster_name: str) -> bytes:
    """The long-term link key: slow on purpose (each guess of a secret from a recorded
    handshake costs one scrypt)."""
    return hashlib.scrypt(secret, salt=KDF_SALT + cluster_name.encode(), n=SCRYPT_N,
                          r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20, dklen=32)


class PeerUnreachable(Exception):
    """No link to the peer within the deadline, the peer is unknown, or it restarted."""


class RequestTimeout(Exception):
    """The peer is linked but did not answer the request before its deadline."""


class RemoteError(Exception):
    """The peer's request handler raised; the message carries its text."""


class _HandshakeError(Exception):
    pass


class _BadProof(_HandshakeError):
    """The dialler's proof is wrong: it does not hold the cluster secret (or name)."""


class _ProtocolError(Exception):
    pass


def _clear(body: bytes) -> bytes:
    """A handshake frame sent before the keys exist (challenge and proofs)."""
    return len(body).to_bytes(4, "big") + body


class _Cipher:
    """One link's two ChaCha20-Poly1305 keys and frame counters (one per direction).

    A frame's nonce is its counter (96 bits, big-endian), its associated data the 4-byte
    length header; a counter is never reused under its key (the keys are new per link)."""

    __slots__ = ("tx", "rx", "tx_ctr", "rx_ctr")

    def __init__(self, tx_key: bytes, rx_key: bytes) -> None:
        self.tx = ChaCha20Poly1305(tx_key)
        self.rx = ChaCha20Poly1305(rx_key)
        self.tx_ctr = 0
        self.rx_ctr = 0

    def seal(self, body: bytes) -> bytes:
        """The whole frame: length header (of ciphertext + tag), ciphertext, tag."""
        hdr = (len(body) + TAG_LEN).to_bytes(4, "big")
        ctr = self.tx_ctr
        self.tx_ctr = ctr + 1
        return hdr + self.tx.encrypt(ctr.to_bytes(12, "big"), body, hdr)

    def open(self, hdr: bytes, data: bytes) -> bytes:
        """The body of the next frame from the peer; raises InvalidTag if it was altered,
        replayed, reordered or not sealed by the peer."""
        ctr = self.rx_ctr
        self.rx_ctr = ctr + 1
        return self.rx.decrypt(ctr.to_bytes(12, "big"), data, hdr)


class _Unproven:
    """An inbound connection whose dialler has not proved the secret yet."""

    __slots__ = ("writer", "source", "evicted")

    def __init__(self, writer, source: str) -> None:
        self.writer = writer
        self.source = source
        self.evicted: tuple[str, str] | None = None  # (kind, why) once dropped for room


class _Link:
    """One authenticated TCP connection to a peer."""

    __slots__ = ("peer_id", "reader", "writer", "tr", "direction", "task", "drain_task",
                 "last_read", "last_write", "paused", "closed", "up_at", "chunk", "sockname",
                 "peername", "cipher", "why")

    def __init__(self, peer_id: str, reader, writer, direction: str, cipher: _Cipher) -> None:
        self.peer_id = peer_id
        self.reader = reader
        self.writer = writer
        self.cipher = cipher
        self.why: str | None = None  # why this side closed it (for the link-down line)
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
    HANDSHAKE_TIMEOUT = 5.0   # a whole handshake (the dialler's, and an accepted one's)
    UNPROVEN_TIMEOUT = 2.0    # accepted connection: from accept to the dialler's proof
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
    MAX_UNPROVEN = 64         # accepted connections not proven yet; past it the oldest goes
    MAX_UNPROVEN_PER_SOURCE = 8  # ... from one source address; past it its oldest goes
    REFUSAL_LOG_EVERY = 10.0  # at most one warning per kind of refusal this often
    LISTEN_BACKLOG = 512
    ACCEPT_READ_LIMIT = 64 << 10  # StreamReader limit of accepted connections (memory bound)
    MAX_LINK_FRAMES = 1 << 40  # frames one way on one link; then the link is replaced
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
        # (once per Transport: the slow KDF is what makes guessing from a recording costly)
        self._key = derive_key(bytes(secret), cluster_name)
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
        self._unproven: dict[_Unproven, None] = {}  # oldest first
        self._quiet: dict[str, tuple[float, int]] = {}  # refusal kind -> (last warned, since)
        self._server: asyncio.AbstractServer | None = None
        self._tick_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ack_every = max(1, min(4096, queue_limit // 4))
        self._drain_level = max(1, queue_limit // 2)
        self.stats = {"links_up": 0, "links_down": 0, "dials": 0, "dial_failures": 0,
                      "accepts": 0, "handshake_failures": 0, "frames_out": 0, "frames_in": 0,
                      "msgs_out": 0, "msgs_in": 0, "retransmitted": 0, "dropped_restart": 0,
                      "dropped_unencodable": 0, "duplicates": 0,
                      # accepted connections closed before their dialler proved the secret
                      # (sum of the four below)
                      "handshakes_refused": 0, "bad_proofs": 0, "malformed_handshakes": 0,
                      "handshake_timeouts": 0, "handshakes_evicted": 0,
                      # frames that failed authentication on a link (each closed the link)
                      "auth_failures": 0, "links_retired": 0}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await asyncio.start_server(self._on_accept, self.host, self.port,
                                                  limit=self.ACCEPT_READ_LIMIT,
                                                  backlog=self.LISTEN_BACKLOG)
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
        for pending in list(self._unproven):
            pending.writer.transport.abort()
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
        cipher = link.cipher
        wrote = 0
        while pending and wrote < budget:
            if cipher.tx_ctr >= self.MAX_LINK_FRAMES:
                self._retire(st, link)
                return
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
            tr.write(cipher.seal(body))
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
        if link.cipher.tx_ctr >= self.MAX_LINK_FRAMES:
            self._retire(st, link)
            return
        body = self._pack([F_ACK, st.rx_last])
        st.ack_sent = st.rx_last
        link.tr.write(link.cipher.seal(body))
        link.last_write = time.monotonic()
        self.stats["frames_out"] += 1

    def _retire(self, st: _Peer, link: _Link) -> None:
        """The link sent MAX_LINK_FRAMES frames: close it (after what it has written) before
        its frame counter could repeat; the dialler links again with new keys and what was
        not acknowledged is sent again there."""
        self.stats["links_retired"] += 1
        link.why = f"retired after {link.cipher.tx_ctr} frames (new keys on the next link)"
        log.info("link retired node=%s peer=%s: %s", self.node_id, st.id, link.why)
        self._close_link(link, graceful=True)

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
        cipher = link.cipher
        max_wire = self.max_frame + TAG_LEN
        max_frames = self.MAX_LINK_FRAMES
        reason = "closed by peer"
        try:
            while True:
                hdr = await reader.readexactly(4)
                n = int.from_bytes(hdr, "big")
                if n > max_wire or n < TAG_LEN:  # checked before the body is read
                    reason = f"frame of {n} bytes (max_frame {self.max_frame} + {TAG_LEN})"
                    log.warning("link closed node=%s peer=%s: %s", self.node_id, st.id, reason)
                    break
                data = await reader.readexactly(n)
                if link.closed:
                    break
                if cipher.rx_ctr >= max_frames:
                    raise _ProtocolError(f"peer sent more than {max_frames} frames on a link")
                try:
                    body = cipher.open(hdr, data)
                except InvalidTag:
                    self.stats["auth_failures"] += 1
                    reason = (f"frame {cipher.rx_ctr - 1} ({n} bytes) failed authentication: "
                              "altered on the way or not sealed by the peer")
                    log.warning("link closed node=%s peer=%s: %s", self.node_id, st.id, reason)
                    break
                link.last_read = time.monotonic()
                self.stats["frames_in"] += 1
                self._on_frame(st, link, msgpack.unpackb(body, raw=False, strict_map_key=False))
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError) as err:
            reason = repr(err)
        except (_ProtocolError, msgpack.UnpackException, ValueError, TypeError, IndexError,
                KeyError) as err:
            reason = f"protocol error: {err!r}"
            log.warning("link closed node=%s peer=%s: %s", self.node_id, st.id, reason)
        finally:
            if link.why is not None:
                reason = link.why
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
        source = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if self._stopping:
            writer.transport.abort()
            return
        self.stats["accepts"] += 1
        pending = _Unproven(writer, source)
        self._admit(pending)
        proven = False
        try:
            async with asyncio.timeout(self.UNPROVEN_TIMEOUT) as deadline:
                cipher = await self._accept_proof(reader, writer)
                proven = True
                self._unproven.pop(pending, None)
                deadline.reschedule(self._loop.time() + self.HANDSHAKE_TIMEOUT)
                peer_id, hello, sync = await self._accept_hello(reader, writer, cipher)
        except (_HandshakeError, TimeoutError, ConnectionError, OSError,
                asyncio.IncompleteReadError) as err:
            writer.transport.abort()
            self.stats["handshake_failures"] += 1
            if proven:
                log.warning("inbound handshake failed node=%s from=%s: %s", self.node_id,
                            peername, err or "timed out")
            else:
                self._refused(pending, peername, err)
            return
        finally:
            self._unproven.pop(pending, None)
        if self._stopping:
            writer.transport.abort()
            return
        self._adopt(peer_id, hello, sync, cipher, reader, writer, "in")

    def _admit(self, new: _Unproven) -> None:
        """Make room for an accepted connection that has not proved anything yet: past the
        per-source limit the oldest unproven connection of that source goes, past the global
        one the oldest of all (new connections are never refused, so connections that
        stay silent cannot lock a real peer out; each goes at UNPROVEN_TIMEOUT anyway)."""
        same = [p for p in self._unproven if p.source == new.source]
        if len(same) >= self.MAX_UNPROVEN_PER_SOURCE:
            self._evict(same[0], "evicted_source", f"{self.MAX_UNPROVEN_PER_SOURCE} unproven "
                                                   f"connections from {new.source} at most")
        elif len(self._unproven) >= self.MAX_UNPROVEN:
            self._evict(next(iter(self._unproven)), "evicted",
                        f"{self.MAX_UNPROVEN} unproven connections at most")
        self._unproven[new] = None

    def _evict(self, pending: _Unproven, kind: str, why: str) -> None:
        del self._unproven[pending]
        pending.evicted = (kind, why)
        pending.writer.transport.abort()  # its handshake then fails and counts as evicted

    def _refused(self, pending: _Unproven, peername, err: BaseException) -> None:
        """Count (and log, at most once per kind and REFUSAL_LOG_EVERY) an accepted
        connection closed before its dialler proved the secret."""
        if pending.evicted is not None:
            kind, why = pending.evicted
            stat, why = "handshakes_evicted", f"dropped: {why}"
        elif isinstance(err, TimeoutError):
            kind, stat = "timeout", "handshake_timeouts"
            why = f"no proof within {self.UNPROVEN_TIMEOUT:g}s"
        elif isinstance(err, _BadProof):
            kind, stat, why = "bad_proof", "bad_proofs", str(err)
        elif isinstance(err, _HandshakeError):
            kind, stat, why = "malformed", "malformed_handshakes", str(err)
        else:  # the caller went away before proving anything (a port check, say)
            log.debug("inbound connection closed before its proof node=%s from=%s: %r",
                      self.node_id, peername, err)
            return
        self.stats[stat] += 1
        self.stats["handshakes_refused"] += 1
        now = time.monotonic()
        last, since = self._quiet.get(kind, (float("-inf"), 0))
        if now - last < self.REFUSAL_LOG_EVERY:
            self._quiet[kind] = (last, since + 1)
            return
        self._quiet[kind] = (now, 0)
        more = f" (and {since} more like it in {now - last:.0f}s)" if since else ""
        log.warning("inbound connection refused node=%s from=%s: %s%s", self.node_id,
                    peername, why, more)

    async def _dial(self, host: str, port: int, expect: str | None, timeout: float) -> _Peer:
        self.stats["dials"] += 1
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                peer_id, hello, sync, cipher = await self._dial_handshake(reader, writer,
                                                                          expect)
        except BaseException as err:
            if isinstance(err, _HandshakeError):
                self.stats["handshake_failures"] += 1
            if writer is not None:
                writer.transport.abort()
            raise
        if self._stopping:
            writer.transport.abort()
            raise PeerUnreachable("transport stopped")
        return self._adopt(peer_id, hello, sync, cipher, reader, writer, "out")

    # -- internals: the handshake ------------------------------------------------------

    def _proof(self, role: bytes, nonce_a: bytes, nonce_d: bytes) -> bytes:
        return hmac.new(self._key, MAC_LABEL + role + nonce_a + nonce_d,
                        hashlib.sha256).digest()

    def _cipher(self, role: bytes, nonce_a: bytes, nonce_d: bytes) -> _Cipher:
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=nonce_a + nonce_d,
                    info=KEYS_INFO).derive(self._key)
        d_to_a, a_to_d = keys[:32], keys[32:]
        return _Cipher(d_to_a, a_to_d) if role == b"D" else _Cipher(a_to_d, d_to_a)

    def _hello(self) -> dict:
        return {"v": PROTOCOL_VERSION, "node_id": self.node_id, "cluster": self.cluster_name,
                "inc": self.incarnation, "info": self.info}

    async def _read_clear(self, reader: asyncio.StreamReader, size: int, what: str) -> bytes:
        n = int.from_bytes(await reader.readexactly(4), "big")
        if n != size:
            raise _HandshakeError(f"{what} of {n} bytes, not {size} (not a node link of "
                                  f"protocol version {PROTOCOL_VERSION}?)")
        return await reader.readexactly(n)

    async def _read_sealed(self, reader: asyncio.StreamReader, cipher: _Cipher, tag: int,
                           what: str) -> dict:
        hdr = await reader.readexactly(4)
        n = int.from_bytes(hdr, "big")
        if not TAG_LEN <= n <= min(self.max_frame, self.HANDSHAKE_FRAME_MAX) + TAG_LEN:
            raise _HandshakeError(f"{what} frame of {n} bytes")
        data = await reader.readexactly(n)
        try:
            body = cipher.open(hdr, data)
        except InvalidTag:
            raise _HandshakeError(f"{what} frame failed authentication") from None
        try:
            frame = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (msgpack.UnpackException, ValueError) as err:
            raise _HandshakeError(f"undecodable {what} frame: {err}") from None
        if not (isinstance(frame, list) and len(frame) == 2 and frame[0] == tag
                and isinstance(frame[1], dict)):
            raise _HandshakeError(f"expected a {what} frame, got something else")
        return frame[1]

    def _check_hello(self, theirs: dict, expect: str | None) -> str:
        peer_id = theirs.get("node_id")
        peer_inc = theirs.get("inc")
        if theirs.get("v") != PROTOCOL_VERSION:
            raise _HandshakeError(f"peer {peer_id!r} speaks link protocol {theirs.get('v')!r}")
        if theirs.get("cluster") != self.cluster_name:
            raise _HandshakeError(f"wrong cluster name {theirs.get('cluster')!r} "
                                  f"(peer {peer_id!r}, ours {self.cluster_name!r})")
        if not (isinstance(peer_id, str) and 0 < len(peer_id) <= 256
                and isinstance(peer_inc, str) and len(peer_inc) <= 64):
            raise _HandshakeError("malformed HELLO")
        if peer_id == self.node_id:
            raise _HandshakeError(f"peer claims our own node id {peer_id!r}")
        if expect is not None and peer_id != expect:
            raise _HandshakeError(f"dialled {expect!r} but {peer_id!r} answered")
        return peer_id

    def _sync_for(self, peer_id: str, peer_inc: str) -> dict:
        """What we tell the peer about its messages: the last we delivered, if our receive
        state belongs to this very process of the peer."""
        st = self._peers.get(peer_id)
        if st is not None and st.inc == peer_inc:
            return {"known_inc": peer_inc, "rx": st.rx_last}
        return {"known_inc": None, "rx": 0}

    @staticmethod
    def _check_sync(sync: dict) -> None:
        rx, known = sync.get("rx"), sync.get("known_inc")
        if not (isinstance(rx, int) and rx >= 0 and (known is None or isinstance(known, str))):
            raise _HandshakeError("malformed SYNC")

    async def _accept_proof(self, reader, writer) -> _Cipher:
        """Accepting side, before anything about this node is sent: a random challenge,
        then the dialler's proof; only once it checks out, our own proof."""
        nonce_a = secrets.token_bytes(NONCE_LEN)
        writer.write(_clear(bytes([PROTOCOL_VERSION]) + nonce_a))
        answer = await self._read_clear(reader, ANSWER_LEN, "proof")
        if answer[0] != PROTOCOL_VERSION:
            raise _BadProof(f"link protocol version {answer[0]}, ours {PROTOCOL_VERSION}")
        nonce_d, proof = answer[1:1 + NONCE_LEN], answer[1 + NONCE_LEN:]
        if not hmac.compare_digest(proof, self._proof(b"D", nonce_a, nonce_d)):
            raise _BadProof("wrong proof of the cluster secret (another secret or cluster "
                            "name?)")
        writer.write(_clear(self._proof(b"A", nonce_a, nonce_d)))
        return self._cipher(b"A", nonce_a, nonce_d)

    async def _accept_hello(self, reader, writer, cipher: _Cipher) -> tuple[str, dict, dict]:
        theirs = await self._read_sealed(reader, cipher, F_HELLO, "HELLO")
        peer_id = self._check_hello(theirs, None)
        ours = {**self._hello(), **self._sync_for(peer_id, theirs["inc"])}
        writer.write(cipher.seal(self._pack([F_HELLO, ours])))
        sync = await self._read_sealed(reader, cipher, F_SYNC, "SYNC")
        self._check_sync(sync)
        return peer_id, theirs, sync

    async def _dial_handshake(self, reader, writer,
                              expect: str | None) -> tuple[str, dict, dict, _Cipher]:
        """Dialling side: prove the secret first (with our HELLO sealed behind the proof),
        then check the node's proof, read its HELLO, answer with SYNC."""
        challenge = await self._read_clear(reader, CHALLENGE_LEN, "challenge")
        if challenge[0] != PROTOCOL_VERSION:
            raise _HandshakeError(f"the node speaks link protocol version {challenge[0]}, "
                                  f"this one {PROTOCOL_VERSION}")
        nonce_a = challenge[1:]
        nonce_d = secrets.token_bytes(NONCE_LEN)
        cipher = self._cipher(b"D", nonce_a, nonce_d)
        writer.write(_clear(bytes([PROTOCOL_VERSION]) + nonce_d
                            + self._proof(b"D", nonce_a, nonce_d))
                     + cipher.seal(self._pack([F_HELLO, self._hello()])))
        try:
            proof = await self._read_clear(reader, PROOF_LEN, "proof")
        except asyncio.IncompleteReadError:
            raise _HandshakeError("the node closed the connection after our proof: it "
                                  "refused it (another cluster secret or name?)") from None
        if not hmac.compare_digest(proof, self._proof(b"A", nonce_a, nonce_d)):
            raise _HandshakeError("wrong proof from the node (another cluster secret or name?)")
        theirs = await self._read_sealed(reader, cipher, F_HELLO, "HELLO")
        peer_id = self._check_hello(theirs, expect)
        self._check_sync(theirs)
        writer.write(cipher.seal(self._pack([F_SYNC, self._sync_for(peer_id, theirs["inc"])])))
        return peer_id, theirs, theirs, cipher

    def _adopt(self, peer_id: str, hello: dict, auth: dict, cipher: _Cipher, reader, writer,
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
        link = _Link(peer_id, reader, writer, direction, cipher)
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
