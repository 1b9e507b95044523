"""Fault injection through toxiproxy-python: each toxic's real effect on real TCP traffic,
first against a TCP echo server, then against a running Shoal node.

The ``toxiproxy`` fixture (tests/conftest.py) is tests/toxiproxy_server.py in a child
process, or a real Toxiproxy when ``TOXIPROXY_URL`` is set; these tests use only the
toxiproxy-python API, so they run unchanged against either. Timings are measured where
time is the behaviour (a delay, a rate); everything else waits for a condition.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import uuid

import pytest
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from support import ConnectionClosed, Connack, Puback, Publish, RawClient

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.settimeout(30)
        while True:  # ends at EOF, on a socket error or after 30 s of silence
            try:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
            except OSError:
                return  # the proxy reset or closed the connection: nothing more to echo


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo():
    """A threaded TCP echo server on a free port; yields its "host:port"."""
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield "%s:%d" % server.server_address
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _name(prefix: str) -> str:
    return f"shoaltest_{prefix}_{uuid.uuid4().hex[:8]}"


def _addr(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return host, int(port)


def _connect(proxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(_addr(proxy.listen), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> tuple[bytes, int]:
    """Read n bytes; returns them and the number of recv calls it took."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    reads = 0
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"got {len(buf)} of {n} bytes within {timeout}s"
        sock.settimeout(remaining)
        data = sock.recv(65536)
        assert data, f"connection closed after {len(buf)} of {n} bytes"
        buf += data
        reads += 1
    return bytes(buf), reads


def _round_trip(sock: socket.socket, payload: bytes = b"ping", timeout: float = 5.0) -> float:
    start = time.monotonic()
    sock.sendall(payload)
    data, _ = _recv_exactly(sock, len(payload), timeout)
    assert data == payload
    return time.monotonic() - start


def _nothing_arrives(sock: socket.socket, duration: float) -> bool:
    """True when no byte (and no close) arrives within ``duration`` seconds."""
    sock.settimeout(duration)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return True
    raise AssertionError(f"expected silence, got {data!r}")


def _wait_eof(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes (EOF or reset); fails after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:  # bounded by the deadline
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"connection still open after {timeout}s"
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start


# --------------------------------------------------------------------------- API


def test_create_lists_proxy_with_real_listen_address(toxiproxy, echo):
    name = _name("create")
    proxy = toxiproxy.create(upstream=echo, name=name)
    host, port = _addr(proxy.listen)
    assert port != 0 and proxy.enabled and proxy.upstream == echo
    listed = toxiproxy.get_proxy(name)
    assert listed is not None and listed.listen == proxy.listen
    assert toxiproxy.version()
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0
    assert proxy.destroy()
    assert toxiproxy.get_proxy(name) is None


def test_duplicate_name_and_unknown_names_are_errors(toxiproxy, echo):
    name = _name("dup")
    proxy = toxiproxy.create(upstream=echo, name=name)
    with pytest.raises(ProxyExists):  # the client's own check
        toxiproxy.create(upstream=echo, name=name)
    with pytest.raises(ProxyExists):  # the server's 409, through the client's API layer
        APIConsumer.post("/proxies", json={"name": name, "upstream": echo,
                                           "listen": "127.0.0.1:0"})
    with pytest.raises(NotFound):
        proxy.destroy_toxic("no_such_toxic")
    with pytest.raises(NotFound):
        APIConsumer.get("/proxies/" + _name("missing"))
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_type", attributes={})
    proxy.add_toxic(type="latency", attributes={"latency": 10})
    with pytest.raises(ProxyExists):  # same toxic name twice: 409
        proxy.add_toxic(type="latency", attributes={"latency": 10})
    toxic = proxy.get_toxic("latency_downstream")
    assert toxic is not None and toxic.stream == "downstream" and toxic.toxicity == 1.0
    assert toxic.attributes["latency"] == 10


# --------------------------------------------------------------------------- toxics


def test_latency_adds_delay_each_way_and_removal_restores(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("latency"))
    with _connect(proxy) as sock:
        baseline = _round_trip(sock)
        proxy.add_toxic(name="down", type="latency", stream="downstream",
                        attributes={"latency": 300, "jitter": 0})
        proxy.add_toxic(name="up", type="latency", stream="upstream",
                        attributes={"latency": 200, "jitter": 0})
        assert set(proxy.toxics()) == {"down", "up"}
        slowed = _round_trip(sock)  # the live connection gets the toxics
        assert slowed >= 0.5 - 0.02, (baseline, slowed)
        proxy.destroy_toxic("up")
        proxy.destroy_toxic("down")
        assert proxy.toxics() == {}
        restored = _round_trip(sock)
        assert restored < 0.25, (baseline, slowed, restored)


def test_toxicity_zero_leaves_connections_untouched(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("toxicity"))
    proxy.add_toxic(type="latency", toxicity=0.0, attributes={"latency": 1000})
    assert proxy.get_toxic("latency_downstream").toxicity == 0
    for _ in range(3):
        with _connect(proxy) as sock:
            assert _round_trip(sock) < 0.5


def test_timeout_stalls_data_then_closes(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("timeout"))
    proxy.add_toxic(type="timeout", stream="downstream", attributes={"timeout": 800})
    start = time.monotonic()
    with _connect(proxy) as sock:
        sock.sendall(b"hello")
        assert _nothing_arrives(sock, 0.5)
        _wait_eof(sock, timeout=5)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.8 - 0.05, elapsed
    assert elapsed < 3.0, elapsed
    proxy.destroy_toxic("timeout_downstream")
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0


def test_timeout_zero_stalls_until_removed(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("timeout0"))
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    with _connect(proxy) as sock:
        sock.sendall(b"hello")
        assert _nothing_arrives(sock, 0.6)  # neither data nor a close
    proxy.destroy_toxic("timeout_upstream")
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0


def test_reset_peer_resets_the_connection(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("reset"))
    proxy.add_toxic(type="reset_peer", stream="downstream", attributes={"timeout": 300})
    with _connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"hello")  # the echo is the downstream data that trips the toxic
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            for _ in range(100):  # bounded: RST comes after at most a few empty reads
                if not sock.recv(65536):
                    raise AssertionError("FIN instead of RST")
        elapsed = time.monotonic() - start
    assert elapsed >= 0.3 - 0.02, elapsed
    proxy.destroy_toxic("reset_peer_downstream")
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0


def test_bandwidth_limits_throughput(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("bandwidth"))
    proxy.add_toxic(type="bandwidth", stream="downstream", attributes={"rate": 50})
    payload = bytes(range(256)) * 400  # 102400 bytes at 50 KB/s: about 2 s
    with _connect(proxy) as sock:
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        data, _ = _recv_exactly(sock, len(payload), timeout=15)
        elapsed = time.monotonic() - start
        sender.join(timeout=5)
    assert data == payload
    assert elapsed >= 1.5, elapsed
    assert elapsed < 8, elapsed


def test_slicer_delivers_same_bytes_in_many_small_reads(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("slicer"))
    payload = bytes(range(256)) * 16  # 4096 bytes
    with _connect(proxy) as sock:
        sock.sendall(payload)
        _, plain_reads = _recv_exactly(sock, len(payload))
        proxy.add_toxic(type="slicer", stream="downstream",
                        attributes={"average_size": 64, "size_variation": 16,
                                    "delay": 2000})
        sock.sendall(payload)
        data, reads = _recv_exactly(sock, len(payload), timeout=10)
    assert data == payload
    assert reads >= 20, (plain_reads, reads)


def test_limit_data_closes_after_the_limit(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("limit"))
    proxy.add_toxic(type="limit_data", stream="downstream", attributes={"bytes": 10})
    with _connect(proxy) as sock:
        sock.sendall(b"0123456789abcdef")
        data, _ = _recv_exactly(sock, 10)
        assert data == b"0123456789"
        _wait_eof(sock, timeout=5)


def test_slow_close_delays_the_close(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("slowclose"))
    proxy.add_toxic(type="slow_close", stream="upstream", attributes={"delay": 500})
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0
        start = time.monotonic()
        sock.shutdown(socket.SHUT_WR)  # the client's EOF reaches the echo 0.5 s late
        _wait_eof(sock, timeout=5)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.5 - 0.02, elapsed


def test_disable_closes_connections_and_listener_enable_reopens(toxiproxy, echo):
    proxy = toxiproxy.create(upstream=echo, name=_name("disable"))
    address = _addr(proxy.listen)
    sock = _connect(proxy)
    try:
        assert _round_trip(sock) < 1.0
        proxy.disable()
        assert toxiproxy.get_proxy(proxy.name).enabled is False
        _wait_eof(sock, timeout=5)
    finally:
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
    proxy.enable()
    assert toxiproxy.get_proxy(proxy.name).enabled is True
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0
    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    with _connect(proxy) as sock:
        assert _round_trip(sock) < 1.0


def test_reset_removes_all_toxics_and_enables_proxies(toxiproxy, echo):
    one = toxiproxy.create(upstream=echo, name=_name("reset1"))
    two = toxiproxy.create(upstream=echo, name=_name("reset2"))
    one.add_toxic(type="latency", attributes={"latency": 1000})
    two.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    two.disable()
    assert toxiproxy.reset()
    assert one.toxics() == {} and two.toxics() == {}
    assert toxiproxy.get_proxy(two.name).enabled is True
    for proxy in (one, two):
        with _connect(proxy) as sock:
            assert _round_trip(sock) < 0.5


# --------------------------------------------------------------------------- MQTT


def test_mqtt_round_trips_complete_under_latency(toxiproxy, node):
    proxy = toxiproxy.create(upstream=f"{node.host}:{node.port}", name=_name("mqtt_lat"))
    proxy.add_toxic(name="down", type="latency", stream="downstream",
                    attributes={"latency": 150})
    proxy.add_toxic(name="up", type="latency", stream="upstream",
                    attributes={"latency": 100})
    host, port = _addr(proxy.listen)
    with RawClient(host, port, version=5) as client:
        start = time.monotonic()
        client.connect("tox-latency")
        assert time.monotonic() - start >= 0.25 - 0.02
        client.subscribe("tox/latency", qos=1)
        start = time.monotonic()
        client.publish("tox/latency", b"slow but sure", qos=1)  # waits for the PUBACK
        got = client.await_packet(lambda p: isinstance(p, Publish), "PUBLISH")
        assert time.monotonic() - start >= 0.25 - 0.02
        assert got.payload == b"slow but sure" and got.qos == 1
        client.send(Puback(got.packet_id))
        assert client.ping(timeout=5) >= 0.25 - 0.02


def test_mqtt_reset_peer_makes_broker_publish_will(toxiproxy, node):
    proxy = toxiproxy.create(upstream=f"{node.host}:{node.port}", name=_name("mqtt_rst"))
    watcher = node.raw(5)
    watcher.connect("tox-watcher")
    watcher.subscribe("tox/will", qos=1)
    host, port = _addr(proxy.listen)
    with RawClient(host, port, version=5) as victim:
        ack = victim.connect("tox-victim", keep_alive=60, will_topic="tox/will",
                             will_payload=b"victim lost", will_qos=1)
        assert isinstance(ack, Connack)
        assert victim.ping() < 1.0
        proxy.add_toxic(type="reset_peer", stream="upstream", attributes={"timeout": 0})
        with pytest.raises(ConnectionClosed):
            victim.ping(timeout=5)  # the PINGREQ trips the toxic; the reply never comes
    will = watcher.await_packet(lambda p: isinstance(p, Publish), "the will", timeout=10)
    assert will.topic == "tox/will" and will.payload == b"victim lost"
    assert node.alive()
