"""MQTT over WebSocket (``ws_port``, path ``ws_path``, subprotocol ``mqtt``; MQTT 3.1.1 and
5.0 §6): paho-mqtt with transport="websockets" against plain TCP clients, a raw aiohttp
WebSocket client for what paho cannot do (split and packed frames, text frames, wrong
handshakes, not reading), and plain HTTP. The node is a real process; every bad request
must leave it serving."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

import aiohttp
import pytest

from support import (CONNACK, SUBACK, Connect, Publish, Subscribe, Subscription,
                     barrier, decode, encode, split_frames, unique_free_port, wait_for)

pytestmark = [pytest.mark.timeout(60), pytest.mark.shoal_only("Shoal's WebSocket listener")]

DEADLINE = 5.0  # seconds any single exchange may take


@pytest.fixture
def ws_node(start_node):
    port = unique_free_port()
    node = start_node(ws_port=port)
    node.ws_port = port
    return node


def ws_paho(node, client_id: str, version: int = 5, **kw):
    return node.paho(client_id, version, transport="websockets", port=node.ws_port, **kw)


def url(node, path: str = "/mqtt", scheme: str = "ws") -> str:
    return f"{scheme}://{node.host}:{node.ws_port}{path}"


def run(coro):
    """Run one aiohttp client scenario, bounded as a whole."""
    return asyncio.run(asyncio.wait_for(coro, 30))


async def mqtt_frames(ws, want: int, timeout: float = DEADLINE) -> list:
    """Read binary messages until ``want`` MQTT packets arrived; (first byte, body) each."""
    buf = bytearray()
    frames: list = []
    async with asyncio.timeout(timeout):
        while len(frames) < want:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, f"expected binary, got {msg}"
            buf += msg.data
            frames += split_frames(buf)
    return frames


# -- paho over WebSocket against TCP clients ---------------------------------------------------


@pytest.mark.parametrize("version", [4, 5], ids=["3.1.1", "5.0"])
def test_qos_0_1_2_round_trip_between_websocket_and_tcp_clients(ws_node, version):
    ws = ws_paho(ws_node, f"ws-{version}", version)
    tcp = ws_node.paho(f"tcp-{version}", version)
    ws.subscribe("ws/in/#", qos=2)
    tcp.subscribe("ws/out/#", qos=2)
    for qos in (0, 1, 2):
        tcp.publish(f"ws/in/{qos}", f"to-ws-{qos}".encode(), qos=qos)
        ws.publish(f"ws/out/{qos}", f"from-ws-{qos}".encode(), qos=qos)
    got_ws = ws.wait_messages(3)
    got_tcp = tcp.wait_messages(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got_ws) == [
        (f"ws/in/{q}", f"to-ws-{q}".encode(), q) for q in (0, 1, 2)]
    assert sorted((m.topic, m.payload, m.qos) for m in got_tcp) == [
        (f"ws/out/{q}", f"from-ws-{q}".encode(), q) for q in (0, 1, 2)]
    # WebSocket to WebSocket as well
    ws2 = ws_paho(ws_node, f"ws2-{version}", version)
    ws2.publish("ws/in/x", b"ws-to-ws", qos=1)
    assert ws.wait_messages(4)[-1].payload == b"ws-to-ws"


def test_one_megabyte_payload_both_ways(ws_node):
    payload = os.urandom(1_000_000)  # under the default max_packet_size (1 MiB) with headers
    ws = ws_paho(ws_node, "ws-big")
    tcp = ws_node.paho("tcp-big")
    ws.subscribe("big/to-ws", qos=1)
    tcp.subscribe("big/to-tcp", qos=1)
    ws.publish("big/to-tcp", payload, qos=1, timeout=DEADLINE * 2)
    tcp.publish("big/to-ws", payload[::-1], qos=1, timeout=DEADLINE * 2)
    assert tcp.wait_messages(1, timeout=DEADLINE * 2)[0].payload == payload
    assert ws.wait_messages(1, timeout=DEADLINE * 2)[0].payload == payload[::-1]


def test_packets_split_across_frames_and_packed_into_one_frame(ws_node):
    """An MQTT packet may span WebSocket frames and a frame may hold several packets."""
    tcp = ws_node.paho("tcp-split")
    tcp.subscribe("split/#", qos=1)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url(ws_node), protocols=("mqtt",)) as ws:
                assert ws.protocol == "mqtt"  # echoed [MQTT-6.0.0-4]
                connect = encode(Connect("raw-split"), 5)
                for i in range(len(connect)):  # one byte per frame
                    await ws.send_bytes(connect[i:i + 1])
                (first, body), = await mqtt_frames(ws, 1)
                assert first >> 4 == CONNACK and decode(first, body, 5).reason_code == 0
                packed = b"".join(encode(Publish(f"split/{i}", b"p%d" % i, qos=1, packet_id=i + 1), 5)
                                  for i in range(5))
                sub = encode(Subscribe(9, [Subscription("split/echo", qos=0)]), 5)
                await ws.send_bytes(packed + sub[:3])  # five packets and a piece of a sixth
                await ws.send_bytes(sub[3:])
                acks = await mqtt_frames(ws, 6)
                assert sorted(f >> 4 for f, _ in acks) == [4] * 5 + [SUBACK]
    run(scenario())
    assert tcp.wait_messages(5)[-1].payload == b"p4"
    assert [m.payload for m in tcp.messages] == [b"p%d" % i for i in range(5)]


# -- what is not MQTT over WebSocket ------------------------------------------------------------


def test_plain_http_and_wrong_handshakes_are_refused_with_4xx_and_the_node_keeps_serving(ws_node):
    base = f"http://{ws_node.host}:{ws_node.ws_port}"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/mqtt", timeout=DEADLINE)
    assert err.value.code == 426 and b"subprotocol 'mqtt'" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/elsewhere", timeout=DEADLINE)
    assert err.value.code == 404

    async def handshake(protocols):
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                async with http.ws_connect(url(ws_node), protocols=protocols):
                    pass
            return err.value.status

    # no subprotocol, or only one we do not speak: refused (our decision, see node/websocket.py)
    assert run(handshake(())) == 400
    assert run(handshake(("mqttv3.1",))) == 400
    ws = ws_paho(ws_node, "still-serving")
    ws.subscribe("alive", qos=1)
    ws_node.paho("tcp-alive").publish("alive", b"yes", qos=1)
    assert ws.wait_messages(1)[0].payload == b"yes"


def test_text_frame_closes_the_connection_and_publishes_the_will(ws_node):
    watcher = ws_node.paho("will-watcher")
    watcher.subscribe("will/#", qos=1)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url(ws_node), protocols=("mqtt",)) as ws:
                await ws.send_bytes(encode(Connect("texter", will_topic="will/texter",
                                                   will_payload=b"gone"), 5))
                (first, body), = await mqtt_frames(ws, 1)
                assert first >> 4 == CONNACK
                await ws.send_str("hello")  # [MQTT-6.0.0-1]: not binary -> close
                async with asyncio.timeout(DEADLINE):
                    msg = await ws.receive()
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                return ws.close_code
    assert run(scenario()) == aiohttp.WSCloseCode.UNSUPPORTED_DATA
    assert watcher.wait_messages(1)[0].payload == b"gone"
    ws = ws_paho(ws_node, "after-text")
    assert ws.is_connected()


def test_mqtt_protocol_error_over_websocket_closes_only_that_connection(ws_node):
    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url(ws_node), protocols=("mqtt",)) as ws:
                await ws.send_bytes(b"\x10\x02\x00\x00")  # a CONNECT that is no CONNECT
                async with asyncio.timeout(DEADLINE):
                    while True:
                        msg = await ws.receive()
                        if msg.type is not aiohttp.WSMsgType.BINARY:
                            return msg.type
    assert run(scenario()) in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws_paho(ws_node, "after-error").is_connected()


# -- flow control and shutdown ------------------------------------------------------------------


def test_websocket_subscriber_that_stops_reading_is_bounded_and_holds_up_nobody(start_node):
    """A WebSocket subscriber that reads nothing: past the write buffer mark its session
    queues and drops (its queue bound applies), the node's memory does not grow with
    what is published, and other clients are served meanwhile."""
    port = unique_free_port()
    node = start_node(ws_port=port, max_queue=10, write_buffer_high=65536)
    node.ws_port = port
    count, size = 1500, 16384  # 24 MB: more than the socket buffers of a loopback pair hold

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url(node), protocols=("mqtt",)) as ws:
                await ws.send_bytes(encode(Connect("slow-ws"), 5))
                await mqtt_frames(ws, 1)
                await ws.send_bytes(encode(Subscribe(1, [Subscription("flood", qos=0)]), 5))
                await mqtt_frames(ws, 1)
                # from here on this client reads nothing
                rss_before = node.rss_kb()
                pub = node.paho("flooder")
                payload = b"x" * size
                for _ in range(count):
                    pub.publish("flood", payload, qos=0, wait=False)
                other = node.paho("other")
                other.subscribe("ping", qos=1)
                await asyncio.to_thread(barrier, other, pub, "ping")  # the node serves
                await asyncio.to_thread(
                    wait_for, lambda: "dropping messages client_id=slow-ws" in node.log_tail(),
                    DEADLINE, 0.05, "the slow WebSocket subscriber's queue to overflow")
                return rss_before, node.rss_kb()
    rss_before, rss_after = run(scenario())
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)  # far below 24 MB
    assert ws_paho(node, "after-flood").is_connected()


def test_node_shutdown_disconnects_websocket_clients_with_0x8b(ws_node):
    ws = ws_paho(ws_node, "ws-shutdown")
    assert ws.is_connected()
    assert ws_node.stop() == 0
    wait_for(lambda: ws.disconnects, DEADLINE, message="the client's disconnect")
    assert ws.disconnects[0] == 0x8B  # Server shutting down


@pytest.mark.shoal_only("Shoal's connect_timeout on the WebSocket listener")
def test_sockets_that_never_upgrade_are_closed_after_connect_timeout(start_node):
    """Idle and slowloris sockets on the WebSocket listener (no upgrade ever completes) are
    closed after connect_timeout, while a real WebSocket client works meanwhile."""
    import socket
    import time as _time
    ws_port = unique_free_port()
    node = start_node(ws_port=ws_port, connect_timeout=1.5)
    socks = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", ws_port), timeout=5)
        if i % 2:
            s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        socks.append(s)
    client = node.paho("ws-while-idle", 5, transport="websockets", port=ws_port)
    client.subscribe("idle/t", qos=1)
    client.publish("idle/t", b"ok", qos=1)
    assert client.wait_messages(1)[0].payload == b"ok"
    deadline = _time.monotonic() + 10
    closed = 0
    for s in socks:
        s.settimeout(max(0.1, deadline - _time.monotonic()))
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass
        s.close()
    assert closed == len(socks)
    assert client.is_connected()
