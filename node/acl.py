"""Topic authorization by ACL file (``acl_file``), in Mosquitto's format; sans-IO.

A file of Mosquitto's ``acl_file`` works as it is::

    # comments and blank lines are skipped
    topic read public/#              # before the first `user` line: anonymous clients
    user alice
    topic readwrite alice/#          # alice's own rules
    topic deny alice/secret/#
    pattern write devices/%c/up      # every client: %c is its ClientID, %u its username
    pattern read devices/%u/#

``topic [read|write|readwrite|deny] TOPIC`` (no access word: readwrite) grants to the
section it is in: the anonymous clients until the first ``user NAME`` line, that user
after it. ``pattern [...] TOPIC`` applies to every client wherever it stands; ``%c`` and
``%u`` must each be a whole topic level, and a pattern with ``%u`` never applies to a
client without a username. ``#`` and ``+`` work as in subscriptions, and a rule whose
first level is a wildcard does not reach topics beginning with ``$`` (MQTT 4.7.2).

Once a file is given, everything it does not grant is denied. ``deny`` rules come first:

* PUBLISH to ``topic`` needs a ``write`` grant that matches it and no ``deny`` that does;
* SUBSCRIBE to a filter needs a ``read`` grant whose topic covers every topic the filter
  can match (``a/#`` covers ``a/b/+``; ``a/+`` does not cover ``a/#``) and no ``deny`` that
  covers the filter; a filter that a ``deny`` only partly overlaps is allowed, and each
  message is checked on delivery (``Acl.may_read``): the denied ones are not delivered;
* a will message needs ``write`` on its topic at CONNECT.

``Acl.rights(username, client_id)`` compiles the rules of one client once (cached per
pair); the per-topic answers of a client are cached too, so a check in the publish path is
a dictionary lookup.
"""

from __future__ import annotations

from .config import ConfigError

__all__ = ["Acl", "AclFileError", "Rights", "covers", "matches", "overlaps"]

READ, WRITE = 1, 2
ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
MAX_CACHED_CLIENTS = 20_000
MAX_CACHED_TOPICS = 4_096  # per client and direction


class AclFileError(ConfigError):
    """An ACL file that cannot be used: the message names the line and what to fix."""


def matches(rule: tuple, topic: tuple) -> bool:
    """Does the rule topic ``rule`` (levels, wildcards allowed) match the topic name
    ``topic`` (levels, no wildcards)? Iterative: no input reaches a recursion limit."""
    if rule and rule[0] in ("+", "#") and topic and topic[0].startswith("$"):
        return False
    n = len(topic)
    for i, level in enumerate(rule):
        if level == "#":
            return True
        if i >= n:
            return False
        if level != "+" and level != topic[i]:
            return False
    return len(rule) == n


def covers(rule: tuple, filt: tuple) -> bool:
    """Does ``rule`` match every topic that the subscription filter ``filt`` matches?"""
    if rule and rule[0] in ("+", "#") and filt and filt[0].startswith("$"):
        return False
    n = len(filt)
    for i, level in enumerate(rule):
        if level == "#":
            return True
        if i >= n:
            return False
        f = filt[i]
        if f == "#":
            # (`a/#` matches `a` too: only a `#` covers it, or, at the first level,
            # `+/#`, as the first level exists anyway)
            return i == 0 and rule == ("+", "#")
        if level == "+":
            continue
        if f == "+" or f != level:
            return False
    return len(rule) == n


def overlaps(a: tuple, b: tuple) -> bool:
    """Is there a topic that both ``a`` and ``b`` (wildcards allowed) match?"""
    if a and b and ((a[0] in ("+", "#") and b[0].startswith("$"))
                    or (b[0] in ("+", "#") and a[0].startswith("$"))):
        return False
    for x, y in zip(a, b):
        if x == "#" or y == "#":
            return True
        if x != "+" and y != "+" and x != y:
            return False
    if len(a) == len(b):
        return True
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))] == "#"  # (`a/#` matches `a`)


class Rights:
    """One client's compiled rules, with its answers cached."""

    __slots__ = ("deny", "read", "write", "acl", "key", "_pub", "_read")

    def __init__(self, deny: list, read: list, write: list, acl: "Acl", key: tuple) -> None:
        self.deny = deny
        self.read = read
        self.write = write
        self.acl = acl  # the rules these were compiled from
        self.key = key  # (username, client_id)
        self._pub: dict[str, bool] = {}
        self._read: dict[str, bool] = {}

    def may_publish(self, topic: str) -> bool:
        ok = self._pub.get(topic)
        if ok is None:
            levels = tuple(topic.split("/"))
            ok = not any(matches(r, levels) for r in self.deny) and \
                any(matches(r, levels) for r in self.write)
            if len(self._pub) >= MAX_CACHED_TOPICS:
                self._pub.clear()
            self._pub[topic] = ok
        return ok

    def may_read(self, topic: str) -> bool:
        """A message on ``topic`` may be delivered (checked only while a deny rule exists:
        a subscription was allowed only where a read grant covers it)."""
        ok = self._read.get(topic)
        if ok is None:
            levels = tuple(topic.split("/"))
            ok = not any(matches(r, levels) for r in self.deny)
            if len(self._read) >= MAX_CACHED_TOPICS:
                self._read.clear()
            self._read[topic] = ok
        return ok

    def may_subscribe(self, topic_filter: str) -> bool:
        levels = tuple(topic_filter.split("/"))
        return not any(covers(r, levels) for r in self.deny) and \
            any(covers(r, levels) for r in self.read)


class Acl:
    """The rules of one ACL file (``Acl.parse``); replaced as a whole on reload."""

    def __init__(self, anonymous: list, users: dict[str, list], patterns: list) -> None:
        # each rule: (access bits or 0 for deny, topic levels)
        self.anonymous = anonymous
        self.users = users
        self.patterns = patterns
        self.has_deny = any(not a for a, _ in anonymous + patterns) or any(
            not a for rules in users.values() for a, _ in rules)
        self._cache: dict[tuple, Rights] = {}

    @classmethod
    def parse(cls, text: str, path: str = "acl file") -> "Acl":
        anonymous: list = []
        users: dict[str, list] = {}
        patterns: list = []
        current = anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word == "user":
                if not rest:
                    raise AclFileError(f"{path} line {number}: `user` needs a username")
                current = users.setdefault(rest, [])
                continue
            if word not in ("topic", "pattern"):
                raise AclFileError(f"{path} line {number}: expected `user`, `topic` or "
                                   f"`pattern`, got {word!r}")
            first, _, after = rest.partition(" ")
            if first in ACCESS and after.strip():
                access, topic = ACCESS[first], after.strip()
            elif after.strip():
                raise AclFileError(f"{path} line {number}: {first!r} is not read, write, "
                                   "readwrite or deny (a topic with a space needs the access "
                                   "word before it)")
            else:
                access, topic = READ | WRITE, rest
            if not topic:
                raise AclFileError(f"{path} line {number}: `{word}` needs a topic")
            levels = tuple(topic.split("/"))
            problem = _check_rule(levels, word == "pattern")
            if problem:
                raise AclFileError(f"{path} line {number}: {problem}")
            (patterns if word == "pattern" else current).append((access, levels))
        return cls(anonymous, users, patterns)

    def rule_count(self) -> int:
        return len(self.anonymous) + len(self.patterns) + sum(map(len, self.users.values()))

    def rights_of(self, session) -> Rights:
        """``rights`` of a session's user and ClientID, kept on the session (the publish
        path's check is then two attribute reads and a dictionary lookup)."""
        r = session.rights
        if r is None or r.acl is not self or r.key[0] != session.username:
            r = session.rights = self.rights(session.username, session.client_id)
        return r

    def rights(self, username: str | None, client_id: str) -> Rights:
        key = (username, client_id)
        r = self._cache.get(key)
        if r is None:
            r = self._compile(username, client_id)
            if len(self._cache) >= MAX_CACHED_CLIENTS:
                self._cache.clear()
            self._cache[key] = r
        return r

    def _compile(self, username: str | None, client_id: str) -> Rights:
        rules = list(self.anonymous if username is None else self.users.get(username, ()))
        for access, levels in self.patterns:
            if "%u" in levels and (username is None or not _plain_level(username)):
                continue
            if "%c" in levels and not _plain_level(client_id):
                continue  # (a ClientID `#` must not turn a pattern into a wildcard)
            rules.append((access, tuple(username if lv == "%u" else client_id if lv == "%c"
                                        else lv for lv in levels)))
        return Rights([lv for a, lv in rules if not a], [lv for a, lv in rules if a & READ],
                      [lv for a, lv in rules if a & WRITE], self, (username, client_id))


def _plain_level(value: str) -> bool:
    """Can ``value`` stand in for a whole level without becoming a wildcard or several
    levels? (A pattern does not apply to a client whose name cannot.)"""
    return bool(value) and not any(c in value for c in "/+#")


def _check_rule(levels: tuple, pattern: bool) -> str | None:
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "`#` must be a whole level and the last one"
        if "+" in level and level != "+":
            return "`+` must be a whole level"
        if ("%u" in level or "%c" in level) and (not pattern or level not in ("%u", "%c")):
            return ("`%u` / `%c` must be a whole level, and only in `pattern` lines" if pattern
                    else "`%u` / `%c` work only in `pattern` lines")
    return None


def load_acl_file(path: str) -> Acl:
    """Read and parse ``path`` (AclFileError when it cannot be used)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise AclFileError(f"acl_file {path} cannot be read ({err.strerror}): check the path "
                           "and its permissions") from None
    return Acl.parse(text, path)
