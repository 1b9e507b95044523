"""Failpoints: named places where the node can be made to pause, for the tests that need
a crash at one exact step of a protocol (etcd's gofail and TiKV's fail-rs do the same).

They are set for the whole process by the environment variable ``SHOAL_FAILPOINTS``,
read once at start: ``name=seconds[,name=seconds...]``. Unset (always, outside tests)
a failpoint costs one dict lookup. A failpoint only pauses; it never changes a result.

Failpoints:

* ``takeover.before_moved``: the new holder of a session, once the handed-over copy is
  on its disk, before it asks Raft to commit the move.
* ``takeover.before_late``: the old holder, before it hands the messages that reached
  it after the snapshot ("late") to the new holder.
* ``takeover.after_late``: the old holder, once the new holder answered that it stored
  them, before the old holder deletes its copy.
"""

from __future__ import annotations

import asyncio
import logging
import os

ENV = "SHOAL_FAILPOINTS"
NAMES = ("takeover.before_moved", "takeover.before_late", "takeover.after_late")

log = logging.getLogger("shoal.failpoints")


def parse(text: str) -> dict[str, float]:
    """``name=seconds,...`` -> {name: seconds}; ValueError names what is wrong."""
    points: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in NAMES:
            raise ValueError(f"{ENV}: {part!r} is not NAME=SECONDS with NAME one of "
                             + ", ".join(NAMES))
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{ENV}: {part!r}: {value.strip()!r} is not a number of "
                             "seconds") from None
        if not 0 <= seconds <= 3600:
            raise ValueError(f"{ENV}: {part!r}: seconds must be within 0-3600")
        points[name] = seconds
    return points


POINTS = parse(os.environ.get(ENV, ""))


async def pause(name: str) -> None:
    """Sleep for as long as failpoint ``name`` says (not at all when it is not set)."""
    seconds = POINTS.get(name)
    if seconds:
        log.warning("failpoint %s: pausing %.1f s", name, seconds)
        await asyncio.sleep(seconds)
