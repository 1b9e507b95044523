"""Takeover latency across nodes of a running cluster (a benchmark, not a test).

A persistent subscriber (MQTT 5.0, session expiry 3600) subscribes on node A and goes
away; N QoS 1 messages are published on node B; the subscriber reconnects on node C and
the time from sending CONNECT to receiving CONNACK (session present = 1) is measured, then
the time until all N messages arrived. Repeated for each N in --queued.

    python bench/takeover_bench.py --ports 1883,1884,1885 --queued 0,10000 --repeat 5
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
import uuid

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from node.mqtt.codec import decode, encode  # noqa: E402
from node.mqtt.codes import PropertyId  # noqa: E402
from node.mqtt.packets import (Connack, Connect, Disconnect, Puback, Publish,  # noqa: E402
                               Subscribe, Subscription)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def send(self, pkt) -> None:
        self.sock.sendall(encode(pkt, 5))

    def recv(self):
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while True:
                    if i >= len(self.buf):
                        break
                    b = self.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + n:
                            pkt = decode(self.buf[0], self.buf[i:i + n], 5)
                            self.buf = self.buf[i + n:]
                            return pkt
                        break
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            self.buf += data

    def close(self) -> None:
        self.sock.close()


def connect(port: int, cid: str, clean: bool) -> tuple[Client, Connack, float]:
    c = Client(port)
    t0 = time.perf_counter()
    c.send(Connect(cid, 5, clean_start=clean, keep_alive=60,
                   properties={PropertyId.SESSION_EXPIRY_INTERVAL: 3600}))
    ack = c.recv()
    return c, ack, time.perf_counter() - t0


def one(ports: list[int], queued: int) -> tuple[float, float]:
    a, b, c = ports
    cid = f"tk-{uuid.uuid4().hex[:10]}"
    sub, ack, _ = connect(a, cid, True)
    sub.send(Subscribe(1, (Subscription("tk/" + cid, 1),)))
    sub.recv()  # SUBACK
    sub.send(Disconnect())
    sub.close()
    pub, _, _ = connect(b, cid + "-pub", True)
    for i in range(1, queued + 1):
        pub.send(Publish("tk/" + cid, i.to_bytes(4, "big"), 1, packet_id=(i % 65535) + 1))
        if i % 1000 == 0 or i == queued:
            while True:  # wait for the PUBACKs of this block
                p = pub.recv()
                if isinstance(p, Puback) and p.packet_id == (i % 65535) + 1:
                    break
    pub.close()
    time.sleep(0.5)  # let forwarded messages reach the holder (not part of the measure)
    sub, ack, connack_s = connect(c, cid, False)
    assert isinstance(ack, Connack) and ack.session_present, ack
    t0 = time.perf_counter()
    got = 0
    while got < queued:
        p = sub.recv()
        if isinstance(p, Publish):
            got += 1
            sub.send(Puback(p.packet_id))
    all_s = time.perf_counter() - t0
    sub.send(Disconnect())
    sub.close()
    return connack_s, all_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", default="1883,1884,1885", help="MQTT ports of nodes A,B,C")
    ap.add_argument("--queued", default="0,10000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    for n in (int(q) for q in args.queued.split(",")):
        runs = [one(ports, n) for _ in range(args.repeat)]
        con = [r[0] * 1000 for r in runs]
        drain = [r[1] * 1000 for r in runs]
        print(f"queued={n:>6}  CONNECT->CONNACK ms: median {statistics.median(con):.1f} "
              f"min {min(con):.1f} max {max(con):.1f}   all {n} delivered+acked after CONNACK "
              f"ms: median {statistics.median(drain):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
