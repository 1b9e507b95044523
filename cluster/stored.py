"""This node's cluster membership on disk: ``<data_dir>/cluster.json``.

The Raft log itself lives in memory (pysyncobj's journal is not fsynced, and the routing
table is rebuilt from the nodes' stores after a whole-cluster restart), but what a node
needs to find its cluster again is kept here, written atomically (temporary file, fsync,
rename, fsync of the directory) whenever it changes:

    {"v": 1, "cluster": name, "cluster_id": id, "node_id": id, "raft": own Raft address,
     "voters": [Raft addresses], "members": {node_id: {"transport": a, "raft": a}},
     "left": bool, "saved_at": unix time}

A node with this file rejoins through the stored members at start (no ``--join``
needed) and never founds a new cluster; ``left`` says it left on purpose (``shoal cluster
leave``): it joins again as a new member. ``shoal cluster reset`` (or ``--new-cluster``)
drops the file.
"""

from __future__ import annotations

import json
import os
import time

FILE = "cluster.json"
VERSION = 1


class StoredStateError(Exception):
    """The file exists but cannot be used; the message says what to do."""


class StoredMembership:
    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, FILE)

    def load(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(raw)
            if not isinstance(state, dict) or state.get("v") != VERSION:
                raise ValueError(f"unknown format version {state.get('v')!r}")
            for key, kind in (("cluster", str), ("node_id", str), ("voters", list),
                              ("members", dict), ("left", bool)):
                if not isinstance(state.get(key), kind):
                    raise ValueError(f"{key!r} missing or not a {kind.__name__}")
        except (ValueError, AttributeError) as err:
            raise StoredStateError(
                f"{self.path} is damaged ({err}); if this node's cluster still runs, remove "
                "the file (`shoal cluster reset --data-dir ...`) and start the node with "
                "--join naming a member") from None
        return state

    def save(self, state: dict) -> None:
        """Replace the file atomically (blocking: call it in a thread)."""
        state = dict(state, v=VERSION, saved_at=time.time())
        os.makedirs(self.data_dir, exist_ok=True)
        tmp = self.path + ".tmp"
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove(self) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def describe(state: dict) -> str:
    """One line for logs and ``shoal cluster reset``: what the file holds."""
    members = ", ".join(sorted(state.get("members", {}))) or "none"
    return (f"cluster {state.get('cluster')!r} (id {state.get('cluster_id') or '?'}), "
            f"node {state.get('node_id')}, {len(state.get('voters', []))} Raft voters, "
            f"members: {members}{' (this node left it)' if state.get('left') else ''}")
