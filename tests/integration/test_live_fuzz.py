"""Live fuzzing: random and mutated MQTT frames thrown at a running node over many short
connections. The node must survive, stay healthy and keep serving real clients.

Set SHOAL_FUZZ_SEED to replay a run; the seed is printed in every failure message."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from support import (
    Auth, Connect, Disconnect, Pingreq, Prop, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    Subscribe, Subscription, Unsubscribe, encode, enc_varint, frame,
)

FRAMES_TARGET = 100_000
TIME_BUDGET = 50.0  # seconds for the throwing itself, at most
MIN_DURATION = 8.0  # keep going at least this long, even past FRAMES_TARGET
FRAMES_PER_CONNECTION = 40  # on average
THREADS = 4


def _templates(version: int) -> list[bytes]:
    props = {Prop.USER_PROPERTY: [("k", "v")], Prop.CONTENT_TYPE: "t/p",
             Prop.MESSAGE_EXPIRY_INTERVAL: 5, Prop.CORRELATION_DATA: b"\x00\x01"}
    v5 = version == 5
    packets = [
        Connect(client_id="fz", protocol_level=version, keep_alive=30,
                properties={Prop.SESSION_EXPIRY_INTERVAL: 5, Prop.RECEIVE_MAXIMUM: 3} if v5
                else {}),
        Connect(client_id="fz-will", protocol_level=version, clean_start=False,
                will_topic="fz/will", will_payload=b"w", will_qos=1, username="u",
                password=b"p", will_properties={Prop.WILL_DELAY_INTERVAL: 1} if v5 else {}),
        Publish("fz/a", b"hello", 0),
        Publish("fz/b/c", b"x" * 40, 1, retain=True, packet_id=3,
                properties=props if v5 else {}),
        Publish("fz/q2", b"q2", 2, packet_id=4,
                properties={Prop.TOPIC_ALIAS: 1} if v5 else {}),
        Puback(3), Pubrec(4), Pubrel(4), Pubcomp(4),
        Subscribe(5, [Subscription("fz/#", 2, no_local=v5), Subscription("fz/+/c", 1)],
                  {Prop.SUBSCRIPTION_IDENTIFIER: [7]} if v5 else {}),
        Subscribe(6, [Subscription("$share/g/fz/#", 1)]),
        Unsubscribe(7, ["fz/#", "x"]),
        Pingreq(),
        Disconnect(0x04 if v5 else 0, {Prop.SESSION_EXPIRY_INTERVAL: 0} if v5 else {}),
    ]
    if v5:
        packets.append(Auth(0x18, {Prop.AUTHENTICATION_METHOD: "m"}))
    return [encode(p, version) for p in packets]


TEMPLATES = {4: _templates(4), 5: _templates(5)}
ALL_TEMPLATES = TEMPLATES[4] + TEMPLATES[5]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0 and b:  # flip one bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and len(b) > 1:  # truncate
            del b[rng.randrange(1, len(b)):]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and len(b) > 1:  # lie in the remaining length
            b[1] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 5:  # random packet type and flags
            b[0] = rng.randrange(256)
        elif op == 6 and len(b) > 4:  # duplicate a slice
            i = rng.randrange(len(b) - 2)
            j = rng.randrange(i + 1, len(b))
            b[j:j] = b[i:j]
        elif op == 7 and len(b) > 3:  # delete a slice
            i = rng.randrange(len(b) - 1)
            del b[i:i + rng.randint(1, 3)]
    return bytes(b)


def _random_frame(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randint(0, 24))
    if rng.random() < 0.8:
        return frame(rng.randrange(256), body)
    return bytes([rng.randrange(256)]) + enc_varint(rng.randint(0, 300)) + body


def _connection_payload(rng: random.Random) -> tuple[bytes, int]:
    """One connection's worth of frames: usually a valid CONNECT, then valid frames with
    bad ones mixed in at a rate picked per connection, so that the parser is hit in
    every state and not only on the first frame."""
    frames = []
    version = rng.choice((4, 5))
    if rng.random() < 0.85:
        frames.append(TEMPLATES[version][rng.randrange(2)])  # a valid CONNECT first
    bad_rate = rng.choice((0.01, 0.05, 0.2, 0.6))
    body = TEMPLATES[version][2:-1]  # no CONNECT, no DISCONNECT
    for _ in range(rng.randint(10, 2 * FRAMES_PER_CONNECTION)):
        r = rng.random()
        if r < bad_rate:
            frames.append(_mutate(rng, rng.choice(ALL_TEMPLATES)) if rng.random() < 0.75
                          else _random_frame(rng))
        else:
            frames.append(rng.choice(body))
    return b"".join(frames), len(frames)


@pytest.mark.timeout(120)
def test_node_survives_100k_random_and_mutated_frames(node):
    seed = int(os.environ.get("SHOAL_FUZZ_SEED", time.time_ns() % 2**32))
    guard = node.paho("fuzz-guard-7f3a9c", 5)
    guard.subscribe("guard/#", qos=1)

    sent = [0] * THREADS
    connections = [0] * THREADS
    errors: list = []
    deadline = time.monotonic() + TIME_BUDGET
    min_end = time.monotonic() + MIN_DURATION
    quota = FRAMES_TARGET // THREADS + 1

    def worker(n: int) -> None:
        rng = random.Random(seed * 31 + n)
        try:
            while (sent[n] < quota or time.monotonic() < min_end) \
                    and time.monotonic() < deadline:
                data, count = _connection_payload(rng)
                try:
                    with socket.create_connection((node.host, node.port), timeout=2) as s:
                        connections[n] += 1
                        s.sendall(data)
                        sent[n] += count
                        if rng.random() < 0.9:
                            # Half-close and read until the node closes: it has then
                            # parsed everything it was going to parse.
                            s.shutdown(socket.SHUT_WR)
                            s.settimeout(1.0)
                            for _ in range(1000):
                                if not s.recv(65536):
                                    break
                        # else: close at once (often a reset while the node reads)
                except (ConnectionError, socket.timeout):
                    pass  # the node closed on us: expected for bad frames
                except OSError as e:
                    if e.errno not in (104, 32, 107, 111):  # reset, pipe, not connected
                        raise
                assert node.alive(), "node died"
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIME_BUDGET + 15)
    elapsed = time.monotonic() - started
    total = sum(sent)
    info = (f"seed={seed} frames={total} connections={sum(connections)} "
            f"elapsed={elapsed:.1f}s errors={errors[:3]!r}")
    print(info)

    assert node.alive(), f"node died under fuzzing ({info})"
    assert not errors, info
    assert total >= FRAMES_TARGET, f"could not send {FRAMES_TARGET} frames in time ({info})"
    if node.has_admin:
        assert node.healthz()["status"] == "ok", info
        print("node stats after fuzzing:", node.stats())
    assert guard.disconnects == [], f"guard client was disconnected ({info})"
    guard.publish("guard/t", b"after-fuzz", qos=1)
    guard.wait_messages(1, topic="guard/t")

    fresh_sub = node.paho("fuzz-fresh-sub", 4)
    fresh_sub.subscribe("guard/fresh", qos=2)
    fresh_pub = node.paho("fuzz-fresh-pub", 5)
    fresh_pub.publish("guard/fresh", b"works", qos=2)
    assert fresh_sub.wait_messages(1)[0].payload == b"works", info
