"""Who owns a ClientID: the one seam between the broker core and the cluster.

``node`` never imports ``cluster``. The broker asks an ``Ownership`` object; a single node
uses ``LocalOwnership``, which owns everything and counts epochs; the cluster (issue 3)
supplies an implementation backed by the Raft routing table.
"""

from __future__ import annotations

from typing import Protocol


class Ownership(Protocol):
    node_id: str

    def claim_local(self, client_id: str) -> int:
        """Record that this node now owns ``client_id``; returns the new epoch."""

    def release_local(self, client_id: str) -> None:
        """The session of ``client_id`` ended on this node."""

    def owner_of(self, client_id: str) -> str | None:
        """The node that owns ``client_id``, or None."""


class LocalOwnership:
    """Single node: every ClientID is ours; the epoch still increases per claim so that
    code written against it behaves like it will in a cluster."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._epochs: dict[str, int] = {}
        self._counter = 0

    def claim_local(self, client_id: str) -> int:
        self._counter += 1
        self._epochs[client_id] = self._counter
        return self._counter

    def release_local(self, client_id: str) -> None:
        self._epochs.pop(client_id, None)

    def owner_of(self, client_id: str) -> str | None:
        return self.node_id if client_id in self._epochs else None
