"""Reading a data directory back: which files make the state, what was damaged.

The rules (the same every time, for the same files):

* ``CURRENT`` names the generation G and whether it has a snapshot. The state is
  ``snapshot-G`` (if any), then ``log-G``, then ``log-(G+1)`` if it exists: a compaction
  that cut over to the new log but crashed before switching ``CURRENT`` (its
  ``snapshot-(G+1)``, complete or not, is ignored and removed).
* A log is a history, so it is replayed as a **prefix**: replay stops at the first byte
  that is not an intact record. Nothing intact after it → a torn or garbage tail: cut
  off (a write interrupted by a crash, never a commit acknowledged in safe mode). Intact
  records after it → damage in the middle: they are *not* applied (applying later
  changes without the lost one could bring back a deleted session or an acknowledged
  message, or apply an update to the wrong message), they are counted in
  ``records_skipped``, and no later log is read either. The store is then exactly as it
  was just before the damaged record: a state that really existed. The damaged file is
  kept in ``damaged/`` for inspection.
* A snapshot is a set of independent facts, so a damaged stretch in it is skipped and the
  intact records after it are still read; a message whose session or body was in the
  damaged stretch is dropped and counted.
* A missing ``CURRENT`` (with data files present) or a missing file it refers to is a
  problem, never a fresh start: the newest complete snapshot, or the oldest log when no
  snapshot exists, is used, and what could not be read is said.

Whenever anything but a torn tail was found, ``open()`` writes the recovered state as a
new generation at once, so the damage is never read twice and appends never follow it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .format import (CURRENT, CURRENT_TMP, DAMAGED_DIR, FRAME_SIZE, MAGIC, Op,
                     count_intact, log_name, next_intact, parse_name, read_frames,
                     snapshot_name, unpack)
from .disk import read_file
from .state import LiveState


@dataclass
class RecoveryReport:
    files: list[str] = field(default_factory=list)  # read, in replay order
    records_read: int = 0      # intact records applied
    records_skipped: int = 0   # intact records not applied (after damage, or orphaned by it)
    bytes_truncated: int = 0   # bytes not applied: torn tails, garbage, damaged stretches
    problems: list[str] = field(default_factory=list)  # what could not be read, in words
    notes: list[str] = field(default_factory=list)     # repairs that lost nothing


@dataclass
class Recovered:
    state: LiveState
    report: RecoveryReport
    fresh: bool = False          # an empty directory: nothing to read
    gen: int = 1
    has_snapshot: bool = False
    snapshot_bytes: int = 0
    log_end: int = 0             # append to log-gen from here (after a torn tail is cut)
    log_size: int = 0            # its size on disk now
    rewrite: bool = False        # write the state as a new generation before appending
    max_gen: int = 0             # the newest generation any file has
    max_body_id: int = 0
    damaged: list[str] = field(default_factory=list)    # move to damaged/ after a rewrite
    leftovers: list[str] = field(default_factory=list)  # delete


_END_PREFIX = b"\x92\x0a"  # msgpack of [Op.END, count]: a 2-array starting with 10


def _header_of(payload) -> list | None:
    try:
        rec = unpack(payload)
    except Exception:
        return None
    if (isinstance(rec, list) and len(rec) >= 5 and rec[0] == Op.HEADER and rec[1] == MAGIC
            and rec[2] == 1):
        return rec
    return None


def _read_current(path: str) -> tuple[int, bool] | str:
    data = read_file(path)
    if data is None:
        return "missing"
    payloads, _end = read_frames(data)
    rec = _header_of(payloads[0]) if payloads else None
    if rec is None or rec[3] != "current" or len(rec) < 6:
        return "unreadable"
    return int(rec[4]), bool(rec[5])


class _Replay:
    def __init__(self, data_dir: str) -> None:
        self.dir = data_dir
        self.state = LiveState()
        self.report = RecoveryReport()
        self.orphans = 0
        self.max_body_id = 0
        self.damaged_files: list[str] = []

    def _apply(self, payload) -> bool:
        """Decode and apply one record; False if it is not a record this store writes."""
        try:
            rec = unpack(payload)
            if rec[0] == Op.BODY:
                self.max_body_id = max(self.max_body_id, rec[1])
            if not self.state.apply(rec, len(payload) + FRAME_SIZE):
                self.orphans += 1
        except Exception:
            return False
        self.report.records_read += 1
        return True

    def snapshot(self, name: str, gen: int) -> bool:
        """Read a snapshot, skipping damaged stretches. False if it is missing."""
        data = read_file(os.path.join(self.dir, name))
        r = self.report
        if data is None:
            r.problems.append(f"{name} is missing: the sessions, queued messages and retained "
                              "messages it held are lost; only changes logged after it are read")
            return False
        r.files.append(name)
        size = len(data)
        off = 0
        complete = False
        bad_bytes = 0
        bad_stretches = 0
        first = True
        while off < size:
            payloads, end = read_frames(data, off)
            for p in payloads:
                if first:
                    first = False
                    h = _header_of(p)
                    if h is None or h[3] != "snapshot" or h[4] != gen:
                        r.problems.append(f"{name} does not start with the header of "
                                          f"snapshot generation {gen}; read anyway")
                    continue
                if bytes(p[:2]) == _END_PREFIX:
                    complete = True
                    continue
                if not self._apply(p):
                    bad_bytes += len(p) + FRAME_SIZE
                    bad_stretches += 1
            if end >= size:
                break
            nxt = next_intact(data, end)
            bad_bytes += nxt - end
            bad_stretches += 1
            off = nxt
        if bad_stretches:
            r.bytes_truncated += bad_bytes
            r.problems.append(f"{name}: {bad_stretches} damaged stretch(es), {bad_bytes} bytes, "
                              "could not be read; the records in them are lost, the intact "
                              "records around them were read")
        if bad_stretches or not complete:
            self.damaged_files.append(name)
        if not complete:
            r.problems.append(f"{name} is incomplete (it has no end record): whatever came "
                              "after its last intact record is lost")
        return True

    def log(self, name: str, gen: int) -> tuple[str, int, int]:
        """Replay a log as a prefix. Returns (status, valid end, size): status is "ok",
        "tail" (a torn or garbage tail after ``end``), "damaged" (intact records after
        the damage were not applied) or "missing" (size -1)."""
        data = read_file(os.path.join(self.dir, name))
        r = self.report
        if data is None:
            return "missing", 0, -1
        r.files.append(name)
        size = len(data)
        payloads, end = read_frames(data)
        off = 0
        for i, p in enumerate(payloads):
            if i == 0:
                h = _header_of(p)
                if h is None or h[3] != "log" or h[4] != gen:
                    r.problems.append(f"{name} does not start with the header of log "
                                      f"generation {gen}; none of its records were applied; "
                                      f"the file is kept in {DAMAGED_DIR}/")
                    r.records_skipped += len(payloads) - 1 + count_intact(data, end)
                    r.bytes_truncated += size
                    self.damaged_files.append(name)
                    return "damaged", 0, size
            elif not self._apply(p):
                end = off  # an intact frame this store cannot have written: damage here
                break
            off += len(p) + FRAME_SIZE
        if end >= size:
            return "ok", end, size
        after = count_intact(data, end)
        lost = size - end
        r.bytes_truncated += lost
        if after == 0:
            r.problems.append(
                f"{name}: the last {lost} bytes (from offset {end}) are not a complete record "
                "(a write cut short by a crash, or bytes appended by something else); they "
                "were removed. A commit acknowledged in safe mode is never among them.")
            return "tail", end, size
        r.records_skipped += after
        self.damaged_files.append(name)
        r.problems.append(
            f"{name}: damaged record at offset {end}; replay stopped there. {after} intact "
            f"record(s) after it ({lost} bytes) were not applied, nor any later log, since "
            "applying later changes without the lost one could bring back deleted messages "
            "or sessions. The store is as it was just before the damaged record; the file "
            f"is kept in {DAMAGED_DIR}/.")
        return "damaged", end, size


def recover(data_dir: str) -> Recovered:
    names = sorted(os.listdir(data_dir))
    files: dict[tuple[str, int], str] = {}
    for n in names:
        parsed = parse_name(n)
        if parsed:
            files[parsed] = n
    rp = _Replay(data_dir)
    report = rp.report
    out = Recovered(rp.state, report)
    out.max_gen = max((g for _k, g in files), default=0)
    if CURRENT_TMP in names:
        out.leftovers.append(CURRENT_TMP)
        report.notes.append(f"{CURRENT_TMP} was left by a compaction interrupted before it "
                            "switched generations; removed (nothing lost)")

    cur = _read_current(os.path.join(data_dir, CURRENT))
    if cur == "missing" and not files:
        out.fresh = True
        return out
    if cur == "missing" and list(files) == [("log", 1)]:
        first = read_file(os.path.join(data_dir, log_name(1))) or b""
        if len(read_frames(first)[0]) <= 1:  # at most its header: the first start crashed
            out.fresh = True
            report.notes.append(f"{log_name(1)} without {CURRENT} and without records: the "
                                "first start was interrupted; started afresh (nothing lost)")
            return out
    if isinstance(cur, tuple):
        gen, has_snap = cur
    else:
        out.rewrite = True
        snaps = sorted((g for k, g in files if k == "snapshot"), reverse=True)
        gen, has_snap = 0, False
        for g in snaps:
            payloads, _ = read_frames(read_file(os.path.join(data_dir, snapshot_name(g))) or b"")
            if payloads and bytes(payloads[-1][:2]) == _END_PREFIX:
                gen, has_snap = g, True
                break
        if not has_snap:
            logs = sorted(g for k, g in files if k == "log")
            gen = logs[0] if logs else 1
        report.problems.append(
            f"{CURRENT} is {cur}: the store was rebuilt from generation {gen} found on disk "
            f"({'snapshot and log' if has_snap else 'logs only'}); changes recorded only "
            "elsewhere may be lost")
    out.gen, out.has_snapshot = gen, has_snap

    if has_snap:
        sname = snapshot_name(gen)
        if rp.snapshot(sname, gen):
            out.snapshot_bytes = os.path.getsize(os.path.join(data_dir, sname))
    lname = log_name(gen)
    n2 = log_name(gen + 1)
    has_next = ("log", gen + 1) in files
    status, end, size = rp.log(lname, gen)
    out.log_end, out.log_size = end, max(size, 0)
    if status == "missing":
        report.problems.append(f"{lname} is missing: changes made after "
                               f"{snapshot_name(gen) if has_snap else 'the start'} are lost")
    if has_next:
        out.rewrite = True
        if status == "ok":
            report.notes.append(f"a compaction was interrupted before it switched to "
                                f"generation {gen + 1}; the changes it had already logged "
                                f"in {n2} were replayed (nothing lost)")
            rp.log(n2, gen + 1)
        else:
            data = read_file(os.path.join(data_dir, n2)) or b""
            skipped = max(0, len(read_frames(data)[0]) - 1)
            report.records_skipped += skipped
            rp.damaged_files.append(n2)
            report.problems.append(f"{n2} ({skipped} records) was not applied: it continues "
                                   f"{lname}, which could not be read to its end; kept in "
                                   f"{DAMAGED_DIR}/")
    elif status != "ok" and status != "tail":
        out.rewrite = True
    if report.problems and not (status == "tail" and len(report.problems) == 1):
        out.rewrite = True  # anything but a lone torn tail of the last log
    out.damaged.extend(rp.damaged_files)

    # files that are not part of the state
    for (kind, g), n in files.items():
        if (kind, g) in (("snapshot", gen), ("log", gen), ("log", gen + 1)) and (
                kind != "snapshot" or has_snap):
            continue
        if n in out.damaged:
            continue
        if not isinstance(cur, tuple):  # no manifest to say what they are: keep them aside
            out.damaged.append(n)
            report.notes.append(f"{n} is not part of generation {gen}; moved to "
                                f"{DAMAGED_DIR}/")
        elif g < gen or (kind == "snapshot" and g == gen):
            out.leftovers.append(n)
            report.notes.append(f"{n} was left by a compaction that had already switched "
                                f"to generation {gen}; removed (nothing lost)")
        elif g == gen + 1:
            out.leftovers.append(n)
            report.notes.append(f"{n} was left by a compaction interrupted before it "
                                "switched generations; ignored and removed (nothing lost)")
        else:
            out.damaged.append(n)
            out.rewrite = True
            report.problems.append(f"{n} is newer than the current generation {gen} and was "
                                   f"not read; moved to {DAMAGED_DIR}/")

    rp.state.drop_unreferenced_bodies()  # their messages were cut off with a torn tail
    if rp.orphans:
        report.records_skipped += rp.orphans
        report.problems.append(f"{rp.orphans} record(s) referred to a session, message or "
                               "message body that could not be read, and were dropped")
        out.rewrite = True
    out.max_body_id = rp.max_body_id
    return out
