#!/usr/bin/env python3
"""QoS 2 publish-to-delivery latency to a PERSISTENT subscriber (a benchmark, not a test).

One node is started from ``--repo`` (default: this checkout) on a fresh data dir with
``--durability`` (default safe); a paho-mqtt MQTT 5 subscriber (Session Expiry 3600,
QoS 2) and a QoS 2 publisher on 127.0.0.1 exchange ``--rate`` messages per second for
``--seconds``; each payload carries its send time. Prints messages, p50/p90/p99/max in
ms and the achieved rate. Used to measure what writing a QoS 2 PUBLISH only after its
packet id is durable costs (run it with ``--repo`` on a checkout before that change).

  .venv/bin/python bench/qos2_latency.py [--repo PATH] [--rate 500] [--seconds 10]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(repo: str, durability: str, data_dir: str):
    port, admin = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "run", "--host", "127.0.0.1", "--mqtt-port", str(port),
         "--admin-port", str(admin), "--data-dir", data_dir, "--durability", durability],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the node exited with {proc.returncode}")
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the node did not listen within 20 s")


def client(cid: str, port: int, persistent: bool) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, 60, clean_start=not persistent, properties=props)
    c.loop_start()
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=ROOT)
    ap.add_argument("--durability", default="safe", choices=("safe", "fast"))
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="shoal-q2-")
    proc, port = start_node(os.path.abspath(args.repo), args.durability, data_dir)
    lat: list[float] = []
    got = threading.Event()
    total = int(args.rate * args.seconds)
    try:
        sub = client("q2-sub", port, persistent=True)

        def on_message(_c, _u, m):
            lat.append(time.perf_counter() - float(m.payload))
            if len(lat) >= total:
                got.set()
        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.subscribe("q2/t", qos=2)
        if not subscribed.wait(5):
            raise SystemExit("no SUBACK")
        pub = client("q2-pub", port, persistent=False)
        t0 = time.perf_counter()
        for i in range(total):
            due = t0 + i / args.rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(due - now, 0.001))
            pub.publish("q2/t", repr(time.perf_counter()).encode(), qos=2)
        got.wait(args.seconds + 30)
        elapsed = time.perf_counter() - t0
        ms = sorted(x * 1000 for x in lat)
        q = statistics.quantiles(ms, n=100)
        print(f"repo={args.repo} durability={args.durability} messages={len(ms)}/{total} "
              f"rate={len(ms) / elapsed:.0f}/s p50={q[49]:.2f}ms p90={q[89]:.2f}ms "
              f"p99={q[98]:.2f}ms max={ms[-1]:.2f}ms")
        pub.disconnect()
        sub.disconnect()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
