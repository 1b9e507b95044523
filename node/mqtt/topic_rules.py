"""Topic name and topic filter syntax (3.1.1 section 4.7, 5.0 sections 4.7 and 4.8.2).

The codec does not call these for filters: a bad filter in a SUBSCRIBE is answered
with SUBACK 0x8F by the session, not by closing the connection. U+0000 never reaches
here (the codec rejects it while decoding UTF-8).
"""

from __future__ import annotations

__all__ = ["valid_topic_name", "valid_topic_filter", "parse_shared", "SHARE_PREFIX"]

#: Shared subscriptions are ``$share/{ShareName}/{filter}``.
SHARE_PREFIX = "$share/"


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH / Will topic: at least one character and no wildcard."""
    return bool(topic) and "+" not in topic and "#" not in topic


def _valid_plain_filter(f: str) -> bool:
    if not f:
        return False
    if "+" not in f and "#" not in f:
        return True
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#" or i != last:
                return False
        elif "+" in level and level != "+":
            return False
    return True


def valid_topic_filter(f: str) -> bool:
    """A SUBSCRIBE / UNSUBSCRIBE filter: ``#`` only alone as the last level, ``+`` only
    alone in its level; for ``$share/{group}/{filter}`` a non-empty group without
    ``+``, ``#`` or ``/`` and a non-empty valid filter."""
    if f.startswith(SHARE_PREFIX):
        group, sep, rest = f[len(SHARE_PREFIX):].partition("/")
        if not sep or not group or "+" in group or "#" in group:
            return False
        return _valid_plain_filter(rest)
    return _valid_plain_filter(f)


def parse_shared(f: str) -> tuple[str | None, str]:
    """``("group", "filter")`` for ``$share/group/filter``, else ``(None, f)``.
    Validate with ``valid_topic_filter`` first: a malformed share gives what it can."""
    if f.startswith(SHARE_PREFIX):
        group, _, rest = f[len(SHARE_PREFIX):].partition("/")
        return group, rest
    return None, f
