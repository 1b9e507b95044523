"""Claims per second the Raft routing table sustains (a benchmark, not a test): three
real pysyncobj nodes (threads, loopback TCP, encrypted) in one process; W concurrent
claimers submit ClientID claims through followers and the leader for D seconds.

    python bench/claims_bench.py --writers 1,32,1000 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from cluster.routing import RaftNode, RoutingView  # noqa: E402


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def run(writers: list[int], duration: float) -> None:
    loop = asyncio.get_running_loop()
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = [RaftNode(a, [b for b in addrs if b != a], "bench-secret", "127.0.0.1",
                      RoutingView(), loop) for a in addrs]
    try:
        while not any(n.status()["is_leader"] for n in nodes):
            await asyncio.sleep(0.05)
        for w in writers:
            done = 0
            lat: list[float] = []
            stop = time.monotonic() + duration

            async def writer(i: int) -> None:
                nonlocal done
                node = nodes[i % 3]
                k = 0
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    await node.run(("claim", f"w{i}-{k}", f"n{i % 3}", True), 10.0)
                    lat.append(time.perf_counter() - t0)
                    done += 1
                    k += 1

            t0 = time.monotonic()
            await asyncio.gather(*(writer(i) for i in range(w)))
            elapsed = time.monotonic() - t0
            lat.sort()
            print(f"writers={w:>5}  claims/s {done / elapsed:>9,.0f}   latency ms p50 "
                  f"{lat[len(lat) // 2] * 1000:.2f} p99 {lat[int(len(lat) * 0.99)] * 1000:.2f}",
                  flush=True)
    finally:
        for n in nodes:
            n.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="1,32,1000")
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    asyncio.run(run([int(w) for w in args.writers.split(",")], args.duration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
