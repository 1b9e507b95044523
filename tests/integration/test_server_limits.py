"""Limits the server announces in CONNACK and enforces (MQTT 5.0 3.2.2.3): Receive
Maximum, Maximum QoS, Retain Available; and plain subscription management."""

from __future__ import annotations

import pytest

from support import (
    ConnectionClosed, Disconnect, Prop, Publish, Pubrec, Suback, Subscribe, Subscription,
)

pytestmark = pytest.mark.timeout(30)


def test_client_exceeding_the_server_receive_maximum_is_disconnected_with_0x93(start_node):
    node = start_node(receive_maximum=2)
    raw = node.raw(5)
    ack = raw.connect("greedy")
    assert ack.properties.get(Prop.RECEIVE_MAXIMUM) == 2, ack
    for pid in (1, 2, 3):  # QoS 2 stays unacknowledged until PUBREL, which never comes
        raw.send(Publish("rm/t", b"x", qos=2, packet_id=pid))
    got = raw.wait_closed(5)
    assert [p.packet_id for p in got if isinstance(p, Pubrec)] == [1, 2], got
    assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x93, got


def test_max_qos_is_announced_and_subscriptions_are_granted_at_most_that(start_node, version):
    node = start_node(max_qos=1)
    raw = node.raw(version)
    ack = raw.connect("maxqos")
    if version == 5:
        assert ack.properties.get(Prop.MAXIMUM_QOS) == 1, ack
    raw.send(Subscribe(1, [Subscription("mq/#", 2)]))
    assert raw.expect(Suback).reason_codes == [1]


def test_v5_publish_above_max_qos_is_disconnected_with_0x9b(start_node):
    node = start_node(max_qos=1)
    raw = node.raw(5)
    raw.connect("toohigh")
    raw.send(Publish("mq/t", b"x", qos=2, packet_id=1))
    got = raw.wait_closed(5)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x9B, got


def test_retain_not_available_is_announced_and_retained_publish_refused(start_node):
    node = start_node(retain_available=False)
    raw = node.raw(5)
    ack = raw.connect("noretain")
    assert ack.properties.get(Prop.RETAIN_AVAILABLE) == 0, ack
    raw.send(Publish("nr/t", b"x", qos=1, packet_id=1, retain=True))
    got = raw.wait_closed(5)
    assert got and isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x9A, got


def test_invalid_topic_filter_is_refused(node, version):
    """Either a failure code in SUBACK for the bad filters, or the connection closed as
    for a protocol violation (both are within the spec); never a granted subscription."""
    raw = node.raw(version)
    raw.connect("badfilter")
    raw.send(Subscribe(1, [Subscription("ok/#", 1), Subscription("bad/#/x", 1),
                           Subscription("bad+", 0)]))
    try:
        answer = raw.recv(5)
    except ConnectionClosed:
        return
    if isinstance(answer, Disconnect):
        assert version == 5 and answer.reason_code >= 0x80, answer
        raw.wait_closed(5)
        return
    assert isinstance(answer, Suback), answer
    assert answer.reason_codes[0] == 1
    failure = 0x8F if version == 5 else 0x80
    assert answer.reason_codes[1:] == [failure, failure], answer


def test_unsubscribe_stops_delivery(node, version):
    sub = node.paho("unsub", version)
    sub.subscribe("us/#", qos=1)
    sub.subscribe("us/keep", qos=1)
    pub = node.paho("unsub-pub", version)
    pub.publish("us/a", b"1", qos=1)
    sub.wait_messages(1)
    sub.unsubscribe("us/#")
    pub.publish("us/a", b"2", qos=1)
    pub.publish("us/keep", b"marker", qos=1)
    sub.wait_messages(1, topic="us/keep")
    assert sub.payloads("us/a") == [b"1"]


def test_topic_levels_and_client_id_length_are_bounded(start_node):
    """max_topic_levels / max_client_id_length: a too deep PUBLISH is not routed (PUBACK
    0x90), a too deep filter gets SUBACK 0x8F / 0x80, a too deep will and a too long
    ClientID refuse the CONNECT; the node keeps serving."""
    from support import Puback
    node = start_node(max_topic_levels=8, max_client_id_length=64)
    deep = "/".join(["l"] * 9)
    ok = "/".join(["l"] * 8)
    sub = node.raw(5)
    sub.connect("levels-sub")
    sub.send(Subscribe(1, [Subscription(ok, 1), Subscription(deep, 1),
                           Subscription("l/#", 1)]))
    assert sub.expect(Suback).reason_codes == [1, 0x8F, 1]
    sub4 = node.raw(4)
    sub4.connect("levels-sub4")
    sub4.send(Subscribe(1, [Subscription(deep, 1)]))
    assert sub4.expect(Suback).reason_codes == [0x80]
    pub = node.raw(5)
    pub.connect("levels-pub")
    pub.send(Publish(deep, b"too deep", qos=1, packet_id=1))
    assert pub.expect(Puback).reason_code == 0x90
    pub.send(Publish(ok, b"fine", qos=1, packet_id=2))
    assert pub.expect(Puback).reason_code == 0
    got = [p.payload for p in sub.recv_nothing_for(0.5) if isinstance(p, Publish)]
    assert got == [b"fine"]  # (overlapping subscriptions of one client: one delivery)
    will = node.raw(5)
    ack = will.connect("levels-will", expect_success=False, will_topic=deep,
                       will_payload=b"x")
    assert ack.reason_code == 0x90
    for version, code in ((5, 0x85), (4, 2)):
        long_id = node.raw(version)
        assert long_id.connect("c" * 65, expect_success=False).reason_code == code
    assert node.raw(5).connect("c" * 64).reason_code == 0


def test_a_topic_of_ten_thousand_levels_is_matched_without_recursion(start_node):
    """The subscription tree is walked with a stack of its own: a 10,000-level topic and
    a filter as deep reach the subscriber (no RecursionError, no traceback)."""
    node = start_node(max_topic_levels=20000)
    deep = "/".join(f"l{i % 10}" for i in range(10_000))
    sub = node.raw(5)
    sub.connect("deep-sub")
    sub.send(Subscribe(1, [Subscription(deep, 1), Subscription(deep[:-2] + "+", 1)]))
    assert sub.expect(Suback).reason_codes == [1, 1]
    pub = node.raw(5)
    pub.connect("deep-pub")
    pub.publish(deep, b"deep", qos=1)
    got = [p for p in sub.recv_nothing_for(1.0) if isinstance(p, Publish)]
    assert [p.payload for p in got] == [b"deep"], got
    assert "Traceback" not in node.log_tail(200)


def _connect_from(node, source: str, client_id: str):
    """A CONNECT from ``source`` (a loopback address): the socket and the CONNACK, or None
    when the node closed the connection without one."""
    import socket
    from support import Connack, Connect, decode, encode, split_frames
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect((node.host, node.port))
    try:
        s.sendall(encode(Connect(client_id=client_id, protocol_level=5), 5))
        data = s.recv(64)
    except ConnectionResetError:
        data = b""
    if not data:
        s.close()
        return None, None
    (first, body), = split_frames(bytearray(data))
    ack = decode(first, body, 5)
    assert isinstance(ack, Connack), ack
    return s, ack


@pytest.mark.shoal_only("Shoal's connection limits")
def test_connection_limits_refuse_at_once_and_the_node_keeps_serving(start_node):
    import re
    import time
    from support import http_json
    node = start_node(max_connections=12, max_connections_per_address=5)
    held = []
    for i in range(5):
        s, ack = _connect_from(node, "127.0.0.1", f"lim-a{i}")
        assert ack is not None and ack.reason_code == 0
        held.append(s)
    assert _connect_from(node, "127.0.0.1", "lim-a5") == (None, None)  # per address
    for i in range(5):
        s, ack = _connect_from(node, "127.0.0.2", f"lim-b{i}")
        assert ack is not None, i
        held.append(s)
    for i in range(2):
        s, ack = _connect_from(node, "127.0.0.3", f"lim-c{i}")
        assert ack is not None, i
        held.append(s)
    assert _connect_from(node, "127.0.0.4", "lim-d0") == (None, None)  # max_connections
    held.pop(0).close()  # one from 127.0.0.1 leaves: room again, for its address too
    deadline = time.monotonic() + 5
    while True:
        s, ack = _connect_from(node, "127.0.0.1", "lim-a6")
        if ack is not None or time.monotonic() > deadline:
            break
    assert ack is not None and ack.reason_code == 0
    held.append(s)
    status, text = http_json("GET", f"http://{node.host}:{node.admin_port}/metrics")
    counts = dict(re.findall(r'^shoal_connections_refused_total\{[^}]*reason="(\w+)"[^}]*\} '
                             r'(\d+)', text, re.M))
    assert int(counts["per_address"]) >= 1 and int(counts["max_connections"]) >= 1, counts
    for s in held:
        s.close()


@pytest.mark.shoal_only("Shoal's connection limits")
def test_connection_rate_per_address(start_node):
    from support import let_time_pass
    node = start_node(max_connection_rate=5)
    results = [_connect_from(node, "127.0.0.5", f"rate-{i}") for i in range(12)]
    accepted = [s for s, ack in results if ack is not None]
    assert 5 <= len(accepted) <= 7, len(accepted)  # (the window may turn once meanwhile)
    s, ack = _connect_from(node, "127.0.0.6", "rate-other")  # another address: its own rate
    assert ack is not None
    let_time_pass(1.1)  # the one-second window passes (elapsed time is the behaviour)
    s2, ack = _connect_from(node, "127.0.0.5", "rate-later")
    assert ack is not None
    for c in accepted + [s, s2]:
        c.close()


@pytest.mark.shoal_only("Shoal's max_subscriptions")
def test_subscriptions_per_session_are_capped(start_node):
    node = start_node(max_subscriptions=3)
    raw = node.raw(5)
    raw.connect("many-subs")
    raw.send(Subscribe(1, [Subscription(f"q/{i}", 1) for i in range(5)]))
    assert raw.expect(Suback).reason_codes == [1, 1, 1, 0x97, 0x97]
    raw.send(Subscribe(2, [Subscription("q/0", 0)]))  # replacing one held: allowed
    assert raw.expect(Suback).reason_codes == [0]
    raw4 = node.raw(4)
    raw4.connect("many-subs-4")
    raw4.send(Subscribe(1, [Subscription(f"r/{i}", 1) for i in range(4)]))
    assert raw4.expect(Suback).reason_codes == [1, 1, 1, 0x80]
    assert raw.ping() < 1


@pytest.mark.shoal_only("Shoal's max_queue_bytes")
def test_a_session_queue_is_bounded_in_bytes(start_node):
    """An offline persistent session queues at most max_queue_bytes: the oldest messages
    are dropped past it (here 2 MiB: 4 of 20 messages of 500 KB stay)."""
    from support import Prop, Puback
    node = start_node(max_queue_bytes=2 * 1024 * 1024, max_packet_size=4 * 1024 * 1024)
    sub = node.raw(5)
    sub.connect("qbytes", clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    sub.subscribe("qb/t", qos=1)
    sub.disconnect()
    pub = node.raw(5)
    pub.connect("qbytes-pub")
    for i in range(20):
        pub.publish("qb/t", bytes([i]) * 500_000, qos=1)
    back = node.raw(5)
    ack = back.connect("qbytes", clean_start=False,
                       properties={Prop.SESSION_EXPIRY_INTERVAL: 300})
    assert ack.session_present
    got = []
    for p in back.recv_nothing_for(2.0):
        if isinstance(p, Publish):
            got.append(p.payload[0])
            back.send(Puback(p.packet_id))
    assert got == [16, 17, 18, 19], got


@pytest.mark.shoal_only("Shoal's max_output_buffer")
def test_a_client_that_never_reads_its_pingresps_is_closed(start_node):
    """PINGREQs sent without reading the PINGRESPs: past max_output_buffer the node closes
    the connection (instead of buffering without end), and keeps serving others."""
    import socket
    from support import Connect, Pingreq, encode
    node = start_node(max_output_buffer=65536)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((node.host, node.port))
    s.sendall(encode(Connect(client_id="never-reads", protocol_level=5), 5))
    block = encode(Pingreq(), 5) * 65536  # 128 KiB of PINGREQs per write
    s.settimeout(10)
    sent, closed = 0, False
    try:
        while sent < 64 << 20:
            s.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    s.close()
    assert closed, f"still open after {sent} bytes of PINGREQs"
    assert sent < 48 << 20, sent
    other = node.raw(5)
    other.connect("reads-fine")
    assert other.ping() < 1
    assert "client does not read" in node.log_tail(50)


@pytest.mark.shoal_only("Shoal's max_retained")
def test_retained_messages_are_capped_in_count_and_bytes(start_node):
    from support import Puback
    node = start_node(max_retained=3, max_retained_bytes=10_000)
    pub = node.raw(5)
    pub.connect("ret-cap")

    def code(topic, payload):
        pid = pub.next_id()
        pub.send(Publish(topic, payload, qos=1, retain=True, packet_id=pid))
        return pub.await_packet(lambda p: isinstance(p, Puback) and p.packet_id == pid,
                                "PUBACK").reason_code
    assert [code(f"rc/{i}", b"x") for i in range(4)] == [0x10, 0x10, 0x10, 0x97]
    assert code("rc/0", b"replaced") == 0x10      # replacing one: accepted
    assert code("rc/1", b"") == 0x10              # clearing one: accepted
    assert code("rc/9", b"y" * 5000) == 0x10      # room again (count), bytes fit
    assert code("rc/2", b"z" * 6000) == 0x97      # would pass 10,000 bytes
    sub = node.raw(5)
    sub.connect("ret-cap-sub")
    sub.send(Subscribe(1, [Subscription("rc/#", 0)]))
    got = sorted(p.topic for p in sub.recv_nothing_for(0.5) if isinstance(p, Publish))
    assert got == ["rc/0", "rc/2", "rc/9"], got


@pytest.mark.shoal_only("Shoal's flapping detection")
def test_a_flapping_client_id_is_refused_for_a_while(start_node):
    from support import let_time_pass
    node = start_node(flapping_connects=5, flapping_window=30, flapping_ban=2)
    for i in range(5):
        c = node.raw(5)
        assert c.connect("flapper").reason_code == 0
        c.disconnect()
    for version, code in ((5, 0x9F), (4, 3)):
        c = node.raw(version)
        assert c.connect("flapper", expect_success=False).reason_code == code
    assert node.raw(5).connect("steady").reason_code == 0  # others are not affected
    let_time_pass(2.1)  # the ban runs out (elapsed time is the behaviour)
    assert node.raw(5).connect("flapper").reason_code == 0

