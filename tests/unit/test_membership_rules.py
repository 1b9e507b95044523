"""The pure rules of cluster membership: a forgotten node's routes and sessions go (one rule
for the Raft state and its view), the cluster id sticks, the stored membership file
round-trips and refuses damage, and nodes back at new addresses agree on one voter set."""

import json
import random

import pytest

from cluster.membership import current_voters
from cluster.routing import (Claimed, ClusterIdSet, Forgotten, MemberChanged, Moved, Released,
                             RoutesChanged, RoutingState, RoutingView, Tables, apply)
from cluster.stored import StoredMembership, StoredStateError, describe


def test_forget_removes_member_routes_and_the_sessions_it_owned_or_held():
    t = Tables(members={"n1": {}, "n2": {}, "n3": {}},
               owners={"a": ("n3", 5), "b": ("n1", 6), "c": ("n2", 7)},
               holders={"a": "n3", "b": "n3", "c": "n2"},
               routes={"x/#": {"n1", "n3"}, "y": {"n3"}})
    released, event = apply(t, ("forget", "n3"))
    assert released == ["a", "b"] and event == Forgotten("n3", ("a", "b"), (), 1)
    assert set(t.members) == {"n1", "n2"}
    assert t.owners == {"b": ("n1", 6), "c": ("n2", 7)}  # b's owner is alive: it stays
    assert t.holders == {"c": "n2"}
    assert t.routes == {"x/#": {"n1"}}


def test_the_state_machine_and_the_view_agree_through_one_apply():
    """The Raft state machine and the loop-side view run the same rules on the same
    operations: random batches (malformed ones included) leave equal tables, and the view's
    listeners see one event per change."""
    rng = random.Random(7)
    posted = []
    state = RoutingState(posted.append)
    nodes, ids = ["n1", "n2", "n3"], [f"c{i}" for i in range(20)]
    ops = []
    for _ in range(2000):
        kind = rng.choice(["claim", "release", "moved", "routes", "member", "forget", "init",
                           "sync", "bad"])
        cid, node = rng.choice(ids), rng.choice(nodes)
        ops.append({
            "claim": ("claim", cid, node, rng.random() < 0.2),
            "release": ("release", cid, node, rng.randrange(1, 50)),
            "moved": ("moved", cid, rng.randrange(1, 50), node, rng.choice(nodes)),
            "routes": ("routes", node, [f"t/{rng.randrange(5)}"], [f"t/{rng.randrange(5)}"]),
            "member": ("member", node, None if rng.random() < 0.2 else {"raft": node}),
            "forget": ("forget", node),
            "init": ("init", f"id-{rng.randrange(3)}"),
            "sync": ("sync",),
            "bad": rng.choice([("claim", cid), ("nope", 1), (), ("moved", cid)]),
        }[kind])
    batches = [ops[i:i + rng.randrange(1, 20)] for i in range(0, len(ops), 10)]
    results = [state.apply(batch, _doApply=True) for batch in batches]
    assert any(r[0] == "error" for rs in results for r in rs if isinstance(r, tuple) and r)
    view = RoutingView()
    seen = []
    view.listeners.append(seen.append)
    for batch in posted:
        view.apply_ops(batch)
    assert view.tables == state.tables
    assert {type(e) for e in seen} >= {Claimed, Released, Moved, RoutesChanged, MemberChanged,
                                       Forgotten, ClusterIdSet}
    assert state.tables.cluster_id == [e for e in seen if isinstance(e, ClusterIdSet)][0].cluster_id


def test_stored_membership_round_trips_and_refuses_damage(tmp_path):
    store = StoredMembership(str(tmp_path))
    assert store.load() is None
    state = {"cluster": "c", "cluster_id": "x", "node_id": "n1", "raft": "h:1",
             "voters": ["h:1", "h:3"], "members": {"n1": {"transport": "h:0", "raft": "h:1"}},
             "left": False}
    store.save(state)
    loaded = store.load()
    assert {k: loaded[k] for k in state} == state and loaded["v"] == 1
    assert "2 Raft voters" in describe(loaded)
    assert not (tmp_path / "cluster.json.tmp").exists()
    (tmp_path / "cluster.json").write_text(json.dumps({"v": 1, "cluster": "c"}))
    with pytest.raises(StoredStateError, match="damaged"):
        store.load()
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(StoredStateError, match="shoal cluster reset"):
        store.load()
    assert store.remove() and not store.remove()


STORED = {"cluster_id": "id", "voters": ["a:1", "b:1", "c:1"],
          "members": {"n1": {"raft": "a:1"}, "n2": {"raft": "b:1"}, "n3": {"raft": "c:1"}}}


def stored_answer(raft):
    return {"phase": "stored", "raft": raft, "cluster_id": "id"}


def test_voters_back_at_their_addresses_re_form_at_once():
    voters, why = current_voters(STORED, "n1", "a:1", {})
    assert voters == ["a:1", "b:1", "c:1"] and why == ""


def test_voters_at_new_addresses_wait_for_every_one_then_agree():
    # n1 is back at a new address: it waits until every stored voter answered
    voters, why = current_voters(STORED, "n1", "a:2", {"n2": stored_answer("b:2")})
    assert voters is None and "n3" in why
    answers = {"n2": stored_answer("b:2"), "n3": stored_answer("c:1")}
    assert current_voters(STORED, "n1", "a:2", answers)[0] == ["a:2", "b:2", "c:1"]
    # n2 sees the same: one configuration on every node
    answers = {"n1": stored_answer("a:2"), "n3": stored_answer("c:1")}
    assert current_voters(STORED, "n2", "b:2", answers)[0] == ["a:2", "b:2", "c:1"]
    # a node of another cluster id does not count
    other = dict(stored_answer("c:9"), cluster_id="other")
    assert current_voters(STORED, "n1", "a:2", {"n2": stored_answer("b:2"),
                                                "n3": other})[0] is None
