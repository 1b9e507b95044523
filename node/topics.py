"""Topic filter matching (a trie), shared subscription groups and the retained store.

``SubscriptionTree`` owns every subscription of the node. ``match(topic)`` answers which
subscriptions a PUBLISH reaches; the answer is cached per topic name until the next
subscribe or unsubscribe, so a steady stream of messages costs one dict lookup.
"""

from __future__ import annotations

from typing import Iterator


class SubEntry:
    """One subscription of one session: its filter and its options."""

    __slots__ = ("client_id", "topic_filter", "qos", "no_local", "retain_as_published",
                 "retain_handling", "sub_id", "share_group")

    def __init__(self, client_id: str, topic_filter: str, qos: int, no_local: bool = False,
                 retain_as_published: bool = False, retain_handling: int = 0,
                 sub_id: int | None = None, share_group: str | None = None) -> None:
        self.client_id = client_id
        self.topic_filter = topic_filter  # as the client wrote it, $share/... included
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.sub_id = sub_id
        self.share_group = share_group

    def to_record(self) -> list:
        return [self.topic_filter, self.qos, self.no_local, self.retain_as_published,
                self.retain_handling, self.sub_id, self.share_group]

    def __repr__(self) -> str:
        return f"SubEntry({self.client_id!r}, {self.topic_filter!r}, qos={self.qos})"


class SharedGroup:
    """Members of ``$share/<group>/<filter>``; a message goes to one of them."""

    __slots__ = ("name", "key", "members", "next")

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key  # the whole filter, "$share/<group>/<filter>": names it cluster-wide
        self.members: dict[str, SubEntry] = {}
        self.next = 0  # round-robin cursor


class _Node:
    __slots__ = ("children", "subs", "groups")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, SubEntry] = {}  # client_id -> entry
        self.groups: dict[str, SharedGroup] = {}


class Match:
    """What a topic reaches: plain subscriptions and shared groups (pick one member)."""

    __slots__ = ("entries", "groups", "derived")

    def __init__(self, entries: list[SubEntry], groups: list[SharedGroup]) -> None:
        self.entries = entries
        self.groups = groups
        # whatever a user of the tree computes from this match (the cluster: the nodes a
        # topic goes to); it lives exactly as long as the cached match
        self.derived = None


_CACHE_LIMIT = 100_000
_CACHE_BYTES = 8 << 20  # topic characters kept as cache keys, at most (long topics, one-offs)


class SubscriptionTree:
    def __init__(self) -> None:
        self._root = _Node()
        self._cache: dict[str, Match] = {}
        self._cache_bytes = 0
        self.count = 0

    def add(self, filter_levels: str, entry: SubEntry) -> bool:
        """Add or replace ``entry`` under ``filter_levels`` (the filter without any
        ``$share/group/`` prefix). Returns True when it is new."""
        node = self._root
        for level in filter_levels.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        self._cache.clear()
        self._cache_bytes = 0
        if entry.share_group is None:
            new = entry.client_id not in node.subs
            node.subs[entry.client_id] = entry
        else:
            group = node.groups.get(entry.share_group)
            if group is None:
                group = node.groups[entry.share_group] = SharedGroup(entry.share_group,
                                                                    entry.topic_filter)
            new = entry.client_id not in group.members
            group.members[entry.client_id] = entry
        if new:
            self.count += 1
        return new

    def remove(self, filter_levels: str, client_id: str, share_group: str | None) -> bool:
        path = [self._root]
        levels = filter_levels.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if share_group is None:
            found = node.subs.pop(client_id, None) is not None
        else:
            group = node.groups.get(share_group)
            found = group is not None and group.members.pop(client_id, None) is not None
            if group is not None and not group.members:
                del node.groups[share_group]
        if not found:
            return False
        self.count -= 1
        self._cache.clear()
        self._cache_bytes = 0
        # prune empty branches
        for i in range(len(levels), 0, -1):
            n = path[i]
            if n.children or n.subs or n.groups:
                break
            del path[i - 1].children[levels[i - 1]]
        return True

    def match(self, topic: str) -> Match:
        m = self._cache.get(topic)
        if m is not None:
            return m
        entries: list[SubEntry] = []
        groups: list[SharedGroup] = []
        levels = topic.split("/")
        n = len(levels)
        # [MQTT-4.7.2-1]: topics starting with '$' do not match filters starting with a wildcard
        dollar = topic.startswith("$")
        # depth first with a stack of its own (no input reaches a recursion limit), in the
        # order of a recursive walk: at each level `#`, then the `+` branch, then the name
        stack = [(self._root, 0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, i = pop()
            children = node.children
            if i == n:
                entries.extend(node.subs.values())
                groups.extend(node.groups.values())
                # "a/#" also matches "a"
                hash_node = children.get("#")
                if hash_node is not None:
                    entries.extend(hash_node.subs.values())
                    groups.extend(hash_node.groups.values())
                continue
            child = children.get(levels[i])
            if child is not None:
                push((child, i + 1))
            if not (dollar and i == 0):
                hash_node = children.get("#")
                if hash_node is not None:
                    entries.extend(hash_node.subs.values())
                    groups.extend(hash_node.groups.values())
                plus = children.get("+")
                if plus is not None:
                    push((plus, i + 1))
        m = Match(entries, groups)
        if len(self._cache) >= _CACHE_LIMIT or self._cache_bytes >= _CACHE_BYTES:
            self._cache.clear()
            self._cache_bytes = 0
        self._cache[topic] = m
        self._cache_bytes += len(topic)
        return m


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Does a (non-shared) filter match a topic name? Used for retained messages."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class RetainedStore:
    """Retained messages by topic name. Lookups by filter scan: retained sets are small
    next to subscription traffic, and an exact (wildcard-free) filter is one dict hit."""

    def __init__(self) -> None:
        self._by_topic: dict = {}
        self.bytes = 0  # payloads and topics held (max_retained_bytes)

    def __len__(self) -> int:
        return len(self._by_topic)

    def get(self, topic: str):
        return self._by_topic.get(topic)

    def set(self, topic: str, message) -> None:
        old = self._by_topic.get(topic)
        if old is not None:
            self.bytes -= len(old.payload) + len(topic)
        self._by_topic[topic] = message
        self.bytes += len(message.payload) + len(topic)

    def delete(self, topic: str) -> None:
        old = self._by_topic.pop(topic, None)
        if old is not None:
            self.bytes -= len(old.payload) + len(topic)

    def matching(self, topic_filter: str) -> Iterator:
        if "+" not in topic_filter and "#" not in topic_filter:
            m = self._by_topic.get(topic_filter)
            if m is not None:
                yield m
            return
        for topic, m in list(self._by_topic.items()):
            if filter_matches(topic_filter, topic):
                yield m

    def items(self):
        return self._by_topic.items()
