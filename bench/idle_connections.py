"""Memory per idle connection: open N MQTT connections (CONNECT, wait for CONNACK, then
stay idle), read the broker's RSS before and after, print the difference divided by N.

    python bench/idle_connections.py --port 1883 --pid <broker pid> --clients 10000

A benchmark, not a test. Loopback only; bounded by --clients and --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def connect_frame(client_id: str, version: int) -> bytes:
    cid = client_id.encode()
    name = b"\x00\x04MQTT"
    props = b"\x00" if version == 5 else b""
    variable = name + bytes((version, 0x02)) + (300).to_bytes(2, "big") + props
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    return bytes((0x10, len(body))) + body  # small enough for a 1-byte length


async def open_client(host: str, port: int, i: int, version: int, writers: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_frame(f"idle-{i}", version))
    head = await reader.readexactly(2)
    await reader.readexactly(head[1])
    if head[0] != 0x20:
        raise RuntimeError(f"expected CONNACK, got {head!r}")
    writers.append(writer)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="broker process id (for RSS)")
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--version", type=int, default=4, choices=(4, 5))
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.clients + 100 > hard:
        print(f"file limit {hard} is too low for {args.clients} clients", file=sys.stderr)
        return 2
    before = rss_kib(args.pid)
    writers: list = []
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()

    async def one(i: int) -> None:
        async with sem:
            await open_client(args.host, args.port, i, args.version, writers)

    done = 0
    for start in range(0, args.clients, 1000):
        batch = range(start, min(start + 1000, args.clients))
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in batch)), args.timeout)
        done += len(batch)
        print(f"  {done}/{args.clients} connected, broker RSS {rss_kib(args.pid) / 1024:.1f} MiB",
              file=sys.stderr, flush=True)
    await asyncio.sleep(1.0)  # let the broker settle (allocator, timers)
    after = rss_kib(args.pid)
    elapsed = time.monotonic() - t0
    per = (after - before) * 1024 / args.clients
    print(f"clients={args.clients} version={args.version} rss_before={before / 1024:.1f}MiB "
          f"rss_after={after / 1024:.1f}MiB per_connection={per / 1024:.2f}KiB "
          f"connect_time={elapsed:.1f}s")
    for w in writers:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
