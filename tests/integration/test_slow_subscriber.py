"""Back-pressure: a subscriber that stops reading must not make the node buffer without
bound; QoS 0 messages for it are dropped and everyone else is still served."""

from __future__ import annotations

import threading

import pytest

from support import Publish, encode, wait_for

MESSAGES = 200_000
PAYLOAD = b"x" * 1024
BATCH = 500


@pytest.mark.timeout(120)
def test_stalled_subscriber_costs_bounded_memory_and_others_still_get_pingresp(node):
    stuck = node.raw(5, rcvbuf=4096)
    stuck.connect("stuck")
    stuck.subscribe("bp/#", qos=0)
    # From here on `stuck` never reads its socket.
    pinger = node.raw(5)
    pinger.connect("pinger")
    publisher = node.raw(4)
    publisher.connect("blaster")
    before = node.stats() if node.has_admin else None
    baseline_kb = node.rss_kb()

    peak_kb = [baseline_kb]
    done = threading.Event()
    errors: list = []

    def sample_rss():
        while not done.is_set():
            try:
                peak_kb[0] = max(peak_kb[0], node.rss_kb())
            except (OSError, AssertionError):
                return
            done.wait(0.05)

    def blast():
        try:
            batch = encode(Publish("bp/t", PAYLOAD), 4) * BATCH
            for _ in range(MESSAGES // BATCH):
                publisher.send_bytes(batch)
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            done.set()

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sender = threading.Thread(target=blast, daemon=True)
    sampler.start()
    sender.start()
    latencies = []
    for _ in range(2000):
        if done.is_set():
            break
        latencies.append(pinger.ping(timeout=10))
        done.wait(0.1)
    sender.join(90)
    assert not sender.is_alive(), "publisher could not hand over 200,000 messages in 90 s"
    assert not errors, f"publisher failed: {errors!r}"

    if before is not None:
        wait_for(lambda: node.stats()["messages_in"] - before["messages_in"] >= MESSAGES, 60,
                 interval=0.2,
                 message=lambda: f"the node to take all messages in: {node.stats()}")
    done.set()
    sampler.join(5)
    peak_kb[0] = max(peak_kb[0], node.rss_kb())

    growth_mb = (peak_kb[0] - baseline_kb) / 1024
    assert growth_mb < 100, f"RSS grew by {growth_mb:.0f} MB for a subscriber that never reads"
    if before is not None:
        stats = node.stats()
        assert stats["dropped_messages"] - before["dropped_messages"] > 0, stats
    assert pinger.ping(timeout=5) < 1.0, "PINGRESP was not prompt after the flood"
    if latencies:
        assert max(latencies) < 2.0, \
            f"PINGRESP took up to {max(latencies):.2f}s during the flood (n={len(latencies)})"
    assert node.alive()
