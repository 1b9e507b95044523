"""The fault checker on hand-made histories: each rule once satisfied, once broken."""

from checker import (acked, check, connected, disconnected, heal, kill, partition, received,
                     restart, sent, stale_received, subscribed, toxic, toxic_end,
                     topic_matches)

T = "f/a"


def base(qos=1, n=3):
    """s1 subscribed at t=1; p1 sends and gets acknowledged seq 0..n-1 from t=2 on."""
    h = [connected(0.5, "s1", "n1", False, False), subscribed(1.0, "s1", "f/#", qos),
         connected(0.6, "p1", "n2", False, False)]
    for k in range(n):
        h += [sent(2 + k, "p1", T, k, qos), acked(2.1 + k, "p1", T, k, qos)]
    return h


def test_everything_delivered_once_in_order_is_clean():
    h = base(2) + [received(10 + k, "s1", T, k, 2) for k in range(3)]
    r = check(h)
    assert r.ok, r.report()
    assert (r.acknowledged, r.lost, r.qos2_duplicates, r.order_violations,
            r.sessions_lost) == (3, 0, 0, 0, 0)


def test_an_acknowledged_message_never_received_is_lost():
    h = base() + [received(10, "s1", T, 0, 1), received(11, "s1", T, 2, 1),
                  kill(2.9, "n1", leader=True), restart(6, "n1")]
    r = check(h)
    assert (r.lost, r.lost_messages, r.lost_in_session_gap) == (1, 1, 0)
    assert "f/a #1" in r.lost_examples[0] and "n1 (leader)" in r.lost_examples[0]
    assert r.leader_kills == 1 and not r.ok


def test_unacknowledged_or_sent_before_the_suback_is_not_required():
    h = [subscribed(5.0, "s1", "f/#", 1),
         sent(1, "p1", T, 0, 1), acked(6, "p1", T, 0, 1),    # sent before the SUBACK
         sent(7, "p1", T, 1, 1),                             # never acknowledged
         sent(8, "p1", "other/x", 0, 1), acked(8.1, "p1", "other/x", 0, 1)]  # no match
    r = check(h)
    assert r.lost == 0 and r.acknowledged == 2, r.report()


def test_loss_counts_per_subscriber():
    h = base(n=1) + [subscribed(1.2, "s2", "f/+", 1), received(9, "s1", T, 0, 1)]
    r = check(h)
    assert (r.lost, r.lost_messages) == (1, 1)
    assert "s2" in r.lost_examples[0]


def test_qos1_redelivery_is_allowed_qos2_duplicate_is_not():
    h1 = base(1, n=1) + [received(9, "s1", T, 0, 1), received(9.5, "s1", T, 0, 1, dup=True)]
    r1 = check(h1)
    assert r1.ok and r1.qos1_redeliveries == 1, r1.report()
    h2 = base(2, n=1) + [received(9, "s1", T, 0, 2), received(9.5, "s1", T, 0, 2, dup=True)]
    r2 = check(h2)
    assert r2.qos2_duplicates == 1 and not r2.ok
    assert "f/a #0" in r2.duplicate_examples[0]


def test_first_arrivals_out_of_publish_order():
    in_order = base(n=3) + [received(9, "s1", T, 0, 1), received(9.1, "s1", T, 1, 1),
                            received(9.2, "s1", T, 0, 1), received(9.3, "s1", T, 2, 1)]
    assert check(in_order).order_violations == 0    # a redelivery of 0 is not a first arrival
    swapped = base(n=3) + [received(9, "s1", T, 0, 1), received(9.1, "s1", T, 2, 1),
                           received(9.2, "s1", T, 1, 1)]
    r = check(swapped)
    assert r.order_violations == 1 and "#1" in r.order_examples[0]


def test_order_is_per_topic():
    h = base(n=2) + [sent(3.5, "p2", "f/b", 0, 1), acked(3.6, "p2", "f/b", 0, 1),
                     received(9, "s1", "f/b", 0, 1), received(9.1, "s1", T, 0, 1),
                     received(9.2, "s1", T, 1, 1)]
    assert check(h).order_violations == 0


def test_resume_with_session_present_0_is_a_lost_session_and_explains_its_gap():
    h = [connected(0.5, "s1", "n1", False, False), subscribed(1.0, "s1", "f/#", 1),
         connected(2.0, "s1", "n2", True, True), disconnected(2.5, "s1", 0),
         kill(2.6, "n2"),
         sent(3.0, "p1", T, 0, 1), acked(3.1, "p1", T, 0, 1),   # queued on n2: gone
         connected(8.0, "s1", "n3", False, True), subscribed(8.1, "s1", "f/#", 1),
         sent(9.0, "p1", T, 1, 1), acked(9.1, "p1", T, 1, 1), received(9.2, "s1", T, 1, 1)]
    r = check(h)
    assert (r.resumes, r.sessions_lost) == (2, 1)
    assert (r.lost, r.lost_in_session_gap) == (1, 1)
    assert "n3" in r.session_lost_examples[0] and "n2 at 2.60" in r.session_lost_examples[0]


def test_resumes_with_session_present_are_clean():
    h = [connected(0.5, "s1", "n1", False, False), subscribed(1.0, "s1", "f/#", 1)]
    h += [connected(2 + i, "s1", f"n{i % 3 + 1}", True, True) for i in range(5)]
    r = check(h)
    assert (r.resumes, r.sessions_lost) == (5, 0) and r.ok


def test_partitions_and_toxics_are_counted_and_explain_losses():
    h = base(n=4) + [partition(2.5, "n2", leader=True), heal(3.5, "n2"),   # #1 in it
                     partition(7.0, "n3"),                                  # never healed
                     toxic(1.0, "px-n1", "latency 200ms"), toxic_end(2.0, "px-n1", "latency"),
                     toxic(4.0, "px-n2", "reset_peer timeout=0"),
                     received(9, "s1", T, 0, 1), received(9.1, "s1", T, 2, 1),
                     received(9.2, "s1", T, 3, 1)]
    r = check(h)
    assert (r.partitions, r.leader_partitions, r.toxics) == (2, 1, 2)
    assert r.toxic_types == {"latency": 1, "reset_peer": 1}
    assert (r.lost, r.lost_in_partition) == (1, 1), r.report()
    assert "sent during a partition" in r.lost_examples[0]
    assert "last partition before: n2 (leader) 2.50-3.50" in r.lost_examples[0]
    assert "partitions=2" in r.report() and "toxics=2" in r.report()
    # a loss after the heal is not a partition's
    late = base(n=1) + [partition(0.1, "n2"), heal(0.2, "n2")]
    assert (check(late).lost, check(late).lost_in_partition) == (1, 0)


def test_topic_matching():
    assert topic_matches("f/#", "f/a") and topic_matches("f/+", "f/a")
    assert topic_matches("#", "x/y") and topic_matches("f/a", "f/a")
    assert not topic_matches("f/+", "f/a/b") and not topic_matches("g/#", "f/a")
    assert not topic_matches("f/a/b", "f/a")


def test_a_superseded_connection_delivering_what_was_sent_after_the_takeover_is_a_double_owner():
    # s1 resumed on n2 at 2.5 with its old connection to n1 left open: seq 0 (sent at 2,
    # before the takeover) may still arrive there; seq 1 (sent at 3) must not
    h = base() + [connected(2.5, "s1", "n2", True, True),
                  received(2.6, "s1", T, 0, 1), stale_received(2.6, "s1", T, 0, 2.5),
                  received(3.2, "s1", T, 1, 1), stale_received(3.2, "s1", T, 1, 2.5),
                  received(4.2, "s1", T, 2, 1)]
    r = check(h)
    assert (r.double_owners, r.stale_deliveries, r.lost) == (1, 1, 0)
    assert "f/a #1" in r.double_owner_examples[0] and not r.ok
