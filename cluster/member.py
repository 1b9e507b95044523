"""``ClusterMember``: this node's part in the cluster, and the broker's ``ClusterHooks``.

It owns the Raft node (routing table), the node-to-node transport, the node-level route
trie used to forward PUBLISHes, the retained-message replication, the join / leave
protocol, the peer stats shown by ``GET /api/v1/cluster``, and the takeovers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time

from node.ownership import Claim, ConnectRefused
from node.persist import STORE_COMMIT_TIMEOUT
from node.mqtt.codes import ReasonCode
from node.mqtt.topic_rules import parse_shared
from node.session.record import message_from_record, message_to_record
from node.session.session import SessionState
from node.topics import SubEntry, SubscriptionTree

from .discovery import MdnsDiscovery
from .membership import Membership
from .messages import (KINDS, Adopt, Barrier, LateBatch, MalformedMessage, SnapChunk,
                       SnapshotRequest, Switched, decode)
from .replication import Replication
from .routing import (Claimed, Event, Forgotten, MemberChanged, Moved, NodeDown, RaftNode,
                      RaftUnavailable, Released, Replaced, RoutesChanged, RoutingView,
                      clear_raft_files)
from .takeover import Takeovers
from .transport import PeerUnreachable, RemoteError, RequestTimeout, Transport
from .wire import pack_forward, unpack_forward

log = logging.getLogger("shoal.cluster")

FORWARD_BATCH = 1000    # forwarded messages per node-to-node message at most
STATS_PERIOD = 1.0      # seconds between stats gossip to peers
RECONCILE_PERIOD = 1.0  # seconds between route reconciliations
DOWN_AFTER = 2.0        # a peer silent this long (no link) is shown down
REDO_REFUSED = object()  # _redo_here: a re-sent forward this node cannot take
LINK_LINGER = 2.0       # seconds the link to a removed node stays (answers in flight)


class ClusterError(Exception):
    """The node cannot take part in the cluster; the message says what to do."""


class ClusterMember:
    def __init__(self, broker, config) -> None:
        if not config.cluster_secret:
            raise ClusterError("cluster_port is set but cluster_secret is empty: give every "
                               "node the same --cluster-secret (or SHOAL_CLUSTER_SECRET)")
        self.broker = broker
        self.config = config
        self.node_id = config.node_id
        self.loop = asyncio.get_running_loop()
        self.view = RoutingView()
        self.view.listeners.append(self._on_event)
        self._event_handlers = self._event_table()
        self.remote = SubscriptionTree()  # entries keyed by node id: where filters are
        self.raft: RaftNode | None = None
        host = config.advertise_host or config.host
        self.host = host
        self.raft_port = config.raft_port or config.cluster_port + 1
        self.info = {
            "transport": f"{host}:{config.cluster_port}",
            "raft": f"{host}:{self.raft_port}",
            "mqtt": f"{host}:{config.mqtt_port}",
            "admin": f"{config.admin_host}:{config.admin_port}" if config.admin_port else "",
            "status": "up",
            "started_at": time.time(),
        }
        self.transport = Transport(
            self.node_id, config.cluster_name, config.cluster_secret.encode(), config.host,
            config.cluster_port, on_message=self._on_message, on_request=self._on_request,
            on_peer_up=self._on_peer_up, on_peer_down=self._on_peer_down,
            on_peer_restarted=self._on_peer_restarted,
            on_peer_process=lambda peer: self.takeovers.on_peer_process(peer))
        self.transport.info = self.info
        self.takeovers = Takeovers(self)
        self.replication = Replication(self)
        #: per sender, forwards that wait until this node has applied a promotion the
        #: sender routed them with (cluster/replication.py)
        self._waiting_forwards: dict[str, list] = {}
        self.view.after_apply.append(self._release_waiting_forwards)
        self._message_handlers, self._request_handlers = self._handler_tables()
        self.snapshot_chunks: dict[tuple, dict] = {}
        self.peer_stats: dict[str, dict] = {}
        self.peer_down_since: dict[str, float] = {}
        self.retained_ts: dict[str, float] = {}
        self.discovery: MdnsDiscovery | None = None
        self._tasks: list[asyncio.Task] = []
        self._group_cursor = 0
        self.forwarded = 0
        self.forward_dropped = 0  # QoS 0 messages dropped at a full node-to-node queue
        self.forward_stale = 0  # forwards meant for a previous process of this node
        self._dropping_to: set[str] = set()
        #: node -> [[wire blobs...], must_arrive, confirm, table position when routed]
        self._outbox: dict[str, list] = {}
        # forward confirmations (durability safe): a batch holding QoS 1/2 messages asks
        # its receiver to answer once what it stored for them is durable
        self.confirm_forwards = config.durability == "safe"
        self._forward_waits: list = []  # confirmation futures since take_forward_waits()
        self._held_into: list | None = None  # held-message waits of the batch being routed
        self.forward_position: int | None = None  # its sender's table position, if known
        self._confirms: dict[int, tuple] = {}  # id -> (node, future, sent at)
        #: node -> the position of the ``down`` whose forwards were sent again (once)
        self._redone: dict[str, int] = {}
        #: the position of the latest ``down`` of this node applied here: a forward routed
        #: with an older table may be for a session promoted away from here meanwhile
        self._fenced_at: int | None = None
        # confirmation ids unique to this process: a confirmation its previous process
        # was owed can still arrive (sent to it, never written) and must match nothing
        self._confirm_ids = itertools.count(secrets.randbits(40) << 20)
        self._outbox_scheduled = False
        self.received = 0
        self.leader_changes = 0
        self._last_leader = None
        self.leaving = False
        self.ready = False  # a member of the routing table, serving
        # the view has applied every entry committed before this node started serving (a
        # restarted node replays the log first: its claims are history, not news)
        self.caught_up = False
        #: stored sessions a restart could not judge yet (no quorum): GET /api/v1/cluster
        self.unjudged = 0
        self.membership = Membership(self)
        self._raft_port_hold: socket.socket | None = None

    def _event_table(self) -> dict:
        """The routing table's events, by type (cluster/routing.py)."""
        return {
            RoutesChanged: self._on_routes, Claimed: self._on_claimed,
            Released: self._on_released, Moved: self._on_moved, MemberChanged: self._on_member,
            Forgotten: self._on_forgotten, Replaced: self._on_replaced,
            NodeDown: self._on_node_down,
        }

    def _handler_tables(self) -> tuple[dict, dict]:
        """Node-to-node messages and requests, by wire kind (the hand-over's are typed:
        cluster/messages.py, decoded before their handler runs)."""
        t = self.takeovers
        messages = {
            "pubs": self._on_pubs, "pubc": self._on_pubc, "pubc_ok": self._on_pubc_ok,
            Barrier.kind: t.on_barrier,
            Switched.kind: lambda peer, sw: t.on_peer_switched(peer, sw.moves, sw.moved_from,
                                                               sw.position),
            SnapChunk.kind: self._on_snap_chunk,
            "ret": lambda peer, body: self._apply_retained(*body), "stats": self._on_stats,
            "repl": self.replication.on_repl,
            "repl_ok": self.replication.on_ack, "pubr": self._on_pubr,
            "pubc_no": self._on_pubc_no,
        }
        requests = {
            SnapshotRequest.kind: t.on_snapshot_request, LateBatch.kind: t.on_late,
            Adopt.kind: self._on_adopt, "cluster_info": self._on_cluster_info,
            "join": lambda peer, body: self._on_membership("join", body),
            "remove_member": lambda peer, body: self._on_membership("remove_member", body),
            "forget": lambda peer, body: self._on_membership("forget", body),
            "retained_dump": self._on_retained_dump, "kick": self._on_kick,
        }
        return messages, requests

    # -- start / stop ------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        # before any link: they wait for what peers send
        self.takeovers.restore_gates()
        self.takeovers.restore_handed()
        self.replication.open()
        self._reserve_raft_port()
        await self.transport.start()
        if config.discovery == "mdns":
            self.discovery = MdnsDiscovery(config.cluster_name, self.node_id, self.host,
                                           config.cluster_port,
                                           interfaces=[config.host] if config.host not in (
                                               "0.0.0.0", "::", "") else None)
            try:
                await self.discovery.start()
            except (RuntimeError, ValueError) as err:  # duplicate node id, bad address
                raise ClusterError(f"mDNS discovery cannot start: {err}") from err
        await self.membership.start()
        self.ready = True
        if self.discovery is not None:
            self.discovery.update_properties({"formed": "1"})
        await self._judge_stored_sessions()
        self.replication.adopt_promoted()
        self._release_waiting_forwards()
        self.broker.attach_cluster(self)
        self._tasks.append(self.loop.create_task(self._gossip_loop()))
        self._tasks.append(self.loop.create_task(self._reconcile_loop()))
        self.replication.start()
        log.info("cluster member up node=%s members=%s voters=%s leader=%s", self.node_id,
                 sorted(self.view.members), self.raft.voters(), self.raft.status()["leader"])

    async def _judge_stored_sessions(self) -> None:
        """Catch up with the table, then keep, claim or hand on the sessions the store
        brought back. A table that cannot be read yet (no quorum) keeps them as they are
        for now and judges them again once it can: a copy this node was handing over
        still has messages the new holder lacks."""
        restored = dict(self.broker.sessions)
        synced = await self._catch_up()
        await self._adopt_stored_sessions(synced)
        if not synced and restored:
            self.unjudged = len(restored)
            self._tasks.append(self.loop.create_task(self._judge_later(restored)))

    async def _judge_later(self, restored: dict) -> None:
        """Judge the stored sessions the start could not, once the table can be read:
        the copies nothing touched since (no connect, no hand-over). One being claimed
        right now is judged in a later round."""
        left = dict(restored)
        delay = 0.5
        while left:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                await self.raft.run(("sync",), 10.0)
            except RaftUnavailable:
                continue
            t = self.takeovers
            touched = {cid for cid, s in left.items()
                       if self.broker.sessions.get(cid) is not s
                       or not (s.state is SessionState.OFFLINE or t.restored_handed(cid))
                       or (cid in t.incoming and not t.incoming[cid].restored)}
            now = {cid for cid in left if cid not in touched and cid not in t.in_progress}
            if now:
                log.info("routing table caught up node=%s: judging %d stored sessions",
                         self.node_id, len(now))
                await self._adopt_stored_sessions(True, now)
            for cid in touched | now:
                del left[cid]
            self.unjudged = len(left)
            delay = 0.5

    async def _catch_up(self) -> bool:
        """A read barrier: wait until the view holds every entry committed before now (a
        joining node replays the log behind the leader). Until then the claims it applies
        are old news: they freeze nothing here, and the stored sessions are not judged by
        a holder the table no longer has."""
        try:
            await self.raft.run(("sync",), 20.0)
        except RaftUnavailable as err:
            log.warning("routing table not caught up node=%s: %s", self.node_id, err)
            return False
        finally:
            self.caught_up = True
        return True

    async def _adopt_stored_sessions(self, synced: bool, judged=None) -> None:
        """Sessions the store brought back (a restart): keep those the table says are held
        here; claim those it has no holder for (the whole cluster restarted: the table,
        kept in memory only, starts empty); drop the copies another node took over
        meanwhile (they live there now). Then announce the kept ones' routes. ``judged``:
        the ClientIDs to look at (default: every session here)."""
        broker, me = self.broker, self.node_id
        if not broker.sessions:
            return
        if not synced:
            log.warning("stored sessions kept as they are node=%s: the routing table could "
                        "not be read; they are judged once it can", me)
            return
        judged = set(broker.sessions) if judged is None else set(judged)
        holders = self.view.holders
        # a session being handed over right now (a claim that reached this node while it
        # started) ends with its hand-over, not here
        # a copy installed for a claim of this node that is still the current one: its
        # move may still commit (proposed before the restart, not applied yet)
        keep = {cid for cid in broker.sessions if cid not in judged
                or holders.get(cid) == me or cid in self.takeovers.outgoing
                or self.takeovers.claim_current(cid)}
        # promoted elsewhere from this node since this copy was held here (the node was
        # declared down while it restarted or was cut off, and is back before it saw
        # that): its hand-over is void, the copy is not the session
        promoted = self.view.promoted
        for cid in sorted(keep & judged):
            epoch = promoted.get(cid, {}).get(me)
            if epoch is not None and holders.get(cid) not in (None, me) and \
                    epoch > (broker.sessions[cid].epoch or 0):
                self.takeovers.abandon(cid, "promoted elsewhere while this node was away")
                keep.discard(cid)
        unheld = [cid for cid in sorted(judged) if holders.get(cid) is None]
        if unheld:
            # one Raft entry for all of them (ops submitted in one loop iteration batch)
            futs = [self.raft.submit(("claim", cid, me, False)) for cid in unheld]
            done, pending = await asyncio.wait(futs, timeout=20.0)
            failed = 0
            for cid, fut in zip(unheld, futs):
                if fut in pending or fut.exception() is not None:
                    keep.add(cid)  # never drop data for want of a quorum: claimed at connect
                    failed += 1
                    continue
                epoch, holder = fut.result()
                if holder is None or holder == me:
                    keep.add(cid)
                    broker.sessions[cid].epoch = epoch
            log.info("stored sessions claimed node=%s count=%d not_committed=%d", me,
                     len(unheld) - failed, failed)
        # a copy this node was handing over when it went down (its hand-over resumed at
        # the start) whose move never committed is the session again
        for cid in sorted(judged):
            self.takeovers.judged(cid, holders.get(cid))
        dropped = broker.keep_sessions(lambda cid: cid in keep,
                                       "held by another node since this one went down")
        self.takeovers.forget_gates()
        if dropped:
            log.info("stored sessions taken over while down, dropped node=%s count=%d",
                     me, dropped)
        if broker.filter_refs:
            try:
                await self.raft.run(("routes", me, sorted(broker.filter_refs), []), 10.0)
            except RaftUnavailable as err:
                log.warning("routes of the stored sessions not announced yet node=%s: %s "
                            "(the reconciliation retries)", me, err)

    def _reserve_raft_port(self) -> None:
        """Hold the Raft port from the start: Raft binds it only once the node knows its
        peers (seconds later, or minutes when it waits for them), and meanwhile an
        outgoing connection of any process could get it as its local port (ports in the
        ephemeral range, 32768-60999 on Linux): Raft could then never listen."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.raft_port))
        except OSError as err:
            sock.close()
            raise ClusterError(f"the Raft port {self.config.host}:{self.raft_port} cannot be "
                               f"bound ({err.strerror}): pick another with --raft-port or "
                               "--cluster-port (Raft uses cluster_port + 1)") from None
        self._raft_port_hold = sock

    def start_raft(self, voters: list[str], keep_log: bool = False) -> None:
        """Start this node's Raft node with ``voters`` (Raft addresses; this node's own,
        if listed, is skipped) as its configuration. Its log, term and vote live in
        ``data_dir/raft``: ``keep_log`` (a voter rejoining its cluster) goes on from them,
        else (founding, forming, joining as a new member) they start empty."""
        partners = [v for v in voters if v != self.info["raft"]]
        hold, self._raft_port_hold = self._raft_port_hold, None
        if hold is not None:
            hold.close()  # pysyncobj binds it next
        config = self.config
        log_dir = os.path.join(config.data_dir, "raft")
        os.makedirs(log_dir, exist_ok=True)
        if not keep_log and clear_raft_files(log_dir):
            log.info("Raft log of an earlier membership dropped node=%s: joining as a new "
                     "member", self.node_id)
        self.raft = RaftNode(self.info["raft"], partners, config.cluster_secret, config.host,
                             self.view, self.loop, (config.raft_compaction_entries,
                                                    config.raft_compaction_seconds), log_dir)

    async def stop_raft(self) -> None:
        """This node's Raft node goes (it left the cluster, or must start over as a
        joiner); the routing view keeps what it had."""
        raft, self.raft = self.raft, None
        if raft is not None:
            await asyncio.to_thread(raft.destroy_and_wait)

    async def wait_member(self, node_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while node_id not in self.view.members:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{node_id} not in the routing table after joining")
            await asyncio.sleep(0.05)

    async def after_leaving(self) -> None:
        """Out of the cluster: no more background work, links or forwarding."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.remote = SubscriptionTree()
        for peer in list(self.view.members):
            self.transport.remove_peer(peer)

    def leader_id(self) -> str | None:
        """The node id of the Raft leader this node knows (None: none, or not a member)."""
        if self.raft is None:
            return None
        leader = self.raft.status()["leader"]
        if leader is None:
            return None
        if leader == self.info["raft"]:
            return self.node_id
        for node_id, m in self.view.members.items():
            if m.get("raft") == leader:
                return node_id
        return None

    def peer_alive(self, node_id: str) -> bool:
        """Linked now, or lost less than DOWN_AFTER ago (a blip)."""
        if self.transport.is_up(node_id):
            return True
        since = self.peer_down_since.get(node_id)
        return since is not None and time.time() - since < DOWN_AFTER

    async def stop(self) -> None:
        if self._raft_port_hold is not None:
            self._raft_port_hold.close()
            self._raft_port_hold = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass  # cancelled just above: the normal end of these loops
        if self.discovery is not None:
            await self.discovery.stop()
        await self.replication.stop()
        await self.transport.stop()
        if self.raft is not None:
            await asyncio.to_thread(self.raft.destroy)
            self.raft = None

    # -- ClusterHooks ---------------------------------------------------------------------

    def claim(self, client_id: str, clean_start: bool, owner: str | None = None):
        if self.leaving or self.raft is None:
            raise ConnectRefused(ReasonCode.SERVER_UNAVAILABLE, "node is leaving the cluster"
                                 if self.leaving else "node is not a cluster member")
        if self.config.minority_clean_sessions and clean_start and not self.raft.status()[
                "has_quorum"]:
            return Claim(0)
        return self.takeovers.claim(client_id, clean_start, owner)

    def session_ended(self, client_id: str, epoch: int) -> None:
        if self.raft is None:
            return  # left the cluster: nobody to tell
        fut = self.raft.submit(("release", client_id, self.node_id, epoch))
        fut.add_done_callback(_log_failure("release", client_id))

    def routes_changed(self, added: list[str], removed: list[str]):
        if self.raft is None:
            return None  # left the cluster: nobody routes here
        fut = self.raft.submit(("routes", self.node_id, added, removed))
        fut.add_done_callback(_log_failure("routes", self.node_id))
        return fut if added else None

    def forward(self, msg, handled_groups) -> int:
        remote = self.remote
        if not remote.count:
            return 0
        match = remote.match(msg.topic)
        plain = match.derived
        if plain is None:
            # the nodes with plain subscriptions: computed once per topic and routes version
            plain = match.derived = tuple(sorted({e.client_id for e in match.entries
                                                  if e.client_id != self.node_id}))
        targets = {node: [True, None] for node in plain}
        if match.groups:
            self._add_group_targets(match, handled_groups, targets)
        if not targets:
            return 0
        out = self._outbox
        plain_blob = None
        for node, (normal, groups) in targets.items():
            batch = out.get(node)
            if batch is None:
                # (a move applied here flushes the outbox before its barrier: a batch is
                # routed with one table as far as moves go)
                batch = out[node] = [[], False, None, self.view.tables.position]
            if normal and not groups:
                if plain_blob is None:
                    plain_blob = pack_forward(msg, True, None)
                batch[0].append(plain_blob)
            else:
                batch[0].append(pack_forward(msg, normal, groups))
            if msg.qos:
                batch[1] = True  # acknowledged to its publisher: must not be dropped
                if self.confirm_forwards:
                    if batch[2] is None:
                        batch[2] = self.loop.create_future()
                    if not self._forward_waits or self._forward_waits[-1] is not batch[2]:
                        self._forward_waits.append(batch[2])
            if len(batch[0]) >= FORWARD_BATCH:
                self._send_batch(node, out.pop(node))
        if out and not self._outbox_scheduled:
            self._outbox_scheduled = True
            self.loop.call_soon(self.flush_outbox)
        self.forwarded += len(targets)
        return len(targets)

    def _add_group_targets(self, match, handled_groups, targets: dict) -> None:
        """One node per shared group not served on this node (round robin, up first)."""
        me = self.node_id
        for group in match.groups:
            if group.key in handled_groups:
                continue
            nodes = [n for n in group.members if n != me and self.transport.is_up(n)] or \
                [n for n in group.members if n != me]
            if not nodes:
                continue
            self._group_cursor += 1
            node = nodes[self._group_cursor % len(nodes)]
            t = targets.get(node)
            if t is None:
                t = targets[node] = [False, None]
            if t[1] is None:
                t[1] = [group.key]
            else:
                t[1].append(group.key)

    def flush_outbox(self) -> None:
        """Send every forward batch still waiting for the end of this loop iteration.
        Called before a barrier goes out: a barrier must follow, on each link, every
        message forwarded before it."""
        self._outbox_scheduled = False
        # the publish handlers of this iteration took theirs; the rest (wills) wait for none
        self._forward_waits = []
        out, self._outbox = self._outbox, {}
        for node, batch in out.items():
            self._send_batch(node, batch)

    def take_forward_waits(self) -> list:
        waits, self._forward_waits = self._forward_waits, []
        return waits

    def _send_batch(self, node: str, batch: list) -> None:
        """The messages forwarded to one node in one loop iteration go as one message."""
        items, must_arrive, confirm, position = batch
        if confirm is not None:
            cid = next(self._confirm_ids)
            self._confirms[cid] = (node, confirm, self.loop.time(), items, position)
            # routed with what this node knew of that node's process: a batch still in
            # the link's buffer when it restarts is not for its new process (see _on_pubc)
            self.transport.send(node, "pubc", [cid, items,
                                               self.transport.peer_incarnation(node),
                                               position, self._promoted_at()], True)
            return
        if self.transport.send(node, "pubs", items, must_arrive):
            self._dropping_to.discard(node)
            return
        # a QoS 0 flood faster than the link: drop, count, log once per episode
        self.forward_dropped += len(items)
        if node not in self._dropping_to:
            self._dropping_to.add(node)
            log.warning("forward queue to %s full: dropping QoS 0 messages node=%s", node,
                        self.node_id)

    def not_ready_reason(self) -> str | None:
        if self.membership.phase == "left":
            return "left the cluster: stop this node"
        if self.leaving:
            return "leaving the cluster"
        if not self.ready or self.raft is None:
            return "joining the cluster"
        raft = self.raft.status()
        if not raft["has_quorum"]:
            return (f"no Raft quorum: {len(raft['connected']) + 1} of "
                    f"{len(raft['partners']) + 1} nodes reachable (a minority)")
        if raft["leader"] is None:
            return "no Raft leader known (an election is going on)"
        return None

    def retained_changed(self, topic: str, msg) -> None:
        ts = time.time()
        self.retained_ts[topic] = ts
        body = (topic, None if msg is None else message_to_record(msg), ts)
        for node in self.view.members:
            if node != self.node_id:
                self.transport.send(node, "ret", body)

    # -- transport ------------------------------------------------------------------------

    def _on_message(self, peer: str, kind: str, body) -> None:
        handler = self._message_handlers.get(kind)
        if handler is None:
            log.warning("unknown message kind=%s from=%s node=%s", kind, peer, self.node_id)
            return
        if kind in KINDS:
            try:
                body = decode(kind, body)
            except MalformedMessage as err:
                log.warning("malformed message from=%s node=%s: %s", peer, self.node_id, err)
                return
        handler(peer, body)

    def held_wait(self, fut: asyncio.Future, client_id: str) -> None:
        """A message for ``client_id`` a hand-over's gate holds in memory
        (cluster/takeover.py; ``fut`` is done once it is decided): what acknowledges it
        (the forward's confirmation, a local publisher's PUBACK) waits until it is
        admitted and stored."""
        if self._held_into is not None:
            self._held_into.append(fut)  # (``_stored_wait``: the mark, then the store)
            collecting = self.replication.collecting
            if collecting is not None:
                collecting.add(client_id)
            return
        stored = self.loop.create_future()

        def decided(f: asyncio.Future) -> None:
            wait = self.broker.durable_wait() if not f.cancelled() else None
            if wait is None:
                _pass_on(f, stored)
            else:
                wait.add_done_callback(lambda w: _pass_on(w, stored))
        fut.add_done_callback(decided)
        self._forward_waits.append(stored)  # a local publish: its handler takes them

    def _promoted_at(self) -> int:
        return self.view.tables.promoted_at

    def _wait_for_promotion(self, peer: str, kind: str, body, promoted_at) -> bool:
        """Hold a forward routed with a promotion this node has not applied yet (its
        sessions are not here yet), or while this node, starting, has not installed the
        sessions promoted to it, and every later one from that sender, in order."""
        waiting = self._waiting_forwards.get(peer)
        if waiting is None and (not promoted_at or (
                promoted_at <= self.view.tables.position and self.promotions_in())):
            return False
        self._waiting_forwards.setdefault(peer, []).append((kind, body, promoted_at or 0))
        return True

    def promotions_in(self) -> bool:
        """Are the sessions promoted to this node installed (not starting any more)?"""
        return self.caught_up and self.replication.adopted

    def _release_waiting_forwards(self) -> None:
        if not self._waiting_forwards or not self.promotions_in():
            return
        position = self.view.tables.position
        for peer in list(self._waiting_forwards):
            queue = self._waiting_forwards[peer]
            while queue and queue[0][2] <= position:
                kind, body, _at = queue.pop(0)
                (self._take_pubc if kind == "pubc" else self._take_pubr)(peer, body)
            if not queue:
                del self._waiting_forwards[peer]

    def _on_pubs(self, peer: str, blobs: list) -> None:
        """Forwards nobody waits a confirmation for (QoS 0, or the fast mode)."""
        self._held_into = []
        try:
            self._route_forwarded(peer, blobs)
        finally:
            self._held_into = None

    def _on_pubc(self, peer: str, body) -> None:
        if self._wait_for_promotion(peer, "pubc", body, body[4] if len(body) > 4 else 0):
            return
        self._take_pubc(peer, body)

    def _take_pubc(self, peer: str, body) -> None:
        cid, items = body[0], body[1]
        meant = body[2] if len(body) > 2 else None
        if meant is not None and meant != self.transport.incarnation:
            # routed to this node's previous process (held while the link was down): the
            # routing decision counted on its hand-over state, which went with it (e.g. the
            # barrier it waited for). Not confirmed: the publisher's PUBACK never comes and
            # it sends the message again, rather than this process dropping it unnoticed.
            # Said at once (``pubc_no``): its sender must not wait for a confirmation that
            # never comes (nor take it as lost with this node if it is declared down, and
            # send it again to where this node's sessions went: they were not all here).
            self.forward_stale += len(items)
            log.warning("forwarded messages for a previous process of this node not taken "
                        "node=%s from=%s count=%d", self.node_id, peer, len(items))
            self.transport.send(peer, "pubc_no", cid, True)
            return
        position, fenced = (body[3] if len(body) > 3 else None), self._fenced_at
        if fenced is not None and position is not None and position < fenced:
            # routed with a table from before this node was declared down: the sessions it
            # was meant for may have been promoted elsewhere (and dropped here). Not
            # confirmed: the publisher sends it again, routed with the promotion
            self.forward_stale += len(items)
            log.warning("forwarded messages routed before this node was declared down not "
                        "taken node=%s from=%s count=%d", self.node_id, peer, len(items))
            self.transport.send(peer, "pubc_no", cid, True)
            return
        # the sender's table position when it routed them (a restarted old holder that
        # cannot tell yet whether they used the new routes compares it with the move's)
        self.forward_position = position
        try:
            held, stored_in = self._route_collecting(peer, items)
        finally:
            self.forward_position = None
        self._confirm_when(self._stored_wait(held, peer, cid, stored_in), peer, cid)

    def _route_collecting(self, sender: str, items: list, only=None) -> tuple[list, set]:
        """Route a forwarded batch; returns the waits of the messages a gate holds and
        the sessions it stored messages into (or that a gate holds them for)."""
        held = self._held_into = []
        stored_in = self.replication.collecting = set()
        try:
            self._route_forwarded(sender, items, only)
        finally:
            self._held_into = None
            self.replication.collecting = None
        return held, stored_in

    def _stored_wait(self, held: list, sender: str, mark_id: int, stored_in: set):
        """What a forward's confirmation waits for: the messages a hand-over's gate holds
        (decided: in a session's queue here, or left to the other copy), then the
        forward's mark in the replica streams of the sessions it went into
        (``mark_forward``: a replica then skips a re-send of it to those), then the store
        and the replicas. A mark sent while a message was only held would make the
        replica skip it though its copy lacks it."""
        if not held:
            self.replication.mark_forward(sender, mark_id, stored_in)
            return self.broker.durable_wait()
        out = self.loop.create_future()

        def decided(gate: asyncio.Future) -> None:
            if gate.cancelled() or gate.exception() is not None:
                _pass_on(gate, out)
                return
            self.replication.mark_forward(sender, mark_id, stored_in)
            wait = self.broker.durable_wait()
            if wait is None:
                _pass_on(gate, out)
            else:
                wait.add_done_callback(lambda w: _pass_on(w, out))
        self.broker.all_done(*held).add_done_callback(decided)
        return out

    def _confirm_when(self, wait, peer: str, cid: int) -> None:
        if wait is None:
            self.transport.send(peer, "pubc_ok", cid, True)
        else:
            wait.add_done_callback(lambda w, peer=peer, cid=cid: self._confirm_stored(
                w, peer, cid))

    def _on_pubr(self, peer: str, body) -> None:
        """A forward sent again: its first receiver (``body[2]``) died before confirming
        it, and its sessions were promoted here."""
        if self._wait_for_promotion(peer, "pubr", body, body[5]):
            return
        self._take_pubr(peer, body)

    def _take_pubr(self, peer: str, body) -> None:
        cid, items, source, first_cid = body[0], body[1], body[2], body[3]
        wait = self._redo_here(peer, items, source, first_cid,
                               body[6] if len(body) > 6 else None)
        if wait is REDO_REFUSED:
            self.transport.send(peer, "pubc_no", cid, True)
        else:
            self._confirm_when(wait, peer, cid)

    def _on_pubc_no(self, peer: str, cid) -> None:
        """A re-sent forward that could not be stored: its publishers are not answered
        (their connections close; they send again)."""
        entry = self._confirms.get(cid)
        if entry is None or entry[0] != peer:
            return
        del self._confirms[cid]
        entry[1].cancel()

    def _redo_here(self, sender: str, items: list, source: str, first_cid: int,
                   routed_at: int | None = None):
        """Deliver a re-sent forward to the sessions promoted here from ``source``, unless
        ``source`` had stored it (its replica stream marked it), or it was routed
        (``routed_at``) with a table from before the session moved to ``source`` (its
        gate dropped it: the old holder kept it, and its late messages come here, or are
        here already, folded from this node's own hand-over). Returns the wait for
        the store (and replicas), None, or REDO_REFUSED: a session moving here from
        ``source`` still waited for the late messages ``source`` held (they went with
        it; these may be among them, or already here): not confirmed either way."""
        rep = self.replication
        if not self.promotions_in():
            # restarting: the sessions promoted here are not installed yet (nothing
            # would take these); the publishers send again
            log.warning("re-sent forward refused node=%s from=%s dead=%s: this node is "
                        "still starting", self.node_id, sender, source)
            return REDO_REFUSED
        marked = rep.marked(source, sender, first_cid)
        if marked is None:
            return None  # (stored there into every session: a holder of an older version)
        if self.takeovers.waiting_for(source):
            log.warning("re-sent forward refused node=%s from=%s dead=%s: a hand-over from "
                        "it still waits for its late messages", self.node_id, sender, source)
            return REDO_REFUSED
        # (not into the copies that had it stored)
        only = {c for c, src in rep.promoted_from.items() if src == source} - marked
        if routed_at is not None:
            arrived = self.view.arrived
            only = {c for c in only if arrived.get(c) is None or routed_at >= arrived[c]}
        if not only:
            return None
        held, stored_in = self._route_collecting(sender, items, only)
        rep.redone += len(items)
        return self._stored_wait(held, sender, first_cid, stored_in)

    def redo_forwards(self, node: str, targets: list[str], still_holds: bool) -> None:
        """``node`` was declared down: the batches forwarded to it that it never confirmed
        go again to the nodes its sessions were promoted to (``pubr``); their publishers'
        acknowledgements wait for those confirmations instead, and for ``node``'s own too
        when it ``still_holds`` sessions without a replica (they may be among the
        receivers; it confirms if it comes back)."""
        at = self.view.down.get(node)
        if at is not None:
            if self._redone.get(node) == at:
                return  # (this down's already: a snapshot after its event)
            self._redone[node] = at
        lost = [(cid, e) for cid, e in self._confirms.items() if e[0] == node]
        # a forward older than a publisher waits for its acknowledgement was given up by
        # then (the connection closed unacknowledged, the client sent again or gave up):
        # sent again now it could only be stored twice
        too_old = self.loop.time() - STORE_COMMIT_TIMEOUT
        for cid, entry in [x for x in lost if x[1][2] < too_old]:
            del self._confirms[cid]
            entry[1].cancel()
        lost = [x for x in lost if x[1][2] >= too_old]
        if not lost:
            return
        for cid, (_node, fut, sent_at, items, routed_at) in lost:
            waits = []
            if still_holds:
                own = self.loop.create_future()
                self._confirms[cid] = (node, own, sent_at, items, routed_at)
                waits.append(own)
            else:
                del self._confirms[cid]
            for target in targets:
                if target == self.node_id:
                    w = self._redo_here(self.node_id, items, node, cid, routed_at)
                    if w is REDO_REFUSED:
                        w = self.loop.create_future()
                        w.cancel()
                    if w is not None:
                        waits.append(w)
                    continue
                new = next(self._confirm_ids)
                done = self.loop.create_future()
                self._confirms[new] = (target, done, self.loop.time(), items, routed_at)
                self.transport.send(target, "pubr", [new, items, node, cid,
                                                     self.view.tables.position,
                                                     self._promoted_at(), routed_at], True)
                waits.append(done)
            if not targets and not still_holds:
                # nothing it held is anywhere else: nobody can store these now; the
                # publishers' acknowledgements are given up (they send again)
                if not fut.done():
                    fut.cancel()
                continue
            combined = self.broker.all_done(*waits) if waits else None
            if combined is None:
                if not fut.done():
                    fut.set_result(None)
            else:
                combined.add_done_callback(lambda c, fut=fut: _pass_on(c, fut))
        log.info("forwards sent again node=%s dead=%s batches=%d to=%s", self.node_id, node,
                 len(lost), targets)

    def _on_pubc_ok(self, peer: str, cid) -> None:
        entry = self._confirms.get(cid)
        if entry is None or entry[0] != peer:
            return  # (owed to a previous process of this node: see _confirm_ids)
        del self._confirms[cid]
        if not entry[1].done():
            entry[1].set_result(None)

    def _on_snap_chunk(self, peer: str, chunk: SnapChunk) -> None:
        self.snapshot_chunks.setdefault((chunk.client_id, chunk.epoch), {})[chunk.i] = \
            chunk.items

    def _on_stats(self, peer: str, body) -> None:
        self.peer_stats[peer] = dict(body, received_at=time.time())

    def _route_forwarded(self, peer: str, blobs: list, only=None) -> None:
        route_remote = self.broker.route_remote
        now = time.time()
        for blob in blobs:
            msg, normal, groups = unpack_forward(blob)
            msg.via = peer
            if msg.expires_at is not None and msg.expires_at <= now:
                self.broker.counters.expired_messages += 1  # expired in transit
                continue
            route_remote(msg, normal, groups, only)
        self.received += len(blobs)

    def _confirm_stored(self, wait: asyncio.Future, peer: str, cid: int) -> None:
        if wait.cancelled() or wait.exception() is not None:
            return  # the store failed: this node stops; the publisher gets no PUBACK
        self.transport.send(peer, "pubc_ok", cid, True)

    def _expire_confirms(self, older_than: float) -> None:
        """Confirmations that never came (the receiver died before storing): the
        PUBACKs waiting for them were given up long ago (their connections closed)."""
        limit = self.loop.time() - older_than
        for cid in [c for c, e in self._confirms.items() if e[2] < limit]:
            fut = self._confirms.pop(cid)[1]
            fut.cancel()

    async def _on_request(self, peer: str, kind: str, body):
        handler = self._request_handlers.get(kind)
        if handler is None:
            raise ValueError(f"unknown request {kind!r}")
        if kind in KINDS:
            body = decode(kind, body)  # (MalformedMessage: the requester gets the error)
        return await handler(peer, body)

    async def _on_cluster_info(self, peer: str, body):
        return self.membership.info(body if isinstance(body, dict) else None)

    async def _on_membership(self, kind: str, body):
        return await self.membership.handle(kind, body)

    async def _on_adopt(self, peer: str, adopt: Adopt):
        return await self.membership.adopt(adopt.client_ids)

    async def _on_retained_dump(self, peer: str, body):
        return [(t, message_to_record(m), self.retained_ts.get(t, 0.0))
                for t, m in self.broker.retained.items()]

    async def _on_kick(self, peer: str, body):
        """An operator's kick forwarded by another node's admin API."""
        return self.broker.kick(body["client_id"])

    async def fetch_retained(self, peer: str) -> None:
        try:
            items = await self.transport.request(peer, "retained_dump", {}, 15.0)
        except (PeerUnreachable, RequestTimeout, RemoteError) as err:
            log.warning("retained copy from %s failed node=%s: %r", peer, self.node_id, err)
            return
        for topic, record, ts in items:
            self._apply_retained(topic, record, ts)

    def _apply_retained(self, topic: str, record, ts: float) -> None:
        if self.retained_ts.get(topic, 0.0) > ts:
            return  # a newer update already applied (last writer wins)
        self.retained_ts[topic] = ts
        self.broker.set_retained(topic, None if record is None else message_from_record(record))

    def _on_peer_restarted(self, peer: str) -> None:
        self.takeovers.on_peer_restarted(peer)
        self.replication.on_peer_restarted(peer)
        # forwards its previous process never confirmed never will be (what was queued
        # for it is dropped, or refused by the new one): their publishers are not
        # answered and send again. Kept, they were sent again to wherever its sessions
        # went at its next ``down``, long after they may have been stored (duplicates).
        stale = [cid for cid, entry in self._confirms.items() if entry[0] == peer]
        for cid in stale:
            self._confirms.pop(cid)[1].cancel()
        if stale:
            log.info("forwards to a previous process given up node=%s peer=%s batches=%d",
                     self.node_id, peer, len(stale))

    def _on_peer_up(self, peer: str) -> None:
        self.peer_down_since.pop(peer, None)

    def _on_peer_down(self, peer: str) -> None:
        self.peer_down_since.setdefault(peer, time.time())

    # -- Raft events ----------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        handler = self._event_handlers.get(type(ev))
        if handler is not None:
            handler(ev)

    def _on_routes(self, ev: RoutesChanged) -> None:
        if ev.node != self.node_id:
            for f in ev.added:
                self._remote_add(ev.node, f)
            for f in ev.removed:
                self._remote_remove(ev.node, f)

    def _on_claimed(self, ev: Claimed) -> None:
        if self.caught_up:  # else replaying history: stored sessions are adopted after it
            self.takeovers.on_claimed(ev.client_id, ev.node, ev.epoch, ev.holder, ev.clean)

    def _on_released(self, ev: Released) -> None:
        if self.caught_up:
            self.takeovers.on_released(ev.client_id, ev.node)

    def _on_moved(self, ev: Moved) -> None:
        if ev.ok and ev.to_node == self.node_id:
            self.replication.moved_here(ev.client_id)
        self.takeovers.on_moved(ev.client_id, ev.epoch, ev.from_node, ev.to_node, ev.ok,
                                ev.position)

    def _on_member(self, ev: MemberChanged) -> None:
        self.membership.save_soon()
        if ev.node == self.node_id:
            return
        if ev.info is None:
            self._drop_peer_later(ev.node)
            self._rebuild_remote()  # its routes went with it
        else:
            host, port = ev.info["transport"].rsplit(":", 1)
            self.transport.set_peer(ev.node, host, int(port))

    def _on_forgotten(self, ev: Forgotten) -> None:
        self.membership.save_soon()
        if ev.node == self.node_id:
            log.error("this node was forgotten by the cluster node=%s: restart it to join "
                      "again", self.node_id)
            return
        self._drop_peer_later(ev.node)
        self._rebuild_remote()
        if self.caught_up:
            self._promoted(ev.node, ev.promoted, ev.position, 0)
            for client_id in ev.released:
                # a session frozen here for a claim of the forgotten node stays here
                self.takeovers.on_released(client_id, ev.node)

    def _on_node_down(self, ev: NodeDown) -> None:
        log.warning("node declared down node=%s down=%s promoted=%d unreplicated=%d",
                    self.node_id, ev.node, len(ev.promoted), ev.stuck)
        self._rebuild_remote()  # its routes went to the nodes that got its sessions
        if not self.caught_up:
            return  # replaying history: promotions here are adopted after it
        if ev.node == self.node_id:
            self._fenced_at = ev.position
            self._declared_down()
            return
        self._promoted(ev.node, ev.promoted, ev.position, ev.stuck)

    def _promoted(self, node: str, promoted, position: int, stuck: int) -> None:
        """``node``'s sessions were promoted on their replicas (it was declared down or
        forgotten): the copies here install or give way, its forwards go again."""
        self.replication.on_node_down(node, promoted, position, stuck)
        for client_id, target, epoch in promoted:
            if target != self.node_id:
                self.takeovers.on_claimed(client_id, target, epoch, target, False)

    def _declared_down(self) -> None:
        """The cluster declared this node down (it was silent too long): the sessions it
        held that were promoted elsewhere are not its own any more; it announces itself
        again to be counted as up."""
        view = self.view
        self.replication.fence_self()
        # (not a session being taken over here: its move may still commit)
        promoted, me = view.promoted, self.node_id
        gone = [cid for cid, s in self.broker.sessions.items()
                if view.holders.get(cid) not in (None, me)
                and promoted.get(cid, {}).get(me, -1) > (s.epoch or 0)]
        for cid in gone:
            self.takeovers.abandon(cid, "promoted elsewhere while this node was declared "
                                   "down")
            session = self.broker.sessions.get(cid)
            if session is not None:
                self.broker.kick(cid)
                session = self.broker.sessions.get(cid)
            if session is not None:
                self.broker.end_session(session, "promoted on another node while this one "
                                        "was declared down", release=False, will=False)
        log.warning("this node was declared down node=%s: %d sessions promoted elsewhere "
                    "dropped; announcing it again", self.node_id, len(gone))
        if self.raft is not None:
            fut = self.raft.submit(("member", self.node_id, self.info))
            fut.add_done_callback(_log_failure("member", self.node_id))
            if self.broker.filter_refs:
                self.raft.submit(("routes", self.node_id, sorted(self.broker.filter_refs),
                                  [])).add_done_callback(_log_failure("routes", self.node_id))

    def _on_replaced(self, ev: Replaced) -> None:
        self._rebuild_remote()
        for node_id, info in self.view.members.items():
            if node_id != self.node_id:
                host, port = info["transport"].rsplit(":", 1)
                self.transport.set_peer(node_id, host, int(port))
        self.takeovers.on_reset()
        if self.caught_up:
            self._downs_in_snapshot()

    def _downs_in_snapshot(self) -> None:
        """A Raft snapshot replaced the table: what ``down`` entries it holds would have
        done here as events (``_on_node_down``) is done now: this node fences itself if
        it is declared down, installs the sessions promoted to it, and sends again what
        it forwarded to a node declared down."""
        view = self.view
        if self.node_id in view.down:
            self._fenced_at = view.down[self.node_id]
            self._declared_down()
        self.replication.adopt_promoted()
        promoted = view.promoted
        for node in sorted(view.down):
            if node == self.node_id:
                continue
            targets = sorted({view.holders[cid] for cid, by in promoted.items()
                              if node in by and cid in view.holders})
            still_holds = any(h == node for h in view.holders.values())
            self.redo_forwards(node, targets, still_holds)

    def _rebuild_remote(self) -> None:
        self.remote = SubscriptionTree()
        for f, nodes in self.view.routes.items():
            for n in nodes:
                if n != self.node_id:
                    self._remote_add(n, f)

    def _drop_peer_later(self, node_id: str) -> None:
        """A node removed from the table: its link goes after LINK_LINGER seconds, so the
        answer to its own removal request (and what else is in flight) still reaches it."""
        def drop() -> None:
            if node_id not in self.view.members:  # not back meanwhile
                self.transport.remove_peer(node_id)
        self.loop.call_later(LINK_LINGER, drop)

    def _remote_add(self, node_id: str, topic_filter: str) -> None:
        group, levels = parse_shared(topic_filter)
        self.remote.add(levels, SubEntry(node_id, topic_filter, 2, share_group=group))

    def _remote_remove(self, node_id: str, topic_filter: str) -> None:
        group, levels = parse_shared(topic_filter)
        self.remote.remove(levels, node_id, group)

    # -- background ----------------------------------------------------------------------

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD)
            self._expire_confirms(60.0)
            st = dict(self._own_stats(), at=time.time())
            for node in self.view.members:
                if node != self.node_id:
                    self.transport.send(node, "stats", st)
            leader = self.raft.status()["leader"]
            if leader != self._last_leader:
                self.leader_changes += 1
                self._last_leader = leader
            self.membership.save_soon()  # the voters may have changed without an event

    def _own_stats(self) -> dict:
        rep = self.replication
        return {"sessions": len(self.broker.sessions), "connections": len(self.broker.clients),
                "replicated": rep.copies_count(), "under_replicated": rep.under_replicated()}

    async def _reconcile_loop(self) -> None:
        """Routes the table has for this node should be exactly the filters subscribed
        here; a write lost to a leader change is repaired within a period."""
        while True:
            await asyncio.sleep(RECONCILE_PERIOD)
            want = set(self.broker.filter_refs)
            have = {f for f, nodes in self.view.routes.items() if self.node_id in nodes}
            add, remove = sorted(want - have), sorted(have - want)
            if add or remove:
                try:
                    await self.raft.run(("routes", self.node_id, add, remove), 5.0)
                except RaftUnavailable as err:
                    log.info("route reconciliation deferred node=%s: %s", self.node_id, err)

    # -- views ---------------------------------------------------------------------------

    def cluster_status(self) -> dict:
        raft = self.raft.status() if self.raft is not None else None
        members = self.view.members
        by_raft = {m.get("raft"): n for n, m in members.items()}
        leader = by_raft.get(raft["leader"]) if raft and raft["leader"] else None
        voters = self.raft.voters() if self.raft is not None else []
        now = time.time()
        declared_down = self.view.down
        nodes = []
        for node_id, info in sorted(members.items()):
            if node_id == self.node_id:
                status = "leaving" if self.leaving else info.get("status", "up")
                stats = self._own_stats()
            else:
                if info.get("status") == "leaving":
                    status = "leaving"
                else:  # a link lost less than DOWN_AFTER ago is a blip: reconnecting
                    status = "up" if self.peer_alive(node_id) else "down"
                stats = self.peer_stats.get(node_id, {})
            if node_id in declared_down:
                status = "down"
            nodes.append({
                "id": node_id,
                "addresses": {k: info.get(k) for k in ("mqtt", "admin", "transport", "raft")},
                "role": "leader" if node_id == leader else "follower",
                "status": status,
                "voter": info.get("raft") in voters,
                "sessions": stats.get("sessions"),
                "replicated": stats.get("replicated"),
                "under_replicated": stats.get("under_replicated"),
                "declared_down": node_id in declared_down,
                "connections": stats.get("connections"),
                "uptime_s": round(now - info.get("started_at", now), 1),
            })
        return {
            "cluster": self.config.cluster_name,
            "cluster_id": self.view.cluster_id,
            "node_id": self.node_id,
            "phase": self.membership.phase,
            "leader": leader,
            "term": raft["term"] if raft else None,
            "commit_index": raft["commit_index"] if raft else None,
            "has_quorum": raft["has_quorum"] if raft else False,
            "raft": self._voter_view(raft, voters, by_raft),
            "nodes": nodes,
            "takeovers": self.takeovers.status(),
            "forwarded": self.forwarded,
            "forward_dropped_qos0": self.forward_dropped,
            "forward_stale": self.forward_stale,
            "stored_sessions_unjudged": self.unjudged,
            "session_replicas": self.replication.k,
            "under_replicated": sum(n["under_replicated"] or 0 for n in nodes),
            "replication_lag": self.replication.lag(),
            "received": self.received,
            "leader_changes": self.leader_changes,
        }

    def _voter_view(self, raft: dict | None, voters: list[str], by_raft: dict) -> dict:
        """The Raft voter set as this node's pysyncobj has it, and the quorum arithmetic:
        a voter no member entry names is a ghost (it still counts in every majority)."""
        mine = self.info["raft"]
        connected = set(raft["connected"]) if raft else set()
        listed = [{"address": a, "node": by_raft.get(a), "self": a == mine,
                   "reachable": a == mine or a in connected, "member": a in by_raft}
                  for a in voters]
        return {
            "voters": listed,
            "voter_count": len(voters),
            "reachable": sum(1 for v in listed if v["reachable"]),
            "needed": len(voters) // 2 + 1 if voters else 0,
            "has_quorum": bool(raft and raft["has_quorum"]),
            "ghost_voters": [v["address"] for v in listed if not v["member"]],
            "members_not_voting": sorted(n for a, n in by_raft.items() if a not in voters),
        }

    def session_view(self, client_id: str) -> dict:
        owner = self.view.owners.get(client_id)
        holder = self.view.holders.get(client_id)
        d = {"client_id": client_id, "owner": owner[0] if owner else None,
             "epoch": owner[1] if owner else None, "holder": holder,
             "here": client_id in self.broker.sessions}
        s = self.broker.sessions.get(client_id)
        if s is not None:
            d.update(state=s.state.value, connected=s.client is not None,
                     subscriptions=sorted(s.subscriptions), queued=len(s.queue),
                     inflight=len(s.inflight_out), expiry_interval=s.expiry_interval)
        return d


def _log_failure(what: str, key: str):
    def done(fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            log.info("%s not committed key=%s: %r (reconciled later)", what, key, err)
    return done


def _pass_on(done: asyncio.Future, fut: asyncio.Future) -> None:
    if fut.done():
        return
    if done.cancelled() or done.exception() is not None:
        fut.cancel()
    else:
        fut.set_result(None)


def new_secret() -> str:
    return secrets.token_urlsafe(24)
