"""The subscription trie agrees with the plain filter matcher, including the '$' rule,
shared groups and removal."""

from hypothesis import given, settings, strategies as st

from node.topics import RetainedStore, SubEntry, SubscriptionTree, filter_matches

LEVELS = st.sampled_from(["a", "b", "c", "$SYS", ""])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
FILTER_LEVELS = st.sampled_from(["a", "b", "c", "$SYS", "", "+"])

@st.composite
def filters(draw):
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)

@settings(max_examples=300, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=8), st.lists(TOPICS, min_size=1, max_size=8))
def test_trie_matches_like_the_plain_matcher(filter_list, topics):
    tree = SubscriptionTree()
    for i, f in enumerate(filter_list):
        tree.add(f, SubEntry(f"c{i}", f, 0))
    for topic in topics:
        got = sorted(e.client_id for e in tree.match(topic).entries)
        want = sorted(f"c{i}" for i, f in enumerate(filter_list) if filter_matches(f, topic))
        assert got == want, (topic, filter_list)

def test_filter_matching_rules():
    assert filter_matches("a/#", "a")
    assert filter_matches("a/#", "a/b/c")
    assert filter_matches("+/b", "a/b")
    assert filter_matches("+", "")
    assert not filter_matches("+", "a/b")
    assert filter_matches("#", "a/b")
    assert not filter_matches("#", "$SYS/x")
    assert not filter_matches("+/x", "$SYS/x")
    assert filter_matches("$SYS/#", "$SYS/x")
    assert filter_matches("a//b", "a//b")
    assert not filter_matches("a/b", "a/b/c")

def test_removal_prunes_and_invalidates_the_cache():
    tree = SubscriptionTree()
    tree.add("a/+", SubEntry("c1", "a/+", 1))
    assert [e.client_id for e in tree.match("a/x").entries] == ["c1"]
    assert tree.remove("a/+", "c1", None)
    assert tree.match("a/x").entries == []
    assert not tree.remove("a/+", "c1", None)
    assert tree.count == 0
    assert tree._root.children == {}

def test_shared_groups_are_matched_as_groups():
    tree = SubscriptionTree()
    tree.add("t/#", SubEntry("c1", "$share/g/t/#", 1, share_group="g"))
    tree.add("t/#", SubEntry("c2", "$share/g/t/#", 1, share_group="g"))
    tree.add("t/#", SubEntry("c3", "t/#", 1))
    m = tree.match("t/1")
    assert [e.client_id for e in m.entries] == ["c3"]
    assert len(m.groups) == 1 and sorted(m.groups[0].members) == ["c1", "c2"]
    tree.remove("t/#", "c1", "g")
    tree.remove("t/#", "c2", "g")
    assert tree.match("t/1").groups == []

def test_retained_lookup_by_filter_and_byte_count():
    from types import SimpleNamespace
    store = RetainedStore()
    for t in ("a/b", "a/c", "x/y", "$SYS/z"):
        store.set(t, SimpleNamespace(topic=t, payload=t.encode() * 2))

    def topics(found):
        return sorted(m.topic for m in found)
    assert topics(store.matching("a/+")) == ["a/b", "a/c"]
    assert topics(store.matching("x/y")) == ["x/y"]
    assert topics(store.matching("#")) == ["a/b", "a/c", "x/y"]
    assert store.bytes == 3 * 9 + 18
    store.delete("a/b")
    store.set("a/c", SimpleNamespace(topic="a/c", payload=b"1"))
    assert topics(store.matching("a/#")) == ["a/c"]
    assert store.bytes == (3 + 1) + (3 + 6) + (6 + 12)


def test_the_match_cache_is_bounded_in_bytes_and_deep_topics_do_not_recurse():
    from node.topics import _CACHE_BYTES, SubEntry, SubscriptionTree
    tree = SubscriptionTree()
    tree.add("#", SubEntry("c", "#", 0))
    for i in range(2_000):  # 2,000 distinct 60 KB topics: ~117 MiB if all were kept
        topic = f"{i}/" + "x" * 60_000
        assert [e.client_id for e in tree.match(topic).entries] == ["c"]
    assert tree._cache_bytes <= _CACHE_BYTES + 61_000
    deep = "/".join(["a"] * 50_000)
    tree.add(deep, SubEntry("d", deep, 0))
    tree.add(deep[:-1] + "+", SubEntry("e", deep[:-1] + "+", 0))
    assert sorted(e.client_id for e in tree.match(deep).entries) == ["c", "d", "e"]
