"""node/store recovery: every corruption case is detected, every intact record it can
prove valid is recovered, and the report says what was lost (real files, real damage)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack

from node.store import SessionStore
from node.store.format import FRAME_SIZE, read_frames, unpack

REPO = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(coro)


def body(n: int) -> bytes:
    return msgpack.packb(["t/x", f"payload {n}".encode(), 1, False, None, None, "pub"])


def entry(n: int) -> list:
    return [1, False, None, 0, n]


async def _write(path, n: int, start: int = 0, compact: bool = False, remove=()):
    s = SessionStore(str(path))
    s.open()
    if compact:
        await s.compact()
    if start == 0:
        s.put_session("s", {"expiry": 60})
        await s.commit()
    for k in range(start, start + n):  # one commit (one batch) per message
        s.put_message("s", k, entry(k), s.message_ref(body(k)))
        await s.commit()
    for k in remove:
        s.remove_message("s", k)
        await s.commit()
    await s.close()


def write(path, n: int, **kw) -> None:
    run(_write(path, n, **kw))


def reopen(path):
    async def go():
        s = SessionStore(str(path))
        state, report = s.open()
        await s.close()
        return state, report

    return run(go())


def keys(state) -> list[int]:
    return list(state.sessions["s"].messages) if "s" in state.sessions else []


def frames_of(path) -> list[tuple[int, list]]:
    """(offset, decoded record) of every frame in a file."""
    data = path.read_bytes()
    payloads, _ = read_frames(data)
    out, off = [], 0
    for p in payloads:
        out.append((off, unpack(p)))
        off += FRAME_SIZE + len(p)
    return out


def data_files(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.startswith(("snapshot-", "log-", "CURRENT")))


# --- torn, garbage, flipped, missing ---


def test_torn_last_write_is_cut_off_and_reported(tmp_path):
    write(tmp_path, 20)
    log = tmp_path / "log-00000001"
    size = log.stat().st_size
    last_off = frames_of(log)[-1][0]
    cut = last_off + 7  # the last record (message 19) half written
    os.truncate(log, cut)

    state, report = reopen(tmp_path)
    assert keys(state) == list(range(19))
    assert len(report.problems) == 1 and "not a complete record" in report.problems[0]
    assert report.bytes_truncated == cut - last_off and report.records_skipped == 0
    assert log.stat().st_size == last_off  # the torn tail was truncated, in place
    assert size > cut

    state, report = reopen(tmp_path)  # the second time there is nothing to say
    assert report.problems == [] and keys(state) == list(range(19))
    write(tmp_path, 3, start=100)  # and appends go on after the cut
    assert keys(reopen(tmp_path)[0]) == list(range(19)) + [100, 101, 102]


def test_garbage_appended_is_removed_and_reported(tmp_path):
    write(tmp_path, 20)
    log = tmp_path / "log-00000001"
    junk = random.Random(4).randbytes(300)
    with open(log, "ab") as f:
        f.write(junk)

    state, report = reopen(tmp_path)
    assert keys(state) == list(range(20))
    assert len(report.problems) == 1 and "300 bytes" in report.problems[0]
    assert report.bytes_truncated == 300
    assert reopen(tmp_path)[1].problems == []


def test_flipped_byte_in_the_middle_stops_replay_there_and_says_what_was_skipped(tmp_path):
    write(tmp_path, 20, remove=range(5))
    log = tmp_path / "log-00000001"
    frames = frames_of(log)
    # the MESSAGE record of key 10: damage it; its remove never came, later ones did
    off, rec = next((o, r) for o, r in frames if r[0] == 4 and r[2] == 10)
    after = sum(1 for o, _ in frames if o > off)
    data = bytearray(log.read_bytes())
    data[off + FRAME_SIZE + 3] ^= 0x40
    log.write_bytes(bytes(data))

    state, report = reopen(tmp_path)
    # exactly the state before the damaged record: 0..9 (their removes came after it)
    assert keys(state) == list(range(10))
    assert len(report.problems) == 1
    assert "damaged record at offset" in report.problems[0]
    assert report.records_skipped == after
    assert report.bytes_truncated == len(data) - off
    # the damaged file is kept aside, the store moved to a clean generation
    assert any(n.startswith("log-00000001.") for n in os.listdir(tmp_path / "damaged"))
    assert data_files(tmp_path) == ["CURRENT", "log-00000002", "snapshot-00000002"]
    state2, report2 = reopen(tmp_path)
    assert report2.problems == [] and keys(state2) == list(range(10))


def test_the_same_damage_always_gives_the_same_state(tmp_path):
    write(tmp_path, 30)
    log = tmp_path / "log-00000001"
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0xFF
    results = []
    for i in range(3):
        d = tmp_path / f"copy{i}"
        d.mkdir()
        (d / "log-00000001").write_bytes(bytes(data))
        shutil.copy(tmp_path / "CURRENT", d / "CURRENT")
        state, report = reopen(d)
        results.append((keys(state), report.records_skipped, report.bytes_truncated,
                        report.problems))
    assert results[0] == results[1] == results[2]
    assert 0 < len(results[0][0]) < 30


def test_a_lost_put_never_lets_its_remove_resurrect_or_reorder_anything(tmp_path):
    write(tmp_path, 10, remove=[3, 7])
    log = tmp_path / "log-00000001"
    off, _ = next((o, r) for o, r in frames_of(log) if r[0] == 4 and r[2] == 7)
    data = bytearray(log.read_bytes())
    data[off + 1] ^= 0x01  # the length field this time
    log.write_bytes(bytes(data))
    state, report = reopen(tmp_path)
    assert keys(state) == [0, 1, 2, 3, 4, 5, 6]  # a real past state, in key order
    assert report.problems and report.records_skipped > 0


def test_missing_log_of_the_current_generation_is_reported(tmp_path):
    write(tmp_path, 10)
    write(tmp_path, 5, start=10, compact=True)  # snapshot-2 holds 0..9, log-2 holds 10..14
    (tmp_path / "log-00000002").unlink()
    state, report = reopen(tmp_path)
    assert keys(state) == list(range(10))
    assert any("log-00000002 is missing" in p for p in report.problems)
    assert reopen(tmp_path)[1].problems == []


def test_missing_snapshot_is_reported_and_nothing_is_half_applied(tmp_path):
    write(tmp_path, 10)
    write(tmp_path, 5, start=10, compact=True, remove=[2])
    (tmp_path / "snapshot-00000002").unlink()
    state, report = reopen(tmp_path)
    # the session itself was in the snapshot: its later messages cannot be placed
    assert "s" not in state.sessions
    assert any("snapshot-00000002 is missing" in p for p in report.problems)
    assert any("could not be read, and were dropped" in p for p in report.problems)
    assert report.records_skipped == 5


def test_missing_current_file_is_reported_and_the_state_rebuilt_from_the_files(tmp_path):
    write(tmp_path, 10)
    write(tmp_path, 5, start=10, compact=True)
    (tmp_path / "CURRENT").unlink()
    state, report = reopen(tmp_path)
    assert keys(state) == list(range(15))
    assert any("CURRENT is missing" in p for p in report.problems)
    assert "CURRENT" in os.listdir(tmp_path)
    assert reopen(tmp_path)[1].problems == []


def test_damaged_snapshot_keeps_its_intact_records(tmp_path):
    write(tmp_path, 20)
    write(tmp_path, 0, start=20, compact=True)
    snap = tmp_path / "snapshot-00000002"
    off, _ = next((o, r) for o, r in frames_of(snap) if r[0] == 4 and r[2] == 12)
    data = bytearray(snap.read_bytes())
    data[off + FRAME_SIZE + 2] ^= 0x10
    snap.write_bytes(bytes(data))
    state, report = reopen(tmp_path)
    assert keys(state) == [k for k in range(20) if k != 12]
    assert any("damaged stretch" in p for p in report.problems)


# --- a crash during compaction, at each step ---


def _compaction_fixture(tmp_path):
    """before/: the files at the cut (generation 1, state 0..9 minus 4).
    after/: the files once compaction finished (generation 2) and 10..14 were added."""
    a, before = tmp_path / "after", tmp_path / "before"
    write(a, 10, remove=[4])
    shutil.copytree(a, before)
    write(a, 5, start=10, compact=True)
    assert data_files(a) == ["CURRENT", "log-00000002", "snapshot-00000002"]
    return a, before


def _crash_dir(tmp_path, name: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for n, data in files.items():
        (d / n).write_bytes(data)
    return d


FINAL = [k for k in range(15) if k != 4]


def test_crash_while_writing_the_new_snapshot(tmp_path):
    a, b = _compaction_fixture(tmp_path)
    snap = (a / "snapshot-00000002").read_bytes()
    d = _crash_dir(tmp_path, "crash", {
        "CURRENT": (b / "CURRENT").read_bytes(),          # not switched yet
        "log-00000001": (b / "log-00000001").read_bytes(),
        "snapshot-00000002": snap[: len(snap) // 2],      # partial
        "log-00000002": (a / "log-00000002").read_bytes(),  # written since the cut
    })
    state, report = reopen(d)
    assert keys(state) == FINAL
    assert report.problems == []
    assert any("interrupted before it switched" in n for n in report.notes)
    assert any("snapshot-00000002" in n for n in report.notes)
    assert reopen(d)[1].notes == [] and keys(reopen(d)[0]) == FINAL


def test_crash_while_switching_current(tmp_path):
    a, b = _compaction_fixture(tmp_path)
    d = _crash_dir(tmp_path, "crash", {
        "CURRENT": (b / "CURRENT").read_bytes(),
        "CURRENT.tmp": (a / "CURRENT").read_bytes()[:9],  # the new manifest, half written
        "log-00000001": (b / "log-00000001").read_bytes(),
        "snapshot-00000002": (a / "snapshot-00000002").read_bytes(),  # complete
        "log-00000002": (a / "log-00000002").read_bytes(),
    })
    state, report = reopen(d)
    assert keys(state) == FINAL and report.problems == []
    assert "CURRENT.tmp" not in os.listdir(d)


def test_crash_after_the_switch_before_old_files_are_deleted(tmp_path):
    a, b = _compaction_fixture(tmp_path)
    d = _crash_dir(tmp_path, "crash", {
        "CURRENT": (a / "CURRENT").read_bytes(),          # switched
        "log-00000001": (b / "log-00000001").read_bytes(),  # not deleted yet
        "snapshot-00000002": (a / "snapshot-00000002").read_bytes(),
        "log-00000002": (a / "log-00000002").read_bytes(),
    })
    state, report = reopen(d)
    assert keys(state) == FINAL and report.problems == []
    assert any("already switched" in n for n in report.notes)
    assert data_files(d) == ["CURRENT", "log-00000002", "snapshot-00000002"]


def test_crash_right_after_the_new_log_was_created(tmp_path):
    a, b = _compaction_fixture(tmp_path)
    d = _crash_dir(tmp_path, "crash", {
        "CURRENT": (b / "CURRENT").read_bytes(),
        "log-00000001": (b / "log-00000001").read_bytes(),
        "log-00000002": b"",  # created, header not yet written
    })
    state, report = reopen(d)
    assert keys(state) == [k for k in range(10) if k != 4]
    assert report.problems == []


# --- kill -9 ---

CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from node.store import SessionStore

    async def main():
        s = SessionStore({path!r}, durability={mode!r}, compact_min_bytes=32 << 10)
        s.open()
        s.put_session("s", {{}})
        await s.commit()
        n = 0

        async def producer(p):
            nonlocal n
            while True:
                k = n
                n += 1
                s.put_message("s", k, [1, False, None, 0, k], s.message_ref(b"m%d" % k * 20))
                if k % 3 and k >= 10:
                    s.remove_message("s", k - 10)
                await s.commit()
                print(k, s.stats()["generation"], flush=True)
                await asyncio.sleep(0)  # the next PUBLISH comes from a socket

        await asyncio.gather(*(producer(p) for p in range(4)))

    asyncio.run(main())
""")


def _kill_9_midway(data_dir, mode: str) -> tuple[list[int], set[int]]:
    """Run the child, SIGKILL it after a random number of acknowledged commits."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), mode=mode,
                                                                path=str(data_dir))],
                            stdout=subprocess.PIPE, text=True)
    stop_after = random.Random().randint(600, 3000)
    acked = []
    generations = set()
    deadline = time.monotonic() + 60
    try:
        for line in proc.stdout:
            k, gen = line.split()
            acked.append(int(k))
            generations.add(int(gen))
            if len(acked) >= stop_after or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= stop_after
    return acked, generations


def test_every_commit_acknowledged_before_kill_9_is_recovered(tmp_path):
    data_dir = tmp_path / "data"
    acked, generations = _kill_9_midway(data_dir, "safe")
    state, report = reopen(data_dir)
    present = set(keys(state))
    # message k is removed together with the put of k + 10 unless k + 10 is a multiple of
    # 3; that remove may be durable without its commit having been acknowledged
    kept = [k for k in acked if (k + 10) % 3 == 0]
    missing = [k for k in kept if k not in present]
    assert missing == [], (missing[:10], report)
    removed = {k - 10 for k in acked if k % 3 and k >= 10}
    assert not removed & present  # an acknowledged remove stays removed
    assert len(generations) > 1  # compactions happened while it ran
    assert keys(state) == sorted(keys(state))
    assert all("not a complete record" in p for p in report.problems), report.problems


def test_fast_mode_loses_only_the_most_recent_changes_on_kill_9(tmp_path):
    data_dir = tmp_path / "data"
    acked, _ = _kill_9_midway(data_dir, "fast")
    state, report = reopen(data_dir)
    present = keys(state)
    assert present == sorted(present)
    newest = present[-1] if present else 0
    # a prefix of the history: every message that is kept and older than the newest
    # one recovered is there (no hole), and what is lost is the tail
    kept = [k for k in range(newest) if (k + 10) % 3 == 0]
    assert [k for k in kept if k not in set(present)] == []
    assert all("not a complete record" in p for p in report.problems), report.problems


def test_missing_current_during_an_interrupted_compaction_uses_the_complete_snapshot(tmp_path):
    a, b = _compaction_fixture(tmp_path)
    d = _crash_dir(tmp_path, "crash", {
        "log-00000001": (b / "log-00000001").read_bytes(),
        "snapshot-00000002": (a / "snapshot-00000002").read_bytes(),
        "log-00000002": (a / "log-00000002").read_bytes(),
    })
    state, report = reopen(d)
    assert keys(state) == FINAL
    assert len(report.problems) == 1 and "CURRENT is missing" in report.problems[0]
    assert any(n.startswith("log-00000001.") for n in os.listdir(d / "damaged"))


def test_a_crash_during_the_very_first_open_is_a_fresh_start(tmp_path):
    (tmp_path / "log-00000001").write_bytes(b"")  # created; CURRENT not yet written
    state, report = reopen(tmp_path)
    assert state.sessions == {} and report.problems == [] and report.notes
    write(tmp_path, 2)
    assert keys(reopen(tmp_path)[0]) == [0, 1]
