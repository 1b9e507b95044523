"""The pure rules of cluster membership: a forgotten node's routes and sessions go (one rule
for the Raft state and its view), the cluster id sticks, the stored membership file
round-trips and refuses damage, and nodes back at new addresses agree on one voter set."""

import json

import pytest

from cluster.membership import current_voters
from cluster.routing import RoutingState, RoutingView, forget_node
from cluster.stored import StoredMembership, StoredStateError, describe


def test_forget_removes_member_routes_and_the_sessions_it_owned_or_held():
    members = {"n1": {}, "n2": {}, "n3": {}}
    owners = {"a": ("n3", 5), "b": ("n1", 6), "c": ("n2", 7)}
    holders = {"a": "n3", "b": "n3", "c": "n2"}
    routes = {"x/#": {"n1", "n3"}, "y": {"n3"}}
    released = forget_node(members, owners, holders, routes, "n3")
    assert released == ["a", "b"]
    assert set(members) == {"n1", "n2"}
    assert owners == {"b": ("n1", 6), "c": ("n2", 7)}  # b's owner is alive: it stays
    assert holders == {"c": "n2"}
    assert routes == {"x/#": {"n1"}}


def test_the_state_and_the_view_apply_forget_and_init_alike():
    events = []
    state = RoutingState(events.extend)
    ops = [("member", "n1", {"raft": "h:1"}), ("member", "n2", {"raft": "h:2"}),
           ("claim", "c1", "n2", False), ("routes", "n2", ["t/#"], []),
           ("init", "id-1"), ("init", "id-2"), ("forget", "n2")]
    results = [state._apply_one(op, events) for op in ops]
    assert results[4] == results[5] == "id-1"  # the first cluster id sticks
    assert results[6] == ["c1"]
    view = RoutingView()
    view.apply_events(events)
    for name in ("members", "owners", "holders", "routes", "cluster_id"):
        assert getattr(view, name) == getattr(state, name), name
    assert view.cluster_id == "id-1" and "n2" not in view.members and view.holders == {}


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
