"""Blocking file operations of the store. They run in the store's threads (or in
``open()``, before the broker serves anyone), never on the event loop."""

from __future__ import annotations

import os
from operator import itemgetter

from .format import CURRENT, CURRENT_TMP, Op, frame, header, pack

_by_key = itemgetter(0)
_CHUNK = 1 << 20


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_current(data_dir: str, gen: int, has_snapshot: bool) -> None:
    """Switch the store to generation ``gen``: the one atomic step of a compaction."""
    tmp = os.path.join(data_dir, CURRENT_TMP)
    with open(tmp, "wb") as f:
        f.write(header("current", gen, has_snapshot))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(data_dir, CURRENT))
    fsync_dir(data_dir)


def create_log(path: str, gen: int) -> tuple[int, int]:
    """A new, empty log with its header, fsynced (the caller fsyncs the directory).
    Returns (fd open for appending, size)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    head = header("log", gen)
    write_all(fd, head)
    os.fsync(fd)
    return fd, len(head)


def write_snapshot(path: str, gen: int, frozen: tuple) -> int:
    """Write the frozen live state (``LiveState.freeze()``) as a snapshot file and fsync
    it; returns its size. Bodies come before the messages that use them, each session's
    messages in key order, and an END record proves the file complete."""
    retained, bodies, sessions = frozen
    count = 0
    size = 0
    with open(path, "wb") as f:
        buf = bytearray(header("snapshot", gen))

        def emit(rec: list) -> None:
            nonlocal count, size
            buf.extend(frame(pack(rec)))
            count += 1
            if len(buf) >= _CHUNK:
                f.write(buf)
                size += len(buf)
                buf.clear()

        for topic, record in retained:
            emit([Op.RETAIN, topic, record])
        for bid, record in bodies:
            emit([Op.BODY, bid, record])
        for cid, meta, incoming, messages in sessions:
            emit([Op.SESSION, cid, meta])
            for pid in incoming:
                emit([Op.IN_ADD, cid, pid])
            messages.sort(key=_by_key)
            for key, (entry, bid, _size) in messages:
                emit([Op.MESSAGE, cid, key, entry, bid])
        emit([Op.END, count])
        f.write(buf)
        size += len(buf)
        f.flush()
        os.fsync(f.fileno())
    return size
