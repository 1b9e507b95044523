"""Which engine for node/store (a benchmark, not a test): the append-only log
(node.store.SessionStore) against SQLite in WAL mode (stdlib sqlite3, one transaction per
group commit, in a thread), behind the same group-commit front.

Scenario, per engine and durability mode: QoS 1 fan-in to one persistent session. P
producers each loop put_message + await commit() (a PUBACK may go out when it returns);
acknowledgements from the subscriber arrive as the messages become durable and
remove_message them. Reported: messages/s (fast mode: until everything is written, the
final flush in close() included), fsyncs/s (transactions/s for SQLite), average batch
(messages per fsync), p50/p99 commit latency. Then recovery: open() of a store holding
100k live messages. SQLite's fast mode has no back-pressure: its backlog grows into a few
huge transactions, hence its ~0 transactions/s during the run.

    python bench/store_bench.py                       # 4 and 64 producers, 3 s each
    python bench/store_bench.py --producers 4 --duration 5 --recovery 100000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from node.store import MessageRef, SessionStore  # noqa: E402


class SqliteStore:
    """The part of the SessionStore interface the scenario uses, on SQLite WAL.

    Same front as the log engine: mutations buffered in memory, bodies ref-counted in
    memory (written once, deleted when the last message goes), one writer task, one
    transaction per batch in a dedicated thread. synchronous=FULL fsyncs the WAL at each
    commit (durable); NORMAL only at checkpoints (survives a process crash, not a power
    loss). Checkpoints: SQLite's default (wal_autocheckpoint = 1000 pages)."""

    def __init__(self, data_dir: str, *, durability: str = "safe", synchronous: str = "FULL",
                 flush_interval: float = 0.010) -> None:
        self.path = os.path.join(data_dir, "store.sqlite")
        os.makedirs(data_dir, exist_ok=True)
        self.durability = durability
        self.synchronous = synchronous
        self.flush_interval = flush_interval
        self._ops: list = []
        self._submitted = self._durable = 0
        self._waiters: collections.deque = collections.deque()
        self._wake: asyncio.Event | None = None
        self._writer = None
        self._timer = None
        self._closing = False
        self._bodies: dict[int, int] = {}  # body id -> references
        self._keys_body: dict[tuple, int] = {}  # (cid, key) -> body id
        self._next_body = 1
        self._io = ThreadPoolExecutor(1)
        self.commits = self.transactions = self.records = 0
        self.db: sqlite3.Connection | None = None

    def open(self):
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.executescript("""
            CREATE TABLE IF NOT EXISTS sessions (cid TEXT PRIMARY KEY, meta BLOB);
            CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, record BLOB);
            CREATE TABLE IF NOT EXISTS messages (cid TEXT, key INTEGER, entry BLOB,
                body INTEGER, PRIMARY KEY (cid, key)) WITHOUT ROWID;
        """)
        self.db = db
        sessions = {cid: {"meta": msgpack.unpackb(meta), "messages": {}}
                    for cid, meta in db.execute("SELECT cid, meta FROM sessions")}
        bodies = {i: MessageRef(i, r) for i, r in db.execute("SELECT id, record FROM bodies")}
        for cid, key, e, b in db.execute("SELECT cid, key, entry, body FROM messages "
                                         "ORDER BY cid, key"):
            sessions[cid]["messages"][key] = (msgpack.unpackb(e), bodies[b])
            self._bodies[b] = self._bodies.get(b, 0) + 1
            self._keys_body[(cid, key)] = b
        self._next_body = max(bodies, default=0) + 1
        return sessions

    def _op(self, sql: str, params: tuple) -> None:
        self._ops.append((sql, params))
        self._submitted += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval,
                                                                self._on_timer)

    def _on_timer(self):
        self._timer = None
        self._kick()

    def put_session(self, cid: str, meta: dict) -> None:
        self._op("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (cid, msgpack.packb(meta)))

    def message_ref(self, record: bytes) -> MessageRef:
        ref = MessageRef(self._next_body, record)
        self._next_body += 1
        return ref

    def put_message(self, cid: str, key: int, entry: list, ref: MessageRef) -> None:
        n = self._bodies.get(ref.id, 0)
        if n == 0:
            self._op("INSERT OR REPLACE INTO bodies VALUES (?, ?)", (ref.id, ref.record))
        self._bodies[ref.id] = n + 1
        self._op("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
                 (cid, key, msgpack.packb(entry), ref.id))
        self._keys_body[(cid, key)] = ref.id

    def remove_message(self, cid: str, key: int) -> None:
        bid = self._keys_body.pop((cid, key), None)
        if bid is None:
            return
        self._op("DELETE FROM messages WHERE cid = ? AND key = ?", (cid, key))
        n = self._bodies[bid] - 1
        if n:
            self._bodies[bid] = n
        else:
            del self._bodies[bid]
            self._op("DELETE FROM bodies WHERE id = ?", (bid,))

    async def commit(self) -> None:
        self.commits += 1
        target = self._submitted
        if self._durable >= target or self.durability == "fast":
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._kick()
        await fut

    def _kick(self):
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                ops, end = self._ops, self._submitted
                self._ops = []
                await loop.run_in_executor(self._io, self._transaction, ops)
                self._durable = end
                while self._waiters and self._waiters[0][0] <= end:
                    self._waiters.popleft()[1].set_result(None)
            if self._closing:
                return

    def _transaction(self, ops) -> None:
        db = self.db
        db.execute("BEGIN")
        i = 0
        while i < len(ops):  # runs of the same statement go through executemany
            sql = ops[i][0]
            j = i
            while j < len(ops) and ops[j][0] is sql:
                j += 1
            db.executemany(sql, [p for _s, p in ops[i:j]])
            i = j
        db.execute("COMMIT")
        self.transactions += 1
        self.records += len(ops)

    def stats(self) -> dict:
        size = sum(os.path.getsize(self.path + s) for s in ("", "-wal")
                   if os.path.exists(self.path + s))
        return {"fsyncs": self.transactions, "commits": self.commits, "bytes_on_disk": size}

    async def close(self) -> None:
        if self._writer is not None:
            self._closing = True
            self._kick()
            await self._writer
        if self._timer is not None:
            self._timer.cancel()
        self.db.close()
        self._io.shutdown()


def make(engine: str, path: str, durability: str):
    if engine == "log":
        return SessionStore(path, durability=durability)
    if engine == "sqlite":
        return SqliteStore(path, durability=durability, synchronous="FULL")
    if engine == "sqlite-normal":
        return SqliteStore(path, durability=durability, synchronous="NORMAL")
    raise ValueError(engine)


RECORD = msgpack.packb(["sensors/1/temp", b"x" * 64, 1, False, None, None, "publisher-1"])


async def fan_in(engine: str, durability: str, producers: int, duration: float) -> dict:
    path = tempfile.mkdtemp(prefix="store-bench-", dir=os.environ.get("BENCH_DIR"))
    store = make(engine, path, durability)
    store.open()
    store.put_session("sub", {"expiry": 3600, "subs": [["sensors/#", 1, 0]]})
    await store.commit()
    acks: asyncio.Queue = asyncio.Queue()
    lat: list[float] = []
    done = 0
    counter = 0
    stop = time.monotonic() + duration

    async def producer() -> None:
        nonlocal done, counter
        while time.monotonic() < stop:
            key = counter
            counter += 1
            store.put_message("sub", key, [1, False, None, 0, key & 0xFFFF],
                              store.message_ref(RECORD))
            t0 = time.perf_counter()
            await store.commit()
            lat.append(time.perf_counter() - t0)
            done += 1
            acks.put_nowait(key)  # delivered; the subscriber's PUBACK comes back
            await asyncio.sleep(0)  # the next PUBLISH comes from the socket, like a broker

    async def subscriber() -> None:
        while True:
            key = await acks.get()
            store.remove_message("sub", key)

    sub = asyncio.ensure_future(subscriber())
    f0 = store.stats()["fsyncs"]
    t0 = time.monotonic()
    await asyncio.gather(*(producer() for _ in range(producers)))
    await asyncio.sleep(0)
    sub.cancel()
    st = store.stats()
    await store.close()  # fast mode: what is still pending counts in the time
    elapsed = time.monotonic() - t0
    fsyncs = st["fsyncs"] - f0
    shutil.rmtree(path)
    lat.sort()
    return {"msgs": done / elapsed, "fsyncs": fsyncs / elapsed,
            "batch": done / fsyncs if fsyncs else float("nan"),
            "p50": lat[len(lat) // 2] * 1e3, "p99": lat[int(len(lat) * 0.99)] * 1e3,
            "disk": st["bytes_on_disk"]}


async def recovery(engine: str, live: int, compacted: bool) -> tuple[float, int]:
    path = tempfile.mkdtemp(prefix="store-bench-", dir=os.environ.get("BENCH_DIR"))
    store = make(engine, path, "safe")
    store.open()
    store.put_session("sub", {"expiry": 3600})
    for start in range(0, live, 1000):
        for k in range(start, min(live, start + 1000)):
            store.put_message("sub", k, [1, False, None, 0, k & 0xFFFF],
                              store.message_ref(RECORD))
        await store.commit()
    if compacted and engine == "log":
        await store.compact()
    disk = store.stats()["bytes_on_disk"]
    await store.close()
    store = make(engine, path, "safe")
    t0 = time.perf_counter()
    loaded = store.open()
    took = time.perf_counter() - t0
    sessions = loaded[0].sessions if engine == "log" else loaded
    n = len(sessions["sub"].messages if engine == "log" else sessions["sub"]["messages"])
    assert n == live, n
    await store.close()
    shutil.rmtree(path)
    return took, disk


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--producers", default="4,64")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--engines", default="log,sqlite,sqlite-normal")
    ap.add_argument("--recovery", type=int, default=100_000)
    args = ap.parse_args()
    engines = args.engines.split(",")
    print(f"{'engine':<14}{'mode':<6}{'prod':>5}{'msg/s':>10}{'fsync/s':>9}{'batch':>9}"
          f"{'p50 ms':>8}{'p99 ms':>8}")
    for producers in [int(p) for p in args.producers.split(",")]:
        for engine in engines:
            for mode in ("safe", "fast"):
                if engine == "sqlite-normal" and mode == "fast":
                    continue
                r = await fan_in(engine, mode, producers, args.duration)
                print(f"{engine:<14}{mode:<6}{producers:>5}{r['msgs']:>10,.0f}"
                      f"{r['fsyncs']:>9,.0f}{r['batch']:>9,.0f}{r['p50']:>8.2f}{r['p99']:>8.2f}",
                      flush=True)
    if args.recovery:
        for engine in engines:
            if engine == "sqlite-normal":
                continue
            for compacted in ((False, True) if engine == "log" else (False,)):
                took, disk = await recovery(engine, args.recovery, compacted)
                what = "snapshot" if compacted else ("log" if engine == "log" else "db")
                print(f"recovery {engine:<7} {args.recovery:,} live messages from {what:<8}: "
                      f"{took:.3f} s ({disk / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
