"""The broker: owner of the sessions, the subscription tree and the retained store.

It is the single place delivery decisions live: ``route()`` picks the sessions a message
reaches (plain subscriptions, overlapping ones combined, one member per shared group),
and each session's ``deliver()`` decides send / queue / drop. Time-based rules (session
expiry, delayed wills, queued message expiry) are deadline-ordered data checked from one
housekeeping task, not a timer per client (Mosquitto's session_expiry.c, will_delay.c).

``Broker`` knows nothing about sockets: connections are ``client`` objects with a small
interface (``write``, ``writable``, ``publish_frame``, ``kick``), see node/server.py.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time

from .auth import Authenticator
from .limits import ConnectionLimits, FlappingGuard
from .mqtt.codes import EXPIRY_NEVER, ReasonCode
from .mqtt.topic_rules import parse_shared
from .ownership import Claim, ClusterHooks, LocalCluster
from .persist import SessionJournal, resume_clocks
from .session.message import Message
from .session.record import (message_from_record, session_from_record, session_to_record,
                             unpack)
from .session.session import Counters, Session, SessionLimits, SessionState
from .topics import RetainedStore, SubEntry, SubscriptionTree

log = logging.getLogger("shoal.broker")

HOUSEKEEPING_PERIOD = 0.2  # seconds between checks of expiry and will deadlines

_EXPIRE, _WILL = 0, 1


class Broker:
    def __init__(self, config) -> None:
        self.config = config
        self.auth = Authenticator(config)  # who may connect (node/auth.py)
        self.admission = ConnectionLimits(config)  # how many connections (node/limits.py)
        self.flapping = FlappingGuard(config)  # ClientIDs that reconnect without end
        self.node_id = config.node_id
        self.cluster: ClusterHooks = LocalCluster(config.node_id)
        self.clustered = False
        self.sessions: dict[str, Session] = {}
        self.clients: set = set()  # live connections (server.MqttProtocol), CONNECTed or not
        self.tree = SubscriptionTree()
        self.retained = RetainedStore()
        self.counters = Counters()
        self.limits = SessionLimits(config.max_inflight, config.max_queue,
                                    config.queue_qos0_offline, config.max_queue_bytes)
        self.filter_refs: dict[str, int] = {}  # filter -> local subscriptions (cluster routes)
        self.route_waits: list = []  # route announcements not yet acknowledged (cluster)
        self._all_done_last = None  # (futures, combined): all_done()'s last answer
        self.journal: SessionJournal | None = None  # once attach_store() ran
        self.store_report = None  # what recovery found when the store opened
        self.started_at = time.time()
        # True once serve() opened the listeners, False again when it stops (GET /readyz)
        self.listening = False
        # heap of (monotonic deadline, seq, kind, client_id, timer_gen): sessions keep
        # wall-clock deadlines (stored, so time spent down counts), but a step of the
        # wall clock while running must not fire a will or an expiry early
        self._timers: list = []
        self._seq = itertools.count()
        self._housekeeping: asyncio.Task | None = None
        # a topic shorter than this has neither max_topic_levels levels nor
        # max_topic_length bytes (UTF-8: at most 4 per character): on_publish's one test
        self.topic_check_len = min(config.max_topic_levels, config.max_topic_length // 4 + 1)
        self.acl = None
        self._apply_acl()

    # -- who may do what (node/auth.py, node/acl.py) ---------------------------------------

    def _apply_acl(self) -> None:
        acl = self.acl = self.auth.acl  # (the publish path reads it here: one attribute)
        self.limits.read_check = self._may_read if acl is not None and acl.has_deny else None

    def _may_read(self, session: Session, topic: str) -> bool:
        if self.auth.acl.rights_of(session).may_read(topic):
            return True
        self.counters.deliveries_refused += 1
        return False

    def reload_auth(self) -> dict:
        """Reread the password and ACL files (ConfigError: the old ones stay). The
        subscriptions of this node's sessions that the new rules no longer allow are
        removed. Returns what is loaded and what was removed."""
        loaded = self.auth.reload()
        self._apply_acl()
        removed = 0
        acl = self.auth.acl
        if acl is not None:
            for session in list(self.sessions.values()):
                rights = acl.rights_of(session)
                denied = [f for f in session.subscriptions
                          if not rights.may_subscribe(parse_shared(f)[1])]
                for topic_filter in denied:
                    self.unsubscribe(session, topic_filter)
                if denied:
                    removed += len(denied)
                    self.persist(session)
            if removed:
                log.warning("acl reload removed subscriptions node=%s count=%d",
                            self.node_id, removed)
        loaded["subscriptions_removed"] = removed
        return loaded

    # -- lifecycle -----------------------------------------------------------------------

    def attach_store(self, store, loaded, report=None) -> None:
        """Keep persistent sessions and retained messages in ``store`` and take back what
        it had (before the listeners open): sessions OFFLINE with their subscriptions,
        queues and inflight state; their expiry and will deadlines resume (time spent
        down counts), run by the first housekeeping pass."""
        journal = self.journal = SessionJournal(store)
        self.store_report = report
        for topic, blob in loaded.retained.items():
            self.retained.set(topic, message_from_record(unpack(blob)))
        now = time.time()
        restored = journal.restore(loaded, self.limits, self.counters, now)
        for session, subs in restored:
            self.sessions[session.client_id] = session
            for sub in subs:
                entry = SubEntry(session.client_id, *sub)
                self.subscribe(session, entry, _filter_levels(entry))
            resume_clocks(session, now)
            if session.will_at is not None:
                self._add_timer(session.will_at, _WILL, session)
            if session.expires_at is not None:
                self._add_timer(session.expires_at, _EXPIRE, session)
            journal.meta(session)  # the resumed deadlines, in case of another crash
        self.take_route_waits()
        if restored:
            log.info("sessions restored node=%s sessions=%d queued=%d inflight=%d",
                     self.node_id, len(restored), sum(len(s.queue) for s, _ in restored),
                     sum(len(s.inflight_out) for s, _ in restored))

    def persist(self, session: Session) -> None:
        """The session's expiry, will or subscriptions changed: store it if it is (still)
        persistent, delete it from the store if it no longer is."""
        journal = self.journal
        if journal is None or session.state is SessionState.ENDED:
            return
        if journal.wanted(session):
            if session.journal is None:
                journal.track(session)
            else:
                journal.meta(session)
        elif session.journal is not None:
            journal.forget(session)

    def keep_sessions(self, keep, why: str) -> int:
        """End (no will, no release) every session for whose ClientID ``keep`` says no:
        a restarted cluster node drops the copies another node took over while it was
        down. Returns how many ended."""
        gone = [s for cid, s in self.sessions.items() if not keep(cid)]
        for session in gone:
            self.end_session(session, why, release=False, will=False)
        return len(gone)

    def set_retained(self, topic: str, msg: Message | None) -> None:
        """The one way the retained store changes (local clients and other nodes)."""
        if msg is None:
            self.retained.delete(topic)
        else:
            self.retained.set(topic, msg)
        if self.journal is not None:
            self.journal.retained(topic, msg)

    def store_mark(self) -> int:
        """Where the store's changes are now: a packet handler takes it first and passes
        it to ``commit_wait()``."""
        journal = self.journal
        return 0 if journal is None else journal.writes

    def commit_wait(self, mark: int):
        """The store commit the current packet's acknowledgement waits for, or None when
        the packet changed nothing on disk since ``mark`` (the messages it queued for
        persistent sessions, a retained change, a QoS 2 packet id): group-committed with
        the loop's other writes."""
        journal = self.journal
        if journal is None or journal.writes == mark:
            return None
        return journal.commit_wait()

    def all_done(self, *waits):
        """One future for several (None entries skipped): done when all are, failed or
        cancelled as the first of them that is. Consecutive calls with the same futures
        share the result (one PUBACK queue entry per batch, not per message)."""
        waits = tuple(w for w in waits if w is not None)
        if len(waits) == 1:
            return waits[0]
        last = self._all_done_last
        if last is not None and last[0] == waits and not last[1].done():
            return last[1]
        fut = asyncio.get_running_loop().create_future()
        left = [len(waits)]

        def one_done(w) -> None:
            if fut.done():
                return
            if w.cancelled():
                fut.cancel()
            elif w.exception() is not None:
                fut.set_exception(w.exception())
            else:
                left[0] -= 1
                if not left[0]:
                    fut.set_result(None)
        for w in waits:
            w.add_done_callback(one_done)
        self._all_done_last = (waits, fut)
        return fut

    def durable_wait(self):
        """A future done once every store change made so far is durable, or None when
        nothing has to be waited for (no store, all durable, or the fast mode)."""
        journal = self.journal
        return None if journal is None else journal.commit_wait()

    def has_store(self) -> bool:
        return self.journal is not None

    def attach_replication(self, tap, tap_wait) -> None:
        """Give every change to a stored session to ``tap`` too (node/persist.py OPS), and
        let acknowledgements wait for ``tap_wait(local_commit)`` (the cluster's replicas)."""
        if self.journal is not None:
            self.journal.tap = tap
            self.journal.tap_wait = tap_wait

    def stored_changes(self, session: Session) -> list[tuple]:
        """A stored session's whole state as tap changes (seeding a new replica)."""
        return SessionJournal.changes_of(session)

    def attach_cluster(self, cluster: ClusterHooks) -> None:
        """Replace the single-node hooks (before the listeners open)."""
        self.cluster = cluster
        self.clustered = True

    def start(self) -> None:
        """Run what came due while the node was down (expired sessions, wills), before
        the first connection is handled, then the housekeeping task."""
        self.run_timers(time.monotonic())
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeeping_loop())

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            try:
                await self._housekeeping
            except asyncio.CancelledError:
                pass  # we cancelled it just above: that is how it ends

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_PERIOD)
            try:
                self.run_timers(time.monotonic())
            except Exception:  # a bug in one timer must not stop expiry for everyone
                log.exception("housekeeping failed node=%s", self.node_id)

    def run_timers(self, now: float) -> None:
        """Fire the timers due at ``now`` (``time.monotonic()``)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, client_id, gen, deadline = heapq.heappop(timers)
            session = self.sessions.get(client_id)
            if session is None or session.timer_gen != gen:
                continue  # the session attached, detached again or ended since
            # (and the deadline check: a session handed over and back is a new object)
            if kind == _WILL:
                if session.state is SessionState.OFFLINE and session.will_at is not None \
                        and session.will_at <= deadline:
                    self._publish_will(session)
                    self.persist(session)
            elif kind == _EXPIRE:
                if session.state is SessionState.OFFLINE and session.expires_at is not None \
                        and session.expires_at <= deadline:
                    self.end_session(session, "expired")

    def _add_timer(self, deadline: float, kind: int, session: Session) -> None:
        """A timer for the wall-clock ``deadline``, kept on the monotonic clock."""
        due = time.monotonic() + (deadline - time.time())
        heapq.heappush(self._timers, (due, next(self._seq), kind, session.client_id,
                                      session.timer_gen, deadline))

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, client_id: str, clean_start: bool, expiry_interval: int,
                     version: int, claim: Claim) -> tuple[Session, bool]:
        """The session a new connection of ``client_id`` gets: resumed, handed over from
        another node (``claim.record``) or new; returned with ``present``. The caller
        answers CONNACK, then ``session.attach()``es."""
        session = self.sessions.get(client_id)
        if session is not None and session.state is SessionState.OFFLINE \
                and session.expires_at is not None and session.expires_at <= time.time():
            self.end_session(session, "expired", release=False)  # before housekeeping did
            session = None
        if session is not None and session.client is not None:
            # Takeover [MQTT-3.1.4-3]: the old connection goes, as if it had dropped
            # (its will follows the normal rules), then the new one attaches below.
            old = session.client
            self.connection_lost(old, session, send_will=True)
            old.kick(ReasonCode.SESSION_TAKEN_OVER)
            session = self.sessions.get(client_id)  # may have ended (expiry 0)
        if session is not None and (clean_start or claim.record is not None):
            self.end_session(session, "clean start" if clean_start else "replaced by handover",
                             release=False)
            session = None
        if claim.record is not None and not clean_start:
            session = self.install_session(claim.record)
        if session is not None and session.state is SessionState.FROZEN:
            self.unfreeze(session, "claimed back by this node")
        present = session is not None
        if session is None:
            session = Session(client_id, self.limits, self.counters)
            self.sessions[client_id] = session
        else:
            # a reconnect cancels a will still waiting for its delay [MQTT-3.1.3-9]
            session.will = None
            session.will_at = None
        session.epoch = claim.epoch
        session.expiry_interval = expiry_interval
        session.version = version
        if claim.opened is not None:
            claim.opened(session)
        return session, present

    def install_session(self, record: dict) -> Session:
        """Add a session from its record (a takeover snapshot or the store): OFFLINE,
        its subscriptions in the tree."""
        session, subs = session_from_record(record, self.limits, self.counters)
        old = self.sessions.get(session.client_id)
        if old is not None:
            self.end_session(old, "replaced by an installed record", release=False)
        self.sessions[session.client_id] = session
        for sub in subs:
            entry = SubEntry(session.client_id, *sub)
            self.subscribe(session, entry, _filter_levels(entry))
        # no client waits on these routes: the hand-over's barriers order the switch
        self.take_route_waits()
        return session

    def adopt_session(self, claim: Claim) -> Session:
        """A session handed over without its client (its node is leaving the cluster):
        installed OFFLINE from ``claim.record`` as it was there, stored, its expiry and
        will deadlines running here now (wall-clock: the time it spent there counts)."""
        session = self.install_session(claim.record)
        session.epoch = claim.epoch
        if claim.opened is not None:
            claim.opened(session)
        resume_clocks(session, time.time())
        if session.will_at is not None:
            self._add_timer(session.will_at, _WILL, session)
        if session.expires_at is not None:
            self._add_timer(session.expires_at, _EXPIRE, session)
        self.persist(session)
        return session

    async def confirm_claim(self, claim: Claim, session: Session) -> bool | None:
        """Wait (bounded) for a hand-over claim's verdict on the session opened for it:
        True: confirmed; False: a newer claim overtook it (the session is ended here);
        None: not decided in time (the session stays: the move may still commit)."""
        try:
            verdict = await asyncio.wait_for(claim.confirm(session),
                                             2 * self.config.takeover_timeout + 10.0)
        except asyncio.TimeoutError:
            return None
        if verdict is False and session.state is not SessionState.ENDED:
            # (the cluster may have dropped the copy already, as stale, while it waited)
            self.end_session(session, "a newer claim overtook its hand-over", release=False,
                             will=False)
        return verdict

    def snapshot(self, session: Session) -> dict:
        return session_to_record(session)

    def freeze_session(self, client_id: str, why: str) -> Session | None:
        """Another node claimed ``client_id``: close its connection here (v5 DISCONNECT
        0x8E; the will follows the normal rules, so a resume elsewhere cancels a delayed
        one), then keep the session FROZEN: no delivery, messages still append."""
        session = self.sessions.get(client_id)
        if session is None:
            return None
        if session.client is not None:
            old = session.client
            self.connection_lost(old, session, send_will=True)
            old.kick(ReasonCode.SESSION_TAKEN_OVER)
            session = self.sessions.get(client_id)
            if session is None:
                return None  # it ended with its connection (expiry 0)
        if session.state is SessionState.OFFLINE:
            session.freeze(why)
        return session

    def connection_lost(self, client, session: Session | None, send_will: bool) -> None:
        """A connection ended (DISCONNECT, error, keep-alive, close, takeover)."""
        self.clients.discard(client)
        if session is None or session.client is not client:
            return
        session.detach("connection closed")
        self._disconnected(session, send_will)

    def _disconnected(self, session: Session, send_will: bool) -> None:
        """Will and expiry rules once a session has no connection."""
        now = time.time()
        if send_will and session.will is not None:
            delay = min(session.will_delay, session.expiry_interval)
            if delay <= 0:
                self._publish_will(session)
            else:
                session.will_at = now + delay
                self._add_timer(session.will_at, _WILL, session)
        else:
            session.will = None
        if session.expiry_interval == 0:
            self.end_session(session, "session expiry 0")
            return
        if session.expiry_interval != EXPIRY_NEVER:
            session.expires_at = now + session.expiry_interval
            self._add_timer(session.expires_at, _EXPIRE, session)
        self.persist(session)

    def unfreeze(self, session: Session, why: str) -> None:
        """A frozen session stays here after all: offline again, its timers running."""
        session.unfreeze(why)
        now = time.time()
        if session.will_at is not None:
            self._add_timer(session.will_at, _WILL, session)
        if session.expiry_interval != EXPIRY_NEVER:
            session.expires_at = now + session.expiry_interval
            self._add_timer(session.expires_at, _EXPIRE, session)
        self.persist(session)

    def kick_all(self, reason: int, send_will: bool) -> None:
        """Close every connection (shutdown, leaving the cluster)."""
        for client in list(self.clients):
            if client.session is not None:
                self.connection_lost(client, client.session, send_will)
            client.kick(reason)

    def kick(self, client_id: str, reason: int = ReasonCode.ADMINISTRATIVE_ACTION) -> bool:
        """An operator closes ``client_id``'s connection on this node (v5 DISCONNECT
        ``reason``, 3.1.1 just closed); its session stays, with the usual will and expiry
        rules (the will is published: the client did not DISCONNECT). False when the
        ClientID has no connection here."""
        session = self.sessions.get(client_id)
        client = session.client if session is not None else None
        if client is None:
            return False
        self.connection_lost(client, session, send_will=True)
        client.kick(reason)
        return True

    def not_ready_reason(self) -> str | None:
        """Why the node should not get new clients now (GET /readyz), or None."""
        if not self.listening:
            return "starting or stopping: the MQTT listeners are not open"
        return self.cluster.not_ready_reason()

    def orphaned(self, session: Session) -> None:
        """A session opened for a connection that was already gone: as if it dropped."""
        self._disconnected(session, send_will=True)

    def end_session(self, session: Session, why: str, release: bool = True,
                    will: bool = True) -> None:
        """Discard a session. ``release``: tell the cluster the ClientID is free (not when
        a new session of the same ClientID replaces it, or it moved to another node);
        ``will``: publish a will still waiting for its delay (not when it moved)."""
        if will and session.will_at is not None:
            self._publish_will(session)  # at the latest when the session ends [MQTT-3.1.3-9]
        for entry in list(session.subscriptions.values()):
            self.unsubscribe(session, entry.topic_filter)
        session.end(why)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if release:
            self.cluster.session_ended(session.client_id, session.epoch)
        log.debug("session ended client_id=%s node=%s why=%s", session.client_id,
                  self.node_id, why)

    def _publish_will(self, session: Session) -> None:
        will = session.will
        session.will = None
        session.will_at = None
        if will is None:
            return
        self.publish(Message.from_will(will, session.client_id))

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, session: Session, entry: SubEntry, filter_levels: str) -> bool:
        """Add or replace one subscription; True when the filter was not subscribed."""
        old = session.subscriptions.get(entry.topic_filter)
        session.subscriptions[entry.topic_filter] = entry
        new = self.tree.add(filter_levels, entry)
        if old is None:
            self._ref(entry.topic_filter, 1)
        return new and old is None

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        entry = session.subscriptions.pop(topic_filter, None)
        if entry is None:
            return False
        self.tree.remove(_filter_levels(entry), session.client_id, entry.share_group)
        self._ref(topic_filter, -1)
        return True

    def _ref(self, topic_filter: str, delta: int) -> None:
        """Count local subscriptions per filter; the cluster hears only of 0 <-> 1."""
        refs = self.filter_refs
        n = refs.get(topic_filter, 0) + delta
        if n > 0:
            refs[topic_filter] = n
            if n == 1 and delta > 0:
                wait = self.cluster.routes_changed([topic_filter], [])
                if wait is not None:
                    self.route_waits.append(wait)
        else:
            refs.pop(topic_filter, None)
            self.cluster.routes_changed([], [topic_filter])

    def take_route_waits(self) -> list:
        waits, self.route_waits = self.route_waits, []
        return waits

    def send_retained(self, session: Session, entry: SubEntry, filter_levels: str) -> None:
        now = time.time()
        sub_ids = (entry.sub_id,) if entry.sub_id else None
        for msg in list(self.retained.matching(filter_levels)):
            if msg.expires_at is not None and now >= msg.expires_at:
                self.set_retained(msg.topic, None)
                continue
            qos = msg.qos if msg.qos < entry.qos else entry.qos
            session.deliver(msg, qos, True, sub_ids)  # retained: RETAIN=1 [MQTT-3.3.1-8]

    # -- publishing ----------------------------------------------------------------------

    def publish(self, msg: Message) -> int:
        """A message from a local client (or a will): store a retained one, route it here
        and to the other nodes; returns how many sessions and nodes it reached. What it
        wrote to the store is durable once ``commit_wait(mark)`` is."""
        if msg.retain:
            # an empty retained payload clears the topic
            self.set_retained(msg.topic, msg if msg.payload else None)
            if self.clustered:
                self.cluster.retained_changed(msg.topic, msg if msg.payload else None)
        return self.route(msg)

    def route(self, msg: Message) -> int:
        match = self.tree.match(msg.topic)
        entries = match.entries
        if match.groups or len(entries) != 1:
            n, handled = self._route_general(msg, match, True, None)
        else:
            n, handled = self._deliver_one(msg, entries[0]), ()
        if self.clustered:
            n += self.cluster.forward(msg, handled)
        return n

    def route_remote(self, msg: Message, normal: bool, groups, only=None) -> int:
        """A message another node forwarded: deliver to the plain subscriptions here when
        ``normal``, and to one member of each shared group named in ``groups``. ``only``
        (a set of ClientIDs): deliver to those sessions alone, no shared group (a message
        sent again after its first receiver died, for the sessions taken over from it)."""
        match = self.tree.match(msg.topic)
        if only is not None:
            entries = [e for e in match.entries if e.client_id in only]
            return self._route_general(msg, _Only(entries), True, ())[0] if entries else 0
        if normal and not match.groups and len(match.entries) == 1:
            return self._deliver_one(msg, match.entries[0])
        return self._route_general(msg, match, normal, groups)[0]

    def _deliver_one(self, msg: Message, e: SubEntry) -> int:
        if e.no_local and e.client_id == msg.origin:
            return 0
        session = self.sessions.get(e.client_id)
        if session is None:
            return 0
        qos = e.qos if e.qos < msg.qos else msg.qos
        session.deliver(msg, qos, msg.retain and e.retain_as_published,
                        (e.sub_id,) if e.sub_id else None)
        return 1

    def _route_general(self, msg: Message, match, normal: bool, groups) -> tuple[int, tuple]:
        # Overlapping subscriptions of one client become one delivery with the highest
        # QoS and every subscription identifier [MQTT-3.3.4-2..5].
        n = 0
        sessions = self.sessions
        if normal:
            per_client: dict[str, list] = {}
            origin = msg.origin
            for e in match.entries:
                if e.no_local and e.client_id == origin:
                    continue
                acc = per_client.get(e.client_id)
                if acc is None:
                    per_client[e.client_id] = [e.qos, e.retain_as_published,
                                               [e.sub_id] if e.sub_id else None]
                else:
                    if e.qos > acc[0]:
                        acc[0] = e.qos
                    acc[1] = acc[1] or e.retain_as_published
                    if e.sub_id:
                        if acc[2] is None:
                            acc[2] = [e.sub_id]
                        else:
                            acc[2].append(e.sub_id)
            for client_id, (sub_qos, rap, sub_ids) in per_client.items():
                session = sessions.get(client_id)
                if session is None:
                    continue
                session.deliver(msg, sub_qos if sub_qos < msg.qos else msg.qos,
                                msg.retain and rap, tuple(sub_ids) if sub_ids else None)
                n += 1
        handled = []
        for group in match.groups:
            if groups is not None and group.key not in groups:
                continue
            e = self._pick_member(group)
            if e is None:
                continue
            session = sessions[e.client_id]
            session.deliver(msg, e.qos if e.qos < msg.qos else msg.qos,
                            msg.retain and e.retain_as_published,
                            (e.sub_id,) if e.sub_id else None)
            handled.append(group.key)
            n += 1
        return n, handled

    def _pick_member(self, group) -> SubEntry | None:
        """Round robin over the group, preferring members that can take a message now."""
        members = list(group.members.values())
        count = len(members)
        if not count:
            return None
        start = group.next % count
        group.next = start + 1
        sessions = self.sessions
        for i in range(count):
            e = members[(start + i) % count]
            s = sessions.get(e.client_id)
            if s is not None and s.client is not None and s.client.writable \
                    and len(s.inflight_out) < s.window:
                group.next = (start + i) % count + 1
                return e
        return members[start]

    # -- views -----------------------------------------------------------------------------

    def stats(self) -> dict:
        connected = sum(1 for s in self.sessions.values() if s.client is not None)
        d = {
            "node_id": self.node_id,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "connections": len(self.clients),
            "sessions": len(self.sessions),
            "sessions_connected": connected,
            "subscriptions": self.tree.count,
            "retained": len(self.retained),
            "queued_messages": sum(len(s.queue) for s in self.sessions.values()),
            "inflight_messages": sum(len(s.inflight_out) for s in self.sessions.values()),
        }
        d.update(self.counters.as_dict())
        if self.journal is not None:
            d["store"] = store = self.journal.store.stats()
            r = self.store_report
            if r is not None:
                store["recovery"] = {"records_read": r.records_read,
                                     "records_skipped": r.records_skipped,
                                     "bytes_truncated": r.bytes_truncated,
                                     "problems": list(r.problems), "notes": list(r.notes)}
        return d


def _filter_levels(entry: SubEntry) -> str:
    """The filter as the tree stores it: without the ``$share/<group>/`` prefix."""
    if entry.share_group is None:
        return entry.topic_filter
    return entry.topic_filter.split("/", 2)[2]


class _Only:
    """A topic match narrowed to some sessions' plain subscriptions (route_remote)."""

    __slots__ = ("entries", "groups")

    def __init__(self, entries) -> None:
        self.entries = entries
        self.groups = ()
