"""Issue 13, item 7: the Raft port (cluster/raftwire.py).

Against real node processes: garbage streamed at a node's Raft port costs it no memory,
no election and no traceback; a huge length prefix is refused on sight; silent sockets
are dropped and do not keep a restarted node out; a frame not signed with the cluster
secret is dropped before anything reads it, and one signed with it but carrying a
forbidden pickle global is refused without running it. Then the same rules on the
decoding functions themselves (no processes).

Frames here are built by hand from pysyncobj's wire format (4-byte length, Fernet token
of zlib of a protocol-2 pickle), not with cluster/raftwire.py's encoder. A node logs one
warning line per peer address per 30 s: the tests that read those lines connect from
their own loopback address (127.0.0.x) so that each sees its own line."""

from __future__ import annotations

import errno
import os
import pickle
import random
import select
import socket
import struct
import threading
import time
import uuid
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor

from support import Prop, RawClient, holds_for, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXPIRY = {Prop.SESSION_EXPIRY_INTERVAL: 600}
MiB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------

def uid() -> str:
    return uuid.uuid4().hex[:8]


def raft_state(cluster) -> dict:
    """node_id -> (term, leader, leader_changes) as GET /api/v1/cluster shows them."""
    out = {}
    for node in cluster.running():
        view = node.cluster_view()
        out[node.node_id] = (view["term"], view["leader"], view["leader_changes"])
    return out


def settled_raft_state(cluster) -> dict:
    """:func:`raft_state` once every node has counted the leader it found at start (a
    node samples its leader once per second; the first sample counts as a change)."""
    wait_for(lambda: all(state[2] >= 1 for state in raft_state(cluster).values()), 10.0,
             message=lambda: f"every node to have seen its leader: {raft_state(cluster)}")
    return raft_state(cluster)


def claims(node, client_id: str) -> bool:
    """A persistent session claimed on ``node`` (a Raft commit) answers CONNACK 0."""
    c = RawClient(node.host, node.port, 5, timeout=10.0)
    try:
        return c.connect(client_id, clean_start=False, properties=EXPIRY).reason_code == 0
    finally:
        c.close()


def raft_socket(node, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect((node.host, node.raft_port))
    return s


def frame(obj, secret: str) -> bytes:
    """One frame as pysyncobj writes it."""
    token = getEncryptor(secret).encrypt_at_time(zlib.compress(pickle.dumps(obj, 2), 3),
                                                 int(time.monotonic()))
    return struct.pack("i", len(token)) + token


def read_frame(s: socket.socket, secret: str):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            assert chunk, "the node closed the connection"
            data += chunk
        return data
    (length,) = struct.unpack("i", exactly(4))
    # (the node's answer: trusted here, plain pickle)
    return pickle.loads(zlib.decompress(getEncryptor(secret).decrypt(exactly(length))))


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the node closes ``s`` within ``timeout`` (EOF or reset)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def refusals(node, reason: str) -> list[str]:
    text = node.log_path.read_text(errors="replace")
    return [line for line in text.splitlines()
            if "raft port: closed a connection" in line and reason in line]


def assert_no_traceback(nodes) -> None:
    for node in nodes:
        text = node.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{node.node_id} logged a traceback:\n{node.log_tail(80)}"


class Marked:
    """Unpickling it runs ``touch path`` (os.system): what the restricted unpickler must
    refuse."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# -- garbage ---------------------------------------------------------------------------------

def random_block() -> bytes:
    return os.urandom(4 * MiB)


def framed_block() -> bytes:
    """Frames of the largest length a node takes before the secret is proved (16 KiB),
    with random bodies: each one is read whole and fails the signature check."""
    body = 16 * 1024
    return b"".join(struct.pack("i", body) + os.urandom(body) for _ in range(256))


def stream_garbage(host: str, port: int, block: bytes, step: int, total: int,
                   deadline: float, result: dict) -> None:
    """Send ``total`` bytes of ``block`` (from a random multiple of ``step``, wrapping
    round) to host:port as fast as the other side takes them, on as many connections as
    it takes (the node closes each one it refuses)."""
    rng = random.Random()
    sent = conns = 0
    while sent < total and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # a small send buffer: what counts as sent is close to what reached the node's
        # socket (not megabytes parked in this side's buffer when the node hangs up)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        s.settimeout(5.0)
        try:
            s.connect((host, port))
        except OSError as err:
            s.close()
            result.setdefault("connect_errors", []).append(repr(err))
            continue
        conns += 1
        pos = rng.randrange(0, len(block) // step) * step
        try:
            while sent < total:
                n = s.send(block[pos:pos + 256 * 1024])
                sent += n
                pos = (pos + n) % len(block)
        except (ConnectionResetError, BrokenPipeError):
            result["closed"] = result.get("closed", 0) + 1  # refused: the next connection
        except socket.timeout:
            result["stalled"] = result.get("stalled", 0) + 1  # a frame waiting for its end
        finally:
            s.close()
    result["sent"] = sent
    result["connections"] = conns


@pytest.mark.parametrize("kind", ["random", "framed"])
def test_garbage_at_the_raft_port_costs_no_memory_no_election_and_no_traceback(cluster,
                                                                               kind):
    """100 MiB from 4 connections at a time: random bytes (the length prefix is refused
    at once), or 16 KiB frames of random bytes (each read whole, then refused by the
    signature check)."""
    block, step = (random_block(), 1) if kind == "random" else (framed_block(), 4 + 16384)
    leader = cluster.leader()
    assert claims(leader, f"before-{uid()}")
    before = settled_raft_state(cluster)
    rss_before = leader.rss_kb()

    t0 = time.monotonic()
    results = [{} for _ in range(4)]
    threads = [threading.Thread(target=stream_garbage, args=(
        leader.host, leader.raft_port, block, step, 25 * MiB, t0 + 150.0, r), daemon=True)
        for r in results]
    for t in threads:
        t.start()
    rss_peak = rss_before
    while any(t.is_alive() for t in threads):  # (sampling the node's memory meanwhile)
        rss_peak = max(rss_peak, leader.rss_kb())
        threads[0].join(0.1)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    sent = sum(r.get("sent", 0) for r in results)
    rss_after = leader.rss_kb()
    rss_peak = max(rss_peak, rss_after)
    after = raft_state(cluster)
    print(f"\n{kind} garbage: {sent / MiB:.1f} MiB on "
          f"{sum(r['connections'] for r in results)} connections in {elapsed:.1f}s; leader "
          f"RSS {rss_before / 1024:.1f} MiB before, {rss_peak / 1024:.1f} peak, "
          f"{rss_after / 1024:.1f} after; (term, leader, leader changes) before {before} "
          f"after {after}")
    assert sent >= 100 * MiB, results
    assert rss_peak - rss_before <= 20 * 1024, (rss_before, rss_peak)
    assert after == before  # same term, same leader, no leader change on any node
    assert_no_traceback(cluster.nodes)
    # refused, with a line per address (not per connection)
    reason = "frame-length" if kind == "random" else "not-authentic"
    lines = refusals(leader, "")
    assert lines and reason in lines[0], lines
    assert len(lines) <= 1 + int(elapsed // 30) + 1, lines
    # and the cluster still serves: claims through the attacked node and another one
    assert claims(leader, f"after-{uid()}")
    other = next(n for n in cluster.nodes if n is not leader)
    assert claims(other, f"after-{uid()}")
    assert raft_state(cluster) == before


# -- a huge length prefix -------------------------------------------------------------------

def test_a_huge_length_prefix_is_refused_without_buffering(cluster_factory):
    cluster = cluster_factory(1)
    node = cluster.node(1)
    rss_before = node.rss_kb()
    s = raft_socket(node, "127.0.0.2")
    t0 = time.monotonic()
    s.sendall(struct.pack("i", 2 ** 31 - 1))  # the length alone: no body follows yet
    assert closed_by_peer(s, 10.0)
    took = time.monotonic() - t0
    s.close()
    # closed on the prefix, not by the 2.5 s handshake deadline
    assert took < 2.0, took
    wait_for(lambda: refusals(node, "frame-length"), 5.0, message="the refusal logged")
    assert "2147483647" in refusals(node, "frame-length")[0]

    # a body streamed after such a prefix is not read into memory: the node has closed
    s = raft_socket(node, "127.0.0.3")
    s.sendall(struct.pack("i", 1 << 30))
    sent = 0
    chunk = os.urandom(1 * MiB)
    try:
        while sent < 256 * MiB:
            sent += s.send(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass_through = "closed by the node"
    else:
        pass_through = "all taken"
    finally:
        s.close()
    assert pass_through == "closed by the node" and sent < 16 * MiB, (pass_through, sent)
    # just over the handshake limit, and a negative length: refused the same way
    for source, length in (("127.0.0.4", 16 * 1024 + 1), ("127.0.0.5", -5)):
        s = raft_socket(node, source)
        s.sendall(struct.pack("i", length))
        assert closed_by_peer(s, 2.0), length
        s.close()
    assert node.rss_kb() - rss_before <= 20 * 1024
    assert_no_traceback(cluster.nodes)
    assert claims(node, f"after-{uid()}")


# -- silent connections ---------------------------------------------------------------------

class SilentFlood:
    """Keeps up to ``per_port`` silent connections open to each port (from 127.0.0.1, the
    nodes' own address), opening at most ``rate`` new ones per port per 0.1 s to replace
    those the nodes close."""

    def __init__(self, ports, per_port: int = 200, rate: int = 20) -> None:
        self.ports = list(ports)
        self.per_port = per_port
        self.rate = rate
        self.open: dict[int, list[socket.socket]] = {p: [] for p in self.ports}
        self.opened = 0
        self.closed_by_node = 0
        #: bytes a node sent on a silent connection (it must send nothing)
        self.spoke: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def fill(self) -> "SilentFlood":
        for port in self.ports:
            self._top_up(port, self.per_port)
        return self

    def start(self) -> "SilentFlood":
        self._thread.start()
        return self

    def _top_up(self, port: int, at_most: int) -> None:
        for _ in range(min(at_most, self.per_port - len(self.open[port]))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):  # (a node that is down refuses)
                s.close()
                return
            self.open[port].append(s)
            self.opened += 1

    def _reap(self, port: int) -> None:
        socks = self.open[port]
        if not socks:
            return
        readable, _, _ = select.select(socks, [], [], 0)
        for s in readable:
            try:
                data = s.recv(1)
            except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if data:
                self.spoke.append(data)
            socks.remove(s)
            s.close()
            self.closed_by_node += 1

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for port in self.ports:
                self._reap(port)
                self._top_up(port, self.rate)

    def most_open(self) -> int:
        for port in self.ports:
            self._reap(port)
        return max(len(socks) for socks in self.open.values())

    def wait_all_closed(self, timeout: float) -> None:
        def done():
            for port in self.ports:
                self._reap(port)
            return not any(self.open.values())
        wait_for(done, timeout, interval=0.1, message=lambda: "the nodes to close every "
                 f"silent connection ({sum(map(len, self.open.values()))} open)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for socks in self.open.values():
            for s in socks:
                s.close()
            socks.clear()


def test_silent_connections_are_dropped_and_keep_no_node_out(cluster):
    ports = [n.raft_port for n in cluster.nodes]
    before = settled_raft_state(cluster)

    # a few, under every limit: each is closed at the handshake deadline (2.5 s)
    t0 = time.monotonic()
    few = SilentFlood(ports, per_port=5).fill()
    try:
        few.wait_all_closed(10.0)
    finally:
        few.stop()
    took = time.monotonic() - t0
    assert 2.0 <= took <= 8.0, took

    # 200 per node, from the nodes' own address: the nodes keep at most 16 of them (the
    # newest), well before the deadline would close them
    flood = SilentFlood(ports, per_port=200).fill()
    try:
        wait_for(lambda: flood.most_open() <= 16, 2.0, interval=0.05,
                 message=lambda: f"at most 16 kept per node ({flood.most_open()} open)")
        # nothing moves: no election while they are held and while they are closed
        assert holds_for(lambda: raft_state(cluster) == before, 4.0, interval=0.25), \
            (before, raft_state(cluster))
        flood.wait_all_closed(10.0)
        assert flood.closed_by_node >= 3 * 200

        # a node restarted while 200 silent connections per node keep coming rejoins
        leader = cluster.leader()
        victim = next(i for i, n in enumerate(cluster.nodes, 1) if n is not leader)
        flood.start()
        cluster.kill(victim)
        cluster.restart(victim)
        cluster.wait_formed(timeout=30.0)
        for node in cluster.nodes:
            assert claims(node, f"rejoined-{uid()}")
        assert flood.opened >= 3 * 200 + 100, flood.opened  # (the flood went on)
    finally:
        flood.stop()
    assert few.spoke == [] and flood.spoke == []
    assert_no_traceback(cluster.nodes)


# -- what is unpickled ------------------------------------------------------------------------

def test_a_wrongly_keyed_frame_is_dropped_and_a_forbidden_global_is_not_run(cluster_factory,
                                                                          tmp_path):
    cluster = cluster_factory(1)
    node = cluster.node(1)
    before = settled_raft_state(cluster)

    # signed with another secret: dropped before zlib or pickle see it
    wrong = tmp_path / "wrong-key-ran"
    s = raft_socket(node, "127.0.0.6")
    s.sendall(frame(Marked(str(wrong)), "another-secret-0123456789"))
    assert closed_by_peer(s, 5.0)
    s.close()
    wait_for(lambda: refusals(node, "not-authentic"), 5.0, message="the refusal logged")

    # signed with the cluster secret, after a real handshake (the peer proved the
    # secret): the restricted unpickler refuses os.system, nothing runs
    ran = tmp_path / "forbidden-global-ran"
    s = raft_socket(node, "127.0.0.7")
    mine = os.urandom(32)
    s.sendall(frame(mine, node.secret))
    echoed, theirs = read_frame(s, node.secret)
    assert echoed == mine and len(theirs) == 32
    s.sendall(frame((theirs, Marked(str(ran))), node.secret))
    assert closed_by_peer(s, 5.0)
    s.close()
    wait_for(lambda: refusals(node, "forbidden-global"), 5.0, message="the refusal logged")
    assert "system" in refusals(node, "forbidden-global")[0]

    assert not wrong.exists() and not ran.exists()
    assert raft_state(cluster) == before
    assert_no_traceback(cluster.nodes)
    assert claims(node, f"after-{uid()}")


# -- the same rules, on the functions (no processes) ------------------------------------------

SECRET = "unit-secret-0123456789"


def test_decode_authenticates_before_it_unpickles(monkeypatch, tmp_path):
    from cluster import raftwire
    unpickled = []
    real = raftwire.restricted_loads
    monkeypatch.setattr(raftwire, "restricted_loads",
                        lambda data: unpickled.append(data) or real(data))
    enc = getEncryptor(SECRET)
    ran = tmp_path / "ran"
    token = frame(Marked(str(ran)), "another-secret-0123456789")[4:]
    with pytest.raises(raftwire.FrameRejected) as err:
        raftwire.decode_body(token, enc, 0)
    assert err.value.reason == "not-authentic" and unpickled == []
    # the right key: unpickled, with the restricted unpickler, which refuses os.system
    with pytest.raises(raftwire.FrameRejected) as err:
        raftwire.decode_body(frame(Marked(str(ran)), SECRET)[4:], enc, 0)
    assert err.value.reason == "forbidden-global" and "system" in str(err.value)
    assert len(unpickled) == 1 and not ran.exists()
    # a well-formed message goes through
    message = {"type": "append_entries", "term": 3, "entries": [(b"\x00cmd", 7, 3)],
               "commit_index": 6, "prevLogIdx": 6, "prevLogTerm": 3}
    assert raftwire.decode_body(frame(message, SECRET)[4:], enc, 0)[0] == message


def test_the_allow_list_covers_what_pysyncobj_and_the_routing_state_pickle():
    from pysyncobj.node import TCPNode

    from cluster import raftwire
    from cluster.routing import Tables, apply
    t = Tables()
    apply(t, ("member", "n1", {"raft": "127.0.0.1:1", "ports": [1, 2]}))
    apply(t, ("routes", "n1", ["a/#", "$share/g/t"], []))
    apply(t, ("claim", "x", "n1", True))
    snapshot = ([{"_SyncObj__enabledCodeVersion": 0}, {"tables": t}],
                (b"\x00" + pickle.dumps((0, ([("claim", "x", "n1", True)],)), 2), 9, 2),
                (b"", 8, 2), {TCPNode("127.0.0.1:1"), TCPNode("127.0.0.1:2")})
    back = raftwire.restricted_loads(pickle.dumps(snapshot, 2))
    assert back[0][1]["tables"].routes == t.routes and back[0][1]["tables"].owners == t.owners
    assert back[1:] == snapshot[1:]
    membership = pickle.dumps(["add", "127.0.0.1:3", TCPNode("127.0.0.1:3")], 2)
    assert raftwire.restricted_loads(membership)[2].address == "127.0.0.1:3"
    for evil in (pickle.dumps(Marked("/nonexistent/x"), 2),
                 b"c__builtin__\neval\n(S'1'\ntR.",     # eval
                 b"c__builtin__\nbytes\n(I1000000000\ntR.",  # bytes(n): a huge allocation
                 b"c_codecs\nencode\n(S'x'\nS'zlib'\ntR."):  # not latin-1
        with pytest.raises(pickle.UnpicklingError):
            raftwire.restricted_loads(evil)


def test_pysyncobj_unpickles_only_through_the_restricted_unpickler():
    import pysyncobj.journal
    import pysyncobj.pickle

    from cluster import raftwire
    raftwire.install_restricted_unpickler()
    raftwire.install_restricted_unpickler()  # idempotent
    assert raftwire.restricted_unpickler_installed()
    with pytest.raises(raftwire.ForbiddenGlobal):
        pysyncobj.pickle.loads(pickle.dumps(Marked("/nonexistent/x"), 2))  # a log command
    with pytest.raises(raftwire.ForbiddenGlobal):
        pysyncobj.journal.loads(pickle.dumps(Marked("/nonexistent/x"), 2))  # journal meta


def test_frame_lengths_are_checked_against_the_connection_state():
    from cluster import raftwire
    raftwire.check_length(raftwire.HANDSHAKE_FRAME_BYTES, trusted=False)
    raftwire.check_length(raftwire.MAX_FRAME_BYTES, trusted=True)
    for length, trusted in ((raftwire.HANDSHAKE_FRAME_BYTES + 1, False), (0, False),
                            (-1, True), (raftwire.MAX_FRAME_BYTES + 1, True)):
        with pytest.raises(raftwire.FrameRejected):
            raftwire.check_length(length, trusted)
