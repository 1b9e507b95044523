"""``SessionStore``: the durable session store, an append-only log with group commit and
compaction (chosen by measurement: bench/store_bench.py, numbers in node/store/README.md).

Mutations (``put_session``, ``put_message``...) are synchronous and cheap: each updates
the in-memory ``LiveState`` and appends one framed msgpack record to a buffer. A single
writer task moves the buffer to disk: one ``write`` + ``fdatasync`` in the store's I/O
thread per batch, so the event loop never waits on the disk, and every ``commit()``
called while a batch is being written is satisfied by the next one (group commit).

Compaction: when the files of the current generation are over ``compact_min_bytes`` and
more than ``compact_ratio`` times what is live, the writer *cuts* between two batches:
it freezes the live state, flushes what is pending into ``log-G``, starts ``log-(G+1)``
(later batches go there), and a compaction thread writes the frozen state as
``snapshot-(G+1)``, fsyncs it and the directory, switches ``CURRENT`` (write a temporary
file, fsync, rename, fsync the directory) and only then deletes ``snapshot-G`` and
``log-G``. A crash at any step leaves files ``recovery`` reads to the same state.

Durability modes:

* ``"safe"`` (default): ``commit()`` returns once everything submitted before it is
  written and fdatasync'ed. A process crash, kill -9 or power loss loses nothing a
  ``commit()`` returned for (as far as the disk honours fsync).
* ``"fast"``: ``commit()`` returns at once. The writer writes and fsyncs what is pending
  at the latest ``flush_interval`` (10 ms) after it was submitted, and back to back while
  more keeps coming. Nothing is written before ``commit()`` returns, so a process crash
  (kill -9) *and* a power loss both lose the acknowledged changes not yet fsynced: those
  submitted in the last ``flush_interval`` plus the batch being written (under a busy
  loop, the batch written in the last fsync time, typically well under 20 ms of
  traffic). A clean ``close()`` loses nothing. What recovery finds is always a prefix of
  the history: the most recent changes are lost, never a hole in the middle. When more
  than ``max_pending_bytes`` (1 MiB) wait to be written, ``commit()`` waits for the disk
  as in safe mode (back-pressure). That bound matters: when the event loop is saturated,
  the I/O thread barely gets the GIL back after its write (CPython's convoy effect: the
  loop releases and retakes the GIL in every select()), and was measured needing 280 ms
  for one write; without back-pressure the backlog, and so the loss window, would grow.
  So the loss is at most ``max_pending_bytes`` of records, usually about 10 ms.

A write or fsync error fails the store for good: after a failed fsync the page cache
cannot be trusted, so the node must restart and recover. ``on_failure`` is told once (the
node stops on it); from then on every commit fails with ``StoreError`` (so nothing more
is acknowledged as stored) and mutations are no longer written (they only keep the
in-memory view consistent while the node shuts down).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from . import disk
from .format import (DAMAGED_DIR, LOCK, Op, frame, header, log_name, pack, snapshot_name)
from .recovery import RecoveryReport, recover
from .state import LiveState, LoadedState, MessageRef, SessionData

log = logging.getLogger("shoal.store")

DURABILITY_MODES = ("safe", "fast")


class StoreError(Exception):
    """The store cannot do what was asked: misuse (unknown session), a data directory in
    use by another process, or a failed write (the store is then unusable)."""


class SessionStore:
    def __init__(self, data_dir: str, *, durability: str = "safe",
                 flush_interval: float = 0.010, compact_min_bytes: int = 16 << 20,
                 compact_ratio: float = 2.0, max_pending_bytes: int = 1 << 20) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        self.data_dir = os.path.abspath(data_dir)
        self.durability = durability
        self.flush_interval = flush_interval
        self.compact_min_bytes = compact_min_bytes
        self.compact_ratio = compact_ratio
        self.max_pending_bytes = max_pending_bytes
        self._state = LiveState()
        self._buf = bytearray()
        self._submitted = 0        # records appended to the buffer, ever
        self._durable = 0          # of which written and fsynced
        self._taken = 0            # of which taken by the writer (the rest is in _buf)
        self._waiters: collections.deque = collections.deque()  # (target, future)
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._compaction: asyncio.Task | None = None
        self._cut_wanted = False
        self._cut_waiters: list[asyncio.Future] = []
        self._closing = False
        self._failed: BaseException | None = None
        #: called once, in the loop, when a write, fsync or compaction fails
        self.on_failure = None
        self._opened = False
        self._closed = False
        self._lock_fd = -1
        self._fd = -1              # log-gen, open for appending
        self._gen = 0
        self._snap_bytes = 0
        self._log_bytes = 0
        self._old_bytes = 0        # files of the previous generation not yet deleted
        self._next_body_id = 1
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shoal-store-io")
        self._cx = ThreadPoolExecutor(1, thread_name_prefix="shoal-store-compact")
        self._stats = {"commits": 0, "fsyncs": 0, "batches": 0, "records_written": 0,
                       "bytes_written": 0, "compactions": 0, "last_compaction": None}

    # --- opening ---

    def open(self) -> tuple[LoadedState, RecoveryReport]:
        """Read the data directory (blocking: call it before serving clients), repair what
        needs it, and return the live state and what recovery found."""
        if self._opened or self._closed:
            raise StoreError("a SessionStore opens once; make a new one to reopen")
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.data_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._lock_fd)
            raise StoreError(f"{self.data_dir} is in use by another process (each node needs "
                             f"a --data-dir of its own)") from err
        t0 = time.monotonic()
        rec = recover(self.data_dir)
        self._state = rec.state
        self._next_body_id = rec.max_body_id + 1
        report = rec.report
        if rec.fresh:
            self._gen = 1
            self._fd, self._log_bytes = disk.create_log(self._path(log_name(1)), 1)
            disk.fsync_dir(self.data_dir)
            disk.write_current(self.data_dir, 1, False)
        elif rec.rewrite:
            self._rewrite(rec)
        else:
            self._gen = rec.gen
            self._snap_bytes = rec.snapshot_bytes
            path = self._path(log_name(rec.gen))
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            if rec.log_end < rec.log_size:
                os.ftruncate(self._fd, rec.log_end)
                os.fsync(self._fd)
            self._log_bytes = rec.log_end
            if rec.log_end == 0:  # created, then the crash came before its header
                disk.write_all(self._fd, header("log", rec.gen))
                os.fsync(self._fd)
                self._log_bytes = os.fstat(self._fd).st_size
            for name in rec.leftovers:
                _unlink(self._path(name))
            if rec.leftovers:
                disk.fsync_dir(self.data_dir)
        self._opened = True
        for p in report.problems:
            log.warning("store recovery: %s", p)
        for n in report.notes:
            log.info("store recovery: %s", n)
        log.info("store opened: dir=%s generation=%d sessions=%d messages=%d records=%d "
                 "in %.3fs", self.data_dir, self._gen, len(self._state.sessions),
                 self._state.messages, report.records_read, time.monotonic() - t0)
        return self._state.loaded(), report

    def _rewrite(self, rec) -> None:
        """Write the recovered state as a new generation, switch to it, then put damaged
        files aside and delete the rest, so damage is never read twice."""
        gen = rec.max_gen + 1
        self._snap_bytes = disk.write_snapshot(self._path(snapshot_name(gen)), gen,
                                               self._state.freeze())
        self._fd, self._log_bytes = disk.create_log(self._path(log_name(gen)), gen)
        disk.fsync_dir(self.data_dir)
        disk.write_current(self.data_dir, gen, True)
        self._gen = gen
        keep = {snapshot_name(gen), log_name(gen)}
        if rec.damaged:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            os.makedirs(self._path(DAMAGED_DIR), exist_ok=True)
            for name in rec.damaged:
                if os.path.exists(self._path(name)):
                    os.replace(self._path(name), self._path(DAMAGED_DIR, f"{name}.{stamp}"))
            disk.fsync_dir(self._path(DAMAGED_DIR))
        for name in os.listdir(self.data_dir):
            old_data = name.startswith(("snapshot-", "log-")) or name in rec.leftovers
            if old_data and name not in keep:
                _unlink(self._path(name))
        disk.fsync_dir(self.data_dir)

    def _path(self, *names: str) -> str:
        return os.path.join(self.data_dir, *names)

    # --- mutations: synchronous, buffered ---

    def _append(self, rec: list) -> int:
        if self._failed is not None:
            return 0  # failed: nothing is written any more, every commit fails (see above)
        if not self._opened:
            self._unusable()
        f = frame(pack(rec))
        self._buf += f
        self._submitted += 1
        if self._timer is None:
            self._arm_timer()
        return len(f)

    def _unusable(self):
        if self._failed is not None:
            raise StoreError("the store failed and must be reopened") from self._failed
        raise StoreError("the store is closed" if self._closed else "the store is not open")

    def _session(self, cid: str):
        s = self._state.sessions.get(cid)
        if s is None:
            raise StoreError(f"no session {cid!r} in the store (put_session first)")
        return s

    def put_session(self, client_id: str, meta: dict) -> None:
        size = self._append([Op.SESSION, client_id, meta])
        self._state.put_session(client_id, meta, size)

    def delete_session(self, client_id: str) -> None:
        if client_id in self._state.sessions:
            self._append([Op.DROP_SESSION, client_id])
            self._state.drop_session(client_id)

    def message_ref(self, record: bytes) -> MessageRef:
        """A body to pass to ``put_message`` for every session that queues it: it is
        written once, with the first message that uses it, and forgotten when the last
        one is removed."""
        ref = MessageRef(self._next_body_id, record)
        self._next_body_id += 1
        return ref

    def put_message(self, client_id: str, key: int, entry: list, payload_ref: MessageRef) -> None:
        self._session(client_id)
        st = self._state
        if payload_ref.id not in st.bodies:
            size = self._append([Op.BODY, payload_ref.id, payload_ref.record])
            st.put_body(payload_ref.id, payload_ref.record, size)
        size = self._append([Op.MESSAGE, client_id, key, entry, payload_ref.id])
        st.put_message(client_id, key, entry, payload_ref.id, size)

    def update_message(self, client_id: str, key: int, entry: list) -> None:
        if key not in self._session(client_id).messages:
            raise StoreError(f"no message {key} in session {client_id!r}")
        size = self._append([Op.UPDATE, client_id, key, entry])
        self._state.update_message(client_id, key, entry, size)

    def remove_message(self, client_id: str, key: int) -> None:
        s = self._state.sessions.get(client_id)
        if s is not None and key in s.messages:
            self._append([Op.REMOVE, client_id, key])
            self._state.remove_message(client_id, key)

    def add_incoming(self, client_id: str, pid: int) -> None:
        if pid not in self._session(client_id).incoming:
            self._append([Op.IN_ADD, client_id, pid])
            self._state.add_incoming(client_id, pid)

    def remove_incoming(self, client_id: str, pid: int) -> None:
        s = self._state.sessions.get(client_id)
        if s is not None and pid in s.incoming:
            self._append([Op.IN_REMOVE, client_id, pid])
            self._state.remove_incoming(client_id, pid)

    def has_session(self, client_id: str) -> bool:
        return client_id in self._state.sessions

    def session_ids(self) -> list[str]:
        return list(self._state.sessions)

    def session_data(self, client_id: str) -> SessionData | None:
        """One stored session as ``open()`` would load it (messages in key order)."""
        return self._state.session_data(client_id)

    def put_retained(self, topic: str, record: bytes | None) -> None:
        if record is None and topic not in self._state.retained:
            return
        size = self._append([Op.RETAIN, topic, record])
        self._state.put_retained(topic, record, size)

    # --- commit ---

    async def commit(self) -> None:
        """Safe mode: return when everything submitted before this call is on disk and
        fsynced. Fast mode: return at once (see the module docstring for what that risks)."""
        fut = self.durable_future()
        if fut is not None:
            await fut

    def durable_future(self) -> asyncio.Future | None:
        """``commit()`` without a coroutine (no task per acknowledgement): None when
        nothing has to be waited for, else a future done once everything submitted before
        this call is durable (it fails with ``StoreError`` if the store does)."""
        if self._failed is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(StoreError(f"the store failed: {self._failed!r}"))
            return fut
        if not self._opened:
            self._unusable()
        self._stats["commits"] += 1
        target = self._submitted
        if self._durable >= target:
            return None
        if self.durability == "fast" and len(self._buf) < self.max_pending_bytes:
            if self._timer is None:
                self._arm_timer()
            return None
        # safe mode, or fast mode with more pending than the bound: wait for the disk
        # (back-pressure, so a burst cannot grow the buffer without limit)
        w = self._waiters
        if w and w[-1][0] > self._taken:
            # the last waiter's records are still in the buffer with ours: the same batch
            # makes both durable, so they share one future
            fut = w[-1][1]
            w[-1] = (target, fut)
            return fut
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._kick()
        return fut

    def _arm_timer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (yet): written by the next commit() or close()
        self._timer = loop.call_later(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _kick(self) -> None:
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._run_writer())
        self._wake.set()

    async def _run_writer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._buf or (self._cut_wanted and self._compaction is None):
                    if self._compaction is None and (self._cut_wanted or self._should_compact()):
                        await self._cut(loop)
                        continue
                    buf, end = self._buf, self._submitted
                    self._taken = end
                    self._buf = bytearray()
                    await loop.run_in_executor(self._io, self._write_batch, buf)
                    self._stats["records_written"] += end - self._durable
                    self._done(end)
                    if self.durability == "fast" and not self._waiters \
                            and not self._closing and not self._cut_wanted:
                        # fast mode, nobody waiting: one batch per flush interval (the
                        # timer), not back to back: fewer fsyncs, and the loop keeps the GIL
                        self._wake.clear()
                        if self._buf and self._timer is None:
                            self._arm_timer()
                        break
                if self._closing:
                    return
        except BaseException as err:  # noqa: BLE001 - every waiter must hear of it
            self._fail(err)
            if not isinstance(err, asyncio.CancelledError):
                log.error("store writer failed: %r; the store is unusable until reopened", err)

    def _write_batch(self, buf: bytearray) -> None:
        disk.write_all(self._fd, buf)
        os.fdatasync(self._fd)
        self._log_bytes += len(buf)
        self._stats["bytes_written"] += len(buf)
        self._stats["batches"] += 1
        self._stats["fsyncs"] += 1

    def _done(self, end: int) -> None:
        self._durable = end
        w = self._waiters
        while w and w[0][0] <= end:
            fut = w.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def _fail(self, err: BaseException) -> None:
        first = self._failed is None
        self._failed = err
        if first and self.on_failure is not None and not isinstance(err, asyncio.CancelledError):
            self.on_failure(err)
        for fut in self._cut_waiters:
            if not fut.done():
                fut.set_exception(StoreError(f"store write failed: {err!r}"))
        self._cut_waiters.clear()
        while self._waiters:
            fut = self._waiters.popleft()[1]
            if not fut.done():
                e = StoreError(f"store write failed: {err!r}")
                e.__cause__ = err
                fut.set_exception(e)

    # --- compaction ---

    def _disk_bytes(self) -> int:
        return self._snap_bytes + self._log_bytes + self._old_bytes

    def _should_compact(self) -> bool:
        size = self._disk_bytes()
        return (size >= self.compact_min_bytes
                and size > self.compact_ratio * self._state.live_bytes)

    async def compact(self) -> None:
        """Compact now, whatever the sizes, and wait until the new generation is in place."""
        while self._compaction is not None:
            await asyncio.shield(self._compaction)
        cut = asyncio.get_running_loop().create_future()
        self._cut_waiters.append(cut)
        self._cut_wanted = True
        self._kick()
        await asyncio.shield(await cut)
        if self._failed is not None:
            raise StoreError("compaction failed") from self._failed

    async def _cut(self, loop) -> None:
        """Between two batches: freeze the live state and start the next generation's log.
        The frozen state is exactly snapshot-G + log-G once the pending buffer is flushed
        into log-G, which happens in the same step."""
        self._cut_wanted = False
        frozen = self._state.freeze()
        buf, end = self._buf, self._submitted
        self._taken = end
        self._buf = bytearray()
        old_gen, new_gen = self._gen, self._gen + 1
        await loop.run_in_executor(self._io, self._switch_log, buf, new_gen)
        self._stats["records_written"] += end - self._durable
        self._done(end)
        self._compaction = task = loop.create_task(self._compact(frozen, old_gen, new_gen))
        for fut in self._cut_waiters:
            if not fut.done():
                fut.set_result(task)
        self._cut_waiters.clear()

    def _switch_log(self, buf: bytearray, gen: int) -> None:
        if buf:
            self._write_batch(buf)
        fd, size = disk.create_log(self._path(log_name(gen)), gen)
        disk.fsync_dir(self.data_dir)  # the new log must survive before anything is in it
        os.close(self._fd)
        self._old_bytes = self._snap_bytes + self._log_bytes
        self._fd, self._snap_bytes, self._log_bytes, self._gen = fd, 0, size, gen

    async def _compact(self, frozen: tuple, old_gen: int, gen: int) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        before = self._disk_bytes()
        try:
            size = await loop.run_in_executor(self._cx, self._write_generation, frozen,
                                              old_gen, gen)
        except BaseException as err:  # noqa: BLE001
            # CURRENT still names old_gen, with log-gen as its continuation; a second cut
            # would make a chain recovery does not read, so the store stops here.
            log.error("store compaction to generation %d failed: %r", gen, err)
            self._fail(err)
            return
        finally:
            self._compaction = None
            if self._cut_wanted and self._failed is None:
                self._kick()  # a compact() asked while this one ran
        self._snap_bytes, self._old_bytes = size, 0
        took = time.monotonic() - t0
        self._stats["compactions"] += 1
        self._stats["last_compaction"] = {
            "at": time.time(), "seconds": round(took, 4), "generation": gen,
            "bytes_before": before, "snapshot_bytes": size,
            "bytes_after": self._disk_bytes()}  # the new log grew meanwhile
        log.info("store compacted: generation=%d %d -> %d bytes in %.3fs", gen, before,
                 self._disk_bytes(), took)

    def _write_generation(self, frozen: tuple, old_gen: int, gen: int) -> int:
        size = disk.write_snapshot(self._path(snapshot_name(gen)), gen, frozen)
        disk.fsync_dir(self.data_dir)
        disk.write_current(self.data_dir, gen, True)  # the switch
        for name in (snapshot_name(old_gen), log_name(old_gen)):
            _unlink(self._path(name))
        disk.fsync_dir(self.data_dir)
        return size

    # --- observing, closing ---

    def stats(self) -> dict:
        """The store's size and work. ``bytes_on_disk``: the files of the current
        generation (and of the previous one while a compaction runs): the store size
        metric. ``live_bytes``: about what a snapshot of the live state takes.
        ``fsyncs``: log batches written and fdatasync'ed (compaction's own fsyncs are not
        counted); ``avg_batch_commits`` / ``avg_batch_records``: per such fsync."""
        s = self._stats
        st = self._state
        fsyncs = s["fsyncs"]
        return {
            "bytes_on_disk": self._disk_bytes(),
            "live_bytes": st.live_bytes,
            "records": st.record_count(),
            "sessions": len(st.sessions),
            "messages": st.messages,
            "bodies": len(st.bodies),
            "retained": len(st.retained),
            "pending_records": self._submitted - self._durable,
            "commits": s["commits"],
            "fsyncs": fsyncs,
            "records_written": s["records_written"],
            "bytes_written": s["bytes_written"],
            "avg_batch_records": s["records_written"] / fsyncs if fsyncs else 0.0,
            "avg_batch_commits": s["commits"] / fsyncs if fsyncs else 0.0,
            "generation": self._gen,
            "compactions": s["compactions"],
            "last_compaction": s["last_compaction"],
            "durability": self.durability,
        }

    async def close(self) -> None:
        """Write and fsync everything submitted, finish a running compaction, release
        the directory."""
        if not self._opened:
            return
        try:
            if self._failed is None:
                if self._buf or self._writer is not None:
                    self._closing = True
                    self._kick()
                    await self._writer
                if self._compaction is not None:
                    await self._compaction
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()
            self._opened = False
            self._closed = True
            self._io.shutdown(wait=True)
            self._cx.shutdown(wait=True)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
        if self._failed is not None:
            raise StoreError("the store failed; not everything was written") from self._failed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
