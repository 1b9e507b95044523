"""What a session carries of its hand-overs, owned by the cluster, stored with it.

The broker keeps one opaque field per session, ``Session.handover`` (a plain dict or
None), writes it into the session's stored record and reads it back at a restart; only
this module gives it a shape:

* ``handed``: this copy was handed over (to node ``to``, at ``epoch``, the ``members``
  then being the nodes whose barriers it waits for); the queued messages from store key
  ``first`` on arrived after the snapshot ("late"), the new holder may lack them. Set on
  the holding side, never sent to the receiver.
* ``late_seen``: per old holder, the late messages already taken (its epoch and their
  store keys there), so that a batch sent again after a restart adds nothing twice. Sent
  with the session.
* ``relayed``: messages of an earlier hand-over that reached this copy after it was
  handed on, and went on to the new holder (``relay``): their store key here -> the epoch
  and store key that name them where they came from, so that a restart resends them under
  that name (the new holder skips those it has). Never sent.
* ``taking``: this node is taking the session over from ``holder`` at ``epoch`` and its
  gate is up: the nodes whose barrier (``pending``) and whose late batch from the old
  holder (``awaiting``) have not arrived. A restart rebuilds the gate from it. Never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Handed", "Taking", "HandoverMark"]


@dataclass(frozen=True)
class Handed:
    to: str
    epoch: int
    first: int  # the store key from which queued messages are late
    members: tuple[str, ...] = ()  # whose barriers the hand-over waited for


@dataclass(frozen=True)
class Taking:
    holder: str
    epoch: int
    pending: tuple[str, ...]
    awaiting: tuple[str, ...]


@dataclass
class HandoverMark:
    handed: Handed | None = None
    late_seen: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    taking: Taking | None = None
    relayed: dict[int, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, session) -> "HandoverMark":
        raw = session.handover
        if not raw:
            return cls()
        handed = raw.get("handed")
        taking = raw.get("taking")
        return cls(
            None if handed is None else Handed(str(handed[0]), int(handed[1]), int(handed[2]),
                                               tuple(handed[3]) if len(handed) > 3 else ()),
            {str(node): (int(epoch), [int(k) for k in keys])
             for node, (epoch, keys) in (raw.get("late_seen") or {}).items()},
            None if taking is None else Taking(str(taking[0]), int(taking[1]),
                                               tuple(taking[2]), tuple(taking[3])),
            {int(k): (int(e), int(o)) for k, e, o in raw.get("relayed") or ()})

    def save(self, session) -> None:
        """Into the session (the caller stores it: ``broker.persist``)."""
        raw = {}
        if self.handed is not None:
            h = self.handed
            raw["handed"] = [h.to, h.epoch, h.first, sorted(h.members)]
        if self.late_seen:
            raw["late_seen"] = {node: [epoch, list(keys)]
                                for node, (epoch, keys) in self.late_seen.items()}
        if self.taking is not None:
            t = self.taking
            raw["taking"] = [t.holder, t.epoch, sorted(t.pending), sorted(t.awaiting)]
        if self.relayed:
            raw["relayed"] = [[k, e, o] for k, (e, o) in sorted(self.relayed.items())]
        session.handover = raw or None

    @staticmethod
    def for_receiver(raw: dict | None) -> dict | None:
        """The part of a stored mark a session's snapshot carries to its next holder."""
        if not raw or not raw.get("late_seen"):
            return None
        return {"late_seen": raw["late_seen"]}
