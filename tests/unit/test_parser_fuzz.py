"""h11's fuzz invariant (fuzz/afl-server.py) for MqttConnection: any input either yields
packets or raises RemoteMqttError, never another exception, and gives the same result
fed whole or in random chunks. 100,000+ mutated and random frames, fixed seed."""

from __future__ import annotations

import random

from node.mqtt import codec
from node.mqtt._framing import encode_varint
from node.mqtt.codes import PropertyId as P, ReasonCode as R
from node.mqtt.connection import NEED_DATA, MqttConnection
from node.mqtt.errors import RemoteMqttError
from node.mqtt.packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
)

SEED = 20240611
FRAMES = 100_000


def corpus(version: int) -> list[bytes]:
    v5 = version == 5
    props = (lambda d: d) if v5 else (lambda d: {})
    pkts = [
        Connect("fuzz", version, "MQIsdp" if version == 3 else "MQTT", False, 30, "user",
                b"secret", Will("will/t", b"bye", 1, True,
                                props({P.WILL_DELAY_INTERVAL: 3, P.CONTENT_TYPE: "t"}))),
        Connect("c2", version, "MQIsdp" if version == 3 else "MQTT",
                properties=props({P.MAXIMUM_PACKET_SIZE: 1000, P.TOPIC_ALIAS_MAXIMUM: 3,
                                  P.AUTHENTICATION_METHOD: "x",
                                  P.AUTHENTICATION_DATA: b"y"})),
        Connack(True, R.SUCCESS, props({P.ASSIGNED_CLIENT_IDENTIFIER: "id"})),
        Publish("a/b", b"payload"),
        Publish("a/b/c", b"x" * 200, 1, True, True, 10,
                props({P.USER_PROPERTY: [("k", "v")], P.MESSAGE_EXPIRY_INTERVAL: 9})),
        Publish("t", b"", 2, False, False, 65535,
                props({P.TOPIC_ALIAS: 2, P.RESPONSE_TOPIC: "r", P.CORRELATION_DATA: b"c",
                       P.PAYLOAD_FORMAT_INDICATOR: 1, P.CONTENT_TYPE: "text/plain"})),
        Puback(1), Pubrec(2), Pubrel(3), Pubcomp(4),
        Puback(5, R.QUOTA_EXCEEDED if v5 else 0, props({P.REASON_STRING: "why"})),
        Pubrel(6, R.PACKET_IDENTIFIER_NOT_FOUND if v5 else 0),
        Subscribe(7, (Subscription("a/+", 1, v5, v5, 2 if v5 else 0),
                      Subscription("$share/g/#", 2)), props({P.SUBSCRIPTION_IDENTIFIER: [4]})),
        Suback(7, (0, 1, 0x80)), Unsubscribe(8, ("a/+", "b")),
        Unsuback(8, (0, 0x11) if v5 else ()), Pingreq(), Pingresp(),
        Disconnect(R.DISCONNECT_WITH_WILL_MESSAGE if v5 else 0,
                   props({P.SESSION_EXPIRY_INTERVAL: 5})),
    ]
    if v5:
        pkts.append(Auth(R.CONTINUE_AUTHENTICATION, {P.AUTHENTICATION_METHOD: "SCRAM",
                                                       P.AUTHENTICATION_DATA: b"\x00\x01"}))
        pkts.append(Disconnect())
    return [codec.encode(p, version) for p in pkts]


CORPUS = {v: corpus(v) for v in (3, 4, 5)}
#: What a client may send after its CONNECT (most of the fuzzing starts from these).
CLIENT_TYPES = {3, 4, 5, 6, 7, 8, 10, 12, 15}
CLIENT_CORPUS = {v: [f for f in fs if f[0] >> 4 in CLIENT_TYPES] for v, fs in CORPUS.items()}
CONNECTS = {v: codec.encode(Connect("fz", v, "MQIsdp" if v == 3 else "MQTT", properties=(
    {P.TOPIC_ALIAS_MAXIMUM: 5} if v == 5 else {})), v) for v in (3, 4, 5)}


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        op = rnd.randrange(8)
        if op == 0 and b:  # flip a bit
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # replace a byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 2:  # truncate
            del b[rnd.randrange(len(b) + 1):]
        elif op == 3:  # insert random bytes
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.randbytes(rnd.randint(1, 4))
        elif op == 4 and len(b) > 2:  # delete a range
            i = rnd.randrange(len(b))
            del b[i:i + rnd.randint(1, 4)]
        elif op == 5 and b:  # random remaining length, body kept
            body = bytes(b[1:])
            rl = rnd.choice((0, 1, 2, 127, 128, 16383, 16384, rnd.randrange(1 << 28)))
            b[1:] = encode_varint(rl) + body
        elif op == 6:  # random header byte
            if b:
                b[0] = rnd.randrange(256)
        else:  # interesting bytes somewhere
            if b:
                b[rnd.randrange(len(b))] = rnd.choice((0x00, 0x7F, 0x80, 0xFF, 0x23, 0x2B))
    return bytes(b)


def random_frame(rnd: random.Random) -> bytes:
    body = rnd.randbytes(rnd.randint(0, 40))
    return bytes((rnd.randrange(256),)) + encode_varint(len(body)) + body


def run(version: int, data: bytes, chunks: list[bytes], max_packet_size: int):
    conn = MqttConnection(max_packet_size=max_packet_size, topic_alias_maximum=4)
    out: list = []
    try:
        conn.receive_data(CONNECTS[version])
        for c in chunks:
            conn.receive_data(c)
            while (p := conn.next_packet()) is not NEED_DATA:
                out.append(p)
        conn.receive_data(b"")
        while (p := conn.next_packet()) is not NEED_DATA:
            out.append(p)
    except RemoteMqttError as exc:
        # Sticky: the same error again.
        try:
            conn.next_packet()
        except RemoteMqttError as again:
            assert again is exc
        else:
            raise AssertionError("error state did not stick")
        return out, type(exc), exc.reason
    return out, None, None


def split(rnd: random.Random, data: bytes) -> list[bytes]:
    if len(data) < 2:
        return [data]
    k = rnd.randint(1, min(8, len(data) - 1))
    cuts = sorted(rnd.sample(range(1, len(data)), k))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def test_any_frame_yields_packets_or_raises_remote_error():
    rnd = random.Random(SEED)
    outcomes = {"ok": 0, "error": 0, "packets": 0}
    for i in range(FRAMES):
        version = (3, 4, 5, 5)[i & 3]
        r = rnd.random()
        if r < 0.55:
            frame = mutate(rnd, rnd.choice(CLIENT_CORPUS[version]))
        elif r < 0.65:
            frame = mutate(rnd, rnd.choice(CORPUS[version]))
        elif r < 0.75:
            frame = random_frame(rnd)
        else:  # several frames, one of them mutated
            frames = rnd.sample(CLIENT_CORPUS[version], 4)
            frames[rnd.randrange(4)] = mutate(rnd, frames[0])
            frame = b"".join(frames)
        max_size = rnd.choice((268_435_460, 268_435_460, 64))
        whole = run(version, frame, [frame], max_size)
        chunked = run(version, frame, split(rnd, frame), max_size)
        assert whole == chunked, (version, frame.hex(), whole, chunked)
        outcomes["error" if whole[1] else "ok"] += 1
        outcomes["packets"] += len(whole[0]) - 1  # beyond the CONNECT
    # The mutations must reach both outcomes in quantity, or the test proves little.
    assert outcomes["ok"] > FRAMES // 10 and outcomes["error"] > FRAMES // 5, outcomes
    assert outcomes["packets"] > FRAMES // 2, outcomes


def test_decode_of_random_bodies_raises_only_remote_errors():
    rnd = random.Random(SEED + 1)
    for i in range(30_000):
        b0 = rnd.randrange(256)
        if rnd.random() < 0.5:
            frame = rnd.choice(CORPUS[(3, 4, 5)[i % 3]])
            body = mutate(rnd, frame[2:] if frame[1] < 128 else frame[3:])
        else:
            body = rnd.randbytes(rnd.randint(0, 30))
        for version in (3, 4, 5):
            try:
                codec.decode(b0, body, version)
            except RemoteMqttError:
                pass


def test_byte_by_byte_feeding_of_mutated_streams_matches_whole():
    rnd = random.Random(SEED + 2)
    for i in range(2_000):
        version = (3, 4, 5)[i % 3]
        frame = mutate(rnd, b"".join(rnd.sample(CLIENT_CORPUS[version], 4)))
        whole = run(version, frame, [frame], 268_435_460)
        single = run(version, frame, [frame[j:j + 1] for j in range(len(frame))], 268_435_460)
        assert whole == single, frame.hex()
