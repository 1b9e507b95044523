"""A node whose store was damaged while it was down (kill -9, then the files under
``<data-dir>/store/`` torn, extended with garbage, deleted or flipped) starts, recovers
every record it can prove intact, never invents state, and says what it found: in its log
("store recovery" at WARNING/ERROR) and in ``GET /api/v1/stats`` ->
``store.recovery.{problems, notes, records_read}``.

The node-level counterpart of tests/unit/test_store_recovery.py: a real node process, real
MQTT clients before and after. The file layout is node/store/README.md's; the frames are
read here with a small reader of our own (length:u32le | crc32:u32le | msgpack payload),
so that the test does not share a misreading of the format with the store it checks.
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from pathlib import Path

import msgpack
import pytest

from support import ConnectionClosed, Prop, Puback, Publish, wait_for

pytestmark = [pytest.mark.timeout(40),
              pytest.mark.shoal_only("Mosquitto runs here with persistence off")]

N = 20  # messages queued for the offline subscriber
SUB = "cs-sub"      # 5.0, expiry 3600, subscribed to cs/q, offline: gets the N messages
IDLE = "cs-idle"    # 3.1.1 Clean Session 0, subscribed to something else, offline
PAYLOADS = [f"payload-{i:03d}".encode() for i in range(N)]
LATER = [f"payload-{i:03d}".encode() for i in range(N, N + 5)]  # logged after a snapshot

# record types (node/store/format.py)
OP_HEADER, OP_SESSION, OP_BODY, OP_MESSAGE, OP_REMOVE = 0, 1, 3, 4, 6


# ---------------------------------------------------------------- the store's files


def store_dir(node) -> Path:
    return node.workdir / f"data-{node.port}" / "store"


def read_frames(data: bytes) -> tuple[list[tuple[int, list]], int]:
    """(offset, decoded record) of the intact frames from the start, and where they stop."""
    out, off = [], 0
    while off + 8 <= len(data):
        length, crc = struct.unpack_from("<II", data, off)
        end = off + 8 + length
        if length == 0 or end > len(data) or \
                zlib.crc32(data[off + 8:end], zlib.crc32(data[off:off + 4])) != crc:
            break
        out.append((off, msgpack.unpackb(data[off + 8:end], raw=False,
                                         strict_map_key=False)))
        off = end
    return out, off


def current(node) -> tuple[int, bool]:
    """(generation, has_snapshot) that CURRENT names."""
    frames, _ = read_frames((store_dir(node) / "CURRENT").read_bytes())
    head = frames[0][1]
    assert head[:4] == [OP_HEADER, "shoal-store", 1, "current"], head
    return head[4], bool(head[5])


def current_log(node) -> Path:
    gen, _ = current(node)
    path = store_dir(node) / f"log-{gen:08d}"
    assert path.exists(), f"CURRENT names generation {gen}: {sorted(os.listdir(store_dir(node)))}"
    return path


def queued_in(records: list, client_id: str = SUB) -> list[bytes]:
    """Payloads of the messages the records leave queued for ``client_id``, in key order."""
    bodies = {r[1]: r[2] for r in records if r[0] == OP_BODY}
    keys = {}
    for r in records:
        if r[0] == OP_MESSAGE and r[1] == client_id:
            keys[r[2]] = r[4]
        elif r[0] == OP_REMOVE and r[1] == client_id:
            keys.pop(r[2], None)
    return [payload_in(bodies.get(keys[key], b"")) for key in sorted(keys)]


def payload_in(body: bytes) -> bytes:
    """Which of our payloads a stored message body holds."""
    found = [p for p in PAYLOADS + LATER if p in body]
    assert len(found) == 1, f"stored body {body!r} is none of our messages"
    return found[0]


def message_record_offset(frames: list, payload: bytes) -> int:
    """Offset of the MESSAGE record that queued ``payload`` for SUB."""
    body_ids = {r[1] for _, r in frames if r[0] == OP_BODY and payload_in(r[2]) == payload}
    return next(o for o, r in frames
                if r[0] == OP_MESSAGE and r[1] == SUB and r[4] in body_ids)


# ---------------------------------------------------------------- the node


def wait_store_idle(node, timeout: float = 5.0) -> None:
    def pending():
        return node.stats().get("store", {}).get("pending_records")
    wait_for(lambda: pending() == 0, timeout,
             message=lambda: f"store.pending_records == 0 (stats: {node.stats()})")


def restart(node) -> int:
    """Start the node again on its data directory; returns the log offset it starts at."""
    offset = node.log_path.stat().st_size
    old = node.pid
    node.start()
    assert node.pid != old
    return offset


def fill(node, payloads=PAYLOADS, first: bool = True) -> None:
    """A retained message, two persistent offline sessions and ``payloads`` queued for
    SUB (each acknowledged: durable), then kill -9."""
    if first:
        pub = node.raw(5)
        pub.connect("cs-pub")
        pub.publish("csr/kept", b"retained-value", qos=1, retain=True)
        sub = node.raw(5)
        sub.connect(SUB, clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 3600})
        sub.subscribe("cs/q", qos=1)
        sub.disconnect()
        idle = node.raw(4)
        idle.connect(IDLE, clean_start=False)
        idle.subscribe("cs-idle/#", qos=1)
        idle.disconnect()
        wait_for(lambda: node.stats()["connections"] == 1, 5,
                 message="the subscribers' connections to close")
    else:
        pub = node.raw(5)
        pub.connect("cs-pub")
    for p in payloads:
        pub.publish("cs/q", p, qos=1)
    pub.disconnect()
    wait_store_idle(node)
    node.kill()


def drain(node) -> tuple[bool, list[bytes]]:
    """Reconnect SUB: (session present, the payloads queued for it, in order)."""
    sub = node.raw(5)
    ack = sub.connect(SUB, clean_start=False, properties={Prop.SESSION_EXPIRY_INTERVAL: 3600})
    if not ack.session_present:
        return False, []
    marker = f"marker-{time.monotonic_ns()}".encode()
    pub = node.raw(5)
    pub.connect("cs-marker")
    pub.publish("cs/q", marker, qos=1)
    got = []
    deadline = time.monotonic() + 10
    while True:
        p = sub.await_packet(lambda q: isinstance(q, Publish), f"PUBLISH up to {marker!r}",
                             max(deadline - time.monotonic(), 0.01))
        sub.send(Puback(p.packet_id))
        if p.payload == marker:
            return True, got
        got.append(p.payload)


def retained_payloads(node) -> list[bytes]:
    c = node.raw(5)
    c.connect("cs-retained-check")
    c.subscribe("csr/#", qos=1)
    got = []
    try:
        while True:
            got.append(c.recv(0.5).payload)
    except (TimeoutError, ConnectionClosed):
        return got


def idle_present(node) -> bool:
    return node.raw(4).connect(IDLE, clean_start=False).session_present


def recovery(node) -> dict:
    store = node.stats().get("store")
    assert store is not None and "recovery" in store, \
        f"GET /api/v1/stats has no store.recovery: {store}"
    rec = store["recovery"]
    for key in ("problems", "notes", "records_read"):
        assert key in rec, f"store.recovery has no {key!r}: {rec}"
    return rec


def recovery_log_lines(node, offset: int) -> list[str]:
    """Lines at WARNING or ERROR that the node logged since ``offset`` about recovery."""
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if "store recovery" in line and (" warning " in line or " error " in line)]


def assert_reported(node, offset: int, *words: str) -> dict:
    """The problem is in stats and in the log, each ``word`` in one of the problems."""
    rec = recovery(node)
    assert rec["problems"], f"no problem reported: {rec}"
    for word in words:
        assert any(word in p for p in rec["problems"]), f"no problem says {word!r}: {rec}"
    lines = recovery_log_lines(node, offset)
    for word in words:
        assert any(word in line for line in lines), \
            f"the node's log says nothing about {word!r} at WARNING/ERROR:\n{node.log_tail()}"
    return rec


def make_snapshot_generation(node) -> tuple[int, int]:
    """Bring the store to a generation with a snapshot: fill, remove CURRENT (recovery
    rebuilds it from the log and writes the state as snapshot + new log), restart.
    Returns (generation, log offset of that restart)."""
    fill(node)
    (store_dir(node) / "CURRENT").unlink()
    offset = restart(node)
    gen, has_snapshot = current(node)
    assert has_snapshot, f"no snapshot after a rebuild: {sorted(os.listdir(store_dir(node)))}"
    return gen, offset


# ---------------------------------------------------------------- a. torn last write


def test_torn_last_write_loses_only_the_torn_record(node):
    fill(node)
    log = current_log(node)
    data = log.read_bytes()
    frames, end = read_frames(data)
    assert end == len(data), "the log was already damaged"
    last_off, last = frames[-1]
    cut = len(data) - 3  # the last record, 3 bytes short: a write cut short by the crash
    assert cut > last_off
    os.truncate(log, cut)
    # the scenario's last change is queuing the last message: that is the torn record
    assert last[0] == OP_MESSAGE and last[1] == SUB, f"the log ends with {last}"
    expected = queued_in([r for o, r in frames if o < last_off])
    assert expected == PAYLOADS[:-1]

    offset = restart(node)

    rec = assert_reported(node, offset, "not a complete record")
    assert rec["records_read"] >= len(frames) - 2, rec  # all but the header and the torn one
    assert retained_payloads(node) == [b"retained-value"]
    assert idle_present(node)
    present, got = drain(node)
    assert present
    assert got == expected, "the torn message is gone, every message before it is kept"


# ---------------------------------------------------------------- b. garbage appended


def test_garbage_after_the_last_record_is_cut_off_and_everything_kept(node):
    fill(node)
    log = current_log(node)
    junk = random.Random(7).randbytes(300)
    with open(log, "ab") as f:
        f.write(junk)

    offset = restart(node)

    rec = assert_reported(node, offset, "300 bytes")
    assert retained_payloads(node) == [b"retained-value"]
    assert idle_present(node)
    assert drain(node) == (True, PAYLOADS), "every intact record is recovered"
    assert rec["records_read"] > 2 * N
    data = current_log(node).read_bytes()
    assert read_frames(data)[1] == len(data) and junk not in data, "the garbage was cut off"


# ---------------------------------------------------------------- c. missing files


def test_missing_current_is_rebuilt_from_the_files_and_reported(node):
    fill(node)
    (store_dir(node) / "CURRENT").unlink()

    offset = restart(node)

    assert_reported(node, offset, "CURRENT is missing")
    assert (store_dir(node) / "CURRENT").exists()
    assert retained_payloads(node) == [b"retained-value"]
    assert idle_present(node)
    assert drain(node) == (True, PAYLOADS)


def test_missing_log_loses_only_what_was_logged_after_the_snapshot(node):
    gen, _ = make_snapshot_generation(node)
    fill(node, LATER, first=False)
    assert current(node)[0] == gen
    log = store_dir(node) / f"log-{gen:08d}"
    records = [r for _, r in read_frames(log.read_bytes())[0]]
    assert [payload_in(r[2]) for r in records if r[0] == OP_BODY] == LATER
    log.unlink()

    offset = restart(node)

    assert_reported(node, offset, f"log-{gen:08d} is missing")
    assert retained_payloads(node) == [b"retained-value"]
    assert idle_present(node)
    assert drain(node) == (True, PAYLOADS), "the snapshot's state, nothing of the lost log"


def test_missing_log_without_a_snapshot_is_reported_not_a_silent_fresh_start(node):
    fill(node)
    gen, has_snapshot = current(node)
    assert not has_snapshot
    current_log(node).unlink()

    offset = restart(node)

    assert_reported(node, offset, f"log-{gen:08d} is missing")
    present, got = drain(node)
    assert (present, got) == (False, []), "state that was not read came from somewhere"


def test_missing_snapshot_is_reported_and_its_contents_not_invented(node):
    gen, _ = make_snapshot_generation(node)
    fill(node, LATER, first=False)  # logged after the snapshot: kept if their session is
    (store_dir(node) / f"snapshot-{gen:08d}").unlink()

    offset = restart(node)

    assert_reported(node, offset, f"snapshot-{gen:08d} is missing")
    # the retained message and the queued messages were in the snapshot only: lost, and
    # said so; what the log holds after it may come back, nothing else
    assert retained_payloads(node) == []
    present, got = drain(node)
    assert not set(got) & set(PAYLOADS), f"messages that could not be read came back: {got}"
    assert got in ([], LATER), got


# ---------------------------------------------------------------- d. damage in the middle


def test_flipped_byte_in_an_early_record_keeps_exactly_the_state_before_it(node):
    fill(node)
    log = current_log(node)
    data = bytearray(log.read_bytes())
    frames, _ = read_frames(bytes(data))
    damaged = 5
    off = message_record_offset(frames, PAYLOADS[damaged])
    before = [r for o, r in frames if o < off]
    after = sum(1 for o, _ in frames if o > off)
    data[off + 8 + 3] ^= 0x40  # inside the payload of the MESSAGE record of message 5
    log.write_bytes(bytes(data))

    offset = restart(node)

    rec = assert_reported(node, offset, "damaged record at offset", "not applied")
    assert rec.get("records_skipped", after) == after, rec
    assert retained_payloads(node) == [b"retained-value"]
    assert idle_present(node)
    present, got = drain(node)
    assert present
    assert got == queued_in(before) == PAYLOADS[:damaged], \
        "exactly the messages logged before the damaged record"
    damaged_dir = store_dir(node) / "damaged"
    assert damaged_dir.is_dir() and any(n.startswith(log.name) for n in os.listdir(damaged_dir)), \
        "the damaged log is kept for inspection"

    # the damage is not read twice
    node.kill()
    offset = restart(node)
    assert recovery(node)["problems"] == []
    assert recovery_log_lines(node, offset) == []
