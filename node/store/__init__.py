"""Durable session store: what a persistent session needs to survive a crash of its node.

    store = SessionStore(config.data_dir, durability="safe")
    loaded, report = store.open()          # sessions, retained; what recovery found
    ref = store.message_ref(record)        # a body, stored once for every session
    store.put_message(cid, key, entry, ref)
    await store.commit()                   # durable now (safe mode): PUBACK may go out

Engine: an append-only log of CRC-framed msgpack records with group commit and
compaction into snapshots (``engine.py``), chosen over SQLite in WAL mode by
measurement (``bench/store_bench.py``). Format: ``format.py``; recovery rules:
``recovery.py``; durability modes: ``engine.py``.
"""

from .engine import DURABILITY_MODES, SessionStore, StoreError
from .recovery import RecoveryReport
from .state import LoadedState, MessageRef, SessionData, StoredMessage

__all__ = ["DURABILITY_MODES", "LoadedState", "MessageRef", "RecoveryReport", "SessionData",
           "SessionStore", "StoreError", "StoredMessage"]
