"""Issue 6, end to end: hopping persistent subscribers and numbered publishers on a real
3-node cluster while a nemesis kill -9's and restarts nodes; the history goes through
checker.check and the figures are printed and asserted.

Runs only with ``--faults-seconds N`` (the cluster does not survive all of this yet):

    .venv/bin/python -m pytest tests/faults/test_faults.py -q -s --faults-seconds 30
"""

from __future__ import annotations

import random
import time
import uuid

import pytest

import checker
from conftest import faults_seconds
from nemesis import KillRestartNemesis
from support import PahoClient, probe_until_seen, wait_for
from workload import History, Publisher, Subscriber


@pytest.fixture
def seconds(request):
    value = faults_seconds(request.config)
    if value is None:
        pytest.skip("issue 6 in progress: run with --faults-seconds N")
    return value


@pytest.mark.slow
@pytest.mark.faults
def test_kill_restart_under_hopping_persistent_subscribers(cluster, seconds, tmp_path):
    seed = int(time.time())
    t = uuid.uuid4().hex[:8]
    nodes = list(cluster.nodes)
    history = History()
    prefix = f"faults/{t}"

    subs = [Subscriber(f"s{i}-{t}", history, nodes, random.Random(seed + i), f"{prefix}/#", q)
            for i, q in enumerate((1, 2, 2), 1)]
    for s in subs:
        s.start_session()
    # every node knows every subscriber's route before the first numbered message
    probe = PahoClient(nodes[0], f"probe-{t}", 5)
    for s in subs:
        probe_until_seen(lambda m: probe.publish(f"{prefix}/probe", m, qos=0),
                         lambda m, s=s: m in s.other_payloads,
                         what=f"route of {s.name}")
    probe.close()

    pubs = [Publisher(f"p{q}-{t}", history, nodes, random.Random(seed + 10 + q),
                      f"{prefix}/q{q}", q, pace=0.02) for q in (1, 2)]
    nemesis = KillRestartNemesis(cluster, history, random.Random(seed + 100))
    workers = [*pubs, *subs]
    for w in workers:
        w.start()
    nemesis.start()
    try:
        # the run: wall-clock time is the workload's length; workers stopping early stop it
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not any(w.errors for w in workers) \
                and not nemesis.errors and nemesis.thread.is_alive():
            time.sleep(0.2)
    finally:
        nemesis.stop()           # restarts the node it had down, waits for the cluster
        for w in workers:
            w.stop()
    errors = [(w.name, e) for w in (*workers, nemesis) for e in w.errors]
    assert not errors, f"workload/nemesis failed: {errors!r}\n" + "\n".join(nemesis.log)

    # -- settle: every node up, each subscriber resumes once more and drains its session
    cluster.wait_formed(timeout=60.0)
    for s in subs:
        s.settle()
    acked = {(e.topic, e.seq) for e in history.snapshot() if e.kind == "acked"}

    def missing():
        got = {}
        for e in history.snapshot():
            if e.kind == "received":
                got.setdefault(e.who, set()).add((e.topic, e.seq))
        return sum(len(acked - got.get(s.name, set())) for s in subs)
    # bounded: what is still missing after this is what the checker calls lost
    try:
        wait_for(lambda: missing() == 0, 20.0, interval=0.2, message="every acked message")
    except AssertionError:
        pass
    for s in subs:
        s.client.close()

    result = checker.check(history.snapshot())
    import dataclasses
    import json
    dump = tmp_path / "history.jsonl"
    dump.write_text("".join(json.dumps(dataclasses.asdict(e), default=str) + "\n"
                            for e in history.snapshot()))
    migrations = sum(s.moves for s in subs)
    print(f"\n=== faults run: seed {seed}, {seconds:.0f} s, messages sent "
          f"{result.sent}, acknowledged {result.acknowledged}, abandoned "
          f"{sum(p.abandoned for p in pubs)}, migrations {migrations}, kills "
          f"{result.kills} (leader {result.leader_kills}), subscriber connect failures "
          f"{sum(s.connect_failures for s in subs)}, publisher reconnects "
          f"{sum(p.connect_failures for p in pubs)} failed")
    print(f"history: {dump}")
    print("\n".join(nemesis.log))
    print(result.report())

    assert result.kills >= 1 or seconds < 8, "the nemesis never struck"
    assert result.acknowledged > 0 and migrations > 0
    assert result.ok, result.report()
