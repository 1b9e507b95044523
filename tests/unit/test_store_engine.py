"""node/store: round trips, group commit, durability modes, compaction (real files)."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest

from node.store import SessionStore, StoreError


def run(coro):
    return asyncio.run(coro)


def body(n: int) -> bytes:
    return msgpack.packb(["t/x", f"payload {n}".encode(), 1, False, None, None, "pub"])


def entry(n: int, stage: int = 0) -> list:
    return [1, False, None, stage, n]


def dir_size(path) -> int:
    total = 0
    for f in os.listdir(path):
        if f.startswith(("snapshot-", "log-", "CURRENT")):
            try:
                total += os.path.getsize(os.path.join(path, f))
            except FileNotFoundError:  # deleted by a compaction meanwhile
                pass
    return total


async def reopen(path, **kw):
    store = SessionStore(str(path), **kw)
    state, report = store.open()
    await store.close()
    return state, report


def test_round_trip_keeps_sessions_messages_in_order_incoming_and_retained(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        state, report = s.open()
        assert state.sessions == {} and report.problems == [] and report.files == []
        s.put_session("alice", {"expiry": 60, "subs": [["a/#", 1]]})
        s.put_session("bob", {"expiry": 0xFFFFFFFF})
        refs = [s.message_ref(body(i)) for i in range(10)]
        for i in range(10):
            s.put_message("alice", i, entry(i), refs[i])
        s.put_message("bob", 3, entry(3), refs[3])
        s.update_message("alice", 2, entry(2, stage=1))
        s.remove_message("alice", 0)
        s.remove_message("alice", 5)
        s.add_incoming("alice", 7)
        s.add_incoming("alice", 9)
        s.remove_incoming("alice", 9)
        s.put_retained("r/1", b"one")
        s.put_retained("r/2", b"two")
        s.put_retained("r/2", None)
        s.put_session("bob", {"expiry": 5})  # replace meta, keep messages
        await s.commit()
        await s.close()

    run(go())
    state, report = run(reopen(tmp_path))
    assert report.problems == [] and report.records_skipped == 0
    alice = state.sessions["alice"]
    assert alice.meta == {"expiry": 60, "subs": [["a/#", 1]]}
    assert list(alice.messages) == [1, 2, 3, 4, 6, 7, 8, 9]
    assert alice.messages[2].entry == entry(2, stage=1)
    assert alice.messages[4].ref.record == body(4)
    assert alice.incoming == {7}
    bob = state.sessions["bob"]
    assert bob.meta == {"expiry": 5} and list(bob.messages) == [3]
    # one body shared by two sessions comes back as one object
    assert bob.messages[3].ref is alice.messages[3].ref
    assert state.retained == {"r/1": b"one"}


def test_messages_come_back_in_key_order_even_when_put_out_of_order(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("c", {})
        ref = s.message_ref(body(0))
        for k in (5, 3, 9, 1):  # e.g. inflight put back at the head of the queue
            s.put_message("c", k, entry(k), ref)
        await s.commit()
        await s.close()

    run(go())
    state, _ = run(reopen(tmp_path))
    assert list(state.sessions["c"].messages) == [1, 3, 5, 9]


def test_delete_session_removes_its_messages_and_incoming_ids(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("gone", {})
        ref = s.message_ref(body(1))
        s.put_message("gone", 1, entry(1), ref)
        s.add_incoming("gone", 4)
        await s.commit()
        s.delete_session("gone")
        s.put_session("gone", {"again": True})  # a new session of the same client
        await s.commit()
        assert s.stats()["bodies"] == 0
        await s.close()

    run(go())
    state, _ = run(reopen(tmp_path))
    assert state.sessions["gone"].meta == {"again": True}
    assert state.sessions["gone"].messages == {} and state.sessions["gone"].incoming == set()


def test_misuse_is_a_store_error(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        with pytest.raises(StoreError):
            s.put_message("nobody", 1, entry(1), s.message_ref(b"x"))
        s.put_session("a", {})
        with pytest.raises(StoreError):
            s.update_message("a", 1, entry(1))
        s.remove_message("a", 1)  # already gone: nothing to do
        with pytest.raises(StoreError):
            SessionStore(str(tmp_path)).open()  # the directory is locked
        await s.close()
        with pytest.raises(StoreError):
            await s.commit()  # closed
        with pytest.raises(StoreError):
            s.put_session("b", {})

    run(go())
    with pytest.raises(ValueError):
        SessionStore(str(tmp_path), durability="maybe")


def test_group_commit_shares_fsyncs_among_a_thousand_concurrent_commits(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("sub", {})

        async def publish(i: int) -> None:
            s.put_message("sub", i, entry(i), s.message_ref(body(i)))
            await s.commit()

        await asyncio.gather(*(publish(i) for i in range(1000)))
        st = s.stats()
        await s.close()
        return st

    st = run(go())
    assert st["commits"] == 1000
    assert st["fsyncs"] <= 5, st
    assert st["avg_batch_commits"] >= 200
    state, _ = run(reopen(tmp_path))
    assert list(state.sessions["sub"].messages) == list(range(1000))


def test_commits_made_while_an_fsync_runs_share_the_next_one(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("sub", {})
        done = 0

        async def producer(p: int) -> None:
            nonlocal done
            for k in range(50):
                s.put_message("sub", p * 1000 + k, entry(k), s.message_ref(body(k)))
                await s.commit()
                done += 1

        await asyncio.gather(*(producer(p) for p in range(8)))
        st = s.stats()
        await s.close()
        return st, done

    st, done = run(go())
    assert done == 400
    assert st["fsyncs"] < 400 / 4, st  # 8 producers: batches of about 8


def test_fast_mode_returns_at_once_and_writes_within_the_interval(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path), durability="fast", flush_interval=0.01)
        s.open()
        s.put_session("f", {})
        s.put_message("f", 1, entry(1), s.message_ref(body(1)))
        await s.commit()
        assert s.stats()["pending_records"] == 3  # not written yet: fast mode
        deadline = asyncio.get_running_loop().time() + 2
        while s.stats()["pending_records"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        assert s.stats()["pending_records"] == 0 and s.stats()["fsyncs"] >= 1
        s.put_message("f", 2, entry(2), s.message_ref(body(2)))
        await s.close()  # close writes what is pending

    run(go())
    state, _ = run(reopen(tmp_path))
    assert list(state.sessions["f"].messages) == [1, 2]


def test_fast_mode_waits_for_the_disk_when_too_much_is_pending(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path), durability="fast", flush_interval=10.0,
                         max_pending_bytes=4096)
        s.open()
        s.put_session("f", {})
        s.put_message("f", 1, entry(1), s.message_ref(b"x" * 100))
        await s.commit()
        assert s.stats()["pending_records"] > 0  # small: returned at once
        s.put_message("f", 2, entry(2), s.message_ref(b"y" * 5000))
        await s.commit()  # over the bound: back-pressure, written before it returns
        assert s.stats()["pending_records"] == 0
        await s.close()

    run(go())


def test_a_body_shared_by_many_sessions_is_stored_once(tmp_path):
    big = b"B" * 10_000

    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        ref = s.message_ref(big)
        for i in range(50):
            s.put_session(f"c{i}", {})
            s.put_message(f"c{i}", 1, entry(1), ref)
        await s.commit()
        st = s.stats()
        await s.compact()
        after = dir_size(tmp_path)
        await s.close()
        return st, after

    st, after = run(go())
    assert st["bodies"] == 1
    assert st["bytes_written"] < 2 * len(big)
    assert after < 2 * len(big)
    state, _ = run(reopen(tmp_path))
    refs = {id(state.sessions[f"c{i}"].messages[1].ref) for i in range(50)}
    assert len(refs) == 1 and state.sessions["c7"].messages[1].ref.record == big


def test_disk_use_stays_bounded_by_what_is_live_through_put_remove_cycles(tmp_path):
    payload = b"p" * 200
    floor = 64 << 10  # compact_min_bytes

    async def go():
        s = SessionStore(str(tmp_path), compact_min_bytes=floor)
        s.open()
        s.put_session("sub", {})
        peak = 0
        key = 0
        for _round in range(200):
            for _ in range(50):
                s.put_message("sub", key, entry(key), s.message_ref(payload))
                key += 1
            await s.commit()
            for k in range(key - 55, key - 5):  # acks: the newest 5 stay unacknowledged
                s.remove_message("sub", k)
            await s.commit()
            peak = max(peak, dir_size(tmp_path))
        await s.close()  # lets a running compaction finish
        return s.stats(), peak

    st, peak = run(go())
    assert st["messages"] == 5 and st["bodies"] == 5
    assert st["compactions"] >= 10, st
    assert st["bytes_written"] > 2_000_000  # a lot went through ...
    assert peak < 2 * floor + (32 << 10), peak  # ... little stayed, even mid-compaction
    assert st["bytes_on_disk"] < floor + (16 << 10)
    assert st["last_compaction"]["snapshot_bytes"] < 16 << 10  # at most 55 messages live
    state, report = run(reopen(tmp_path))
    assert report.problems == []
    assert list(state.sessions["sub"].messages) == list(range(9995, 10000))


def test_mutations_during_a_compaction_survive_it(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("a", {})
        for k in range(2000):
            s.put_message("a", k, entry(k), s.message_ref(body(k)))
        await s.commit()
        task = asyncio.ensure_future(s.compact())
        for k in range(2000, 2100):  # while the snapshot is being written
            s.put_message("a", k, entry(k), s.message_ref(body(k)))
            s.remove_message("a", k - 2000)
            await s.commit()
        await task
        gen = s.stats()["generation"]
        await s.close()
        return gen

    gen = run(go())
    assert gen == 2
    assert sorted(os.listdir(tmp_path)) == ["CURRENT", "LOCK", "log-00000002", "snapshot-00000002"]
    state, report = run(reopen(tmp_path))
    assert report.problems == []
    assert list(state.sessions["a"].messages) == list(range(100, 2100))


def test_stats_report_the_size_of_the_store(tmp_path):
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        s.put_session("a", {})
        s.put_message("a", 1, entry(1), s.message_ref(b"x" * 1000))
        await s.commit()
        st = s.stats()
        await s.close()
        return st

    st = run(go())
    assert st["bytes_on_disk"] == dir_size(tmp_path) - os.path.getsize(tmp_path / "CURRENT")
    assert 1000 < st["live_bytes"] < 1200
    assert st["records"] == 3 and st["messages"] == 1 and st["bodies"] == 1
    for k in ("commits", "fsyncs", "avg_batch_records", "avg_batch_commits", "last_compaction"):
        assert k in st


def test_a_failed_write_fails_every_later_commit_and_is_reported_once(tmp_path):
    """A write error (here: the log's descriptor made read-only underneath the store)
    fails the store: on_failure hears of it once, every commit fails from then on, and
    later mutations no longer raise (the node is shutting down on it)."""
    async def go():
        s = SessionStore(str(tmp_path))
        s.open()
        failures = []
        s.on_failure = failures.append
        s.put_session("a", {})
        await s.commit()
        ro = os.open(tmp_path / "CURRENT", os.O_RDONLY)
        os.dup2(ro, s._fd)  # writes to the log now fail with EBADF
        os.close(ro)
        s.put_message("a", 1, entry(1), s.message_ref(b"x"))
        with pytest.raises(StoreError):
            await s.commit()
        s.put_message("a", 2, entry(2), s.message_ref(b"y"))  # not written, no exception
        with pytest.raises(StoreError):
            await s.commit()
        with pytest.raises(StoreError, match="not everything was written"):
            await s.close()
        return failures

    failures = run(go())
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    state, report = run(reopen(tmp_path))
    assert list(state.sessions["a"].messages) == [] and report.problems == []
