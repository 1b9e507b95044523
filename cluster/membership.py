"""Who is in the cluster: forming it, joining, rejoining, leaving, forgetting a dead node.

The Raft configuration (pysyncobj's voter set) is the membership; the routing table's
``members`` entries carry each node's addresses and status. This module keeps the two in
step, and keeps this node's view of them on disk (``cluster/stored.py``) so that a restart
finds the cluster again.

Starting (``Membership.start``), by what this node has:

* **Stored membership, still a voter** (same Raft address): ask the stored members (and
  ``--join`` seeds) for the cluster. One that serves answers with the current voter set:
  start Raft with it and update the member entry (a rejoin; nothing to add). If nobody
  serves (the whole cluster is restarting), start Raft with the *stored* voters: they
  re-form the cluster together as soon as a majority of them runs. A node with stored state
  never founds a new cluster.
* **Stored membership, but left on purpose or back with a new address**: join through the
  stored members (the leader replaces the old voter entry of the same node id).
* **Nothing stored**: a seed or an mDNS peer that serves: join through it. Several new
  nodes that must form the cluster together (``bootstrap_expect``, or a ``--join`` list
  naming this node itself): wait until that many see each other (each answer also names
  the candidates its sender has seen, so the set spreads), then the first ``expect`` of
  them by node id start Raft with each other as voters. No seed at all: found alone.

Voter changes (``join``, ``remove_member``, ``forget``) run on the Raft leader, one at a
time under a lock (pysyncobj refuses a change while another is in flight); any member
forwards them there, so concurrent joins queue instead of being refused in a loop.

Leaving (``leave``): mark the node leaving (``/readyz`` 503), wait ``drain_delay``, close the
connections, hand every offline session to the other nodes (evenly; ``adopt``), wait for
the hand-overs to finish, hand Raft leadership over, and ask the leader to remove this node
from the voters and then from the table, both committed. Only then is the node out; any
step that cannot be done fails the leave with the reason (and the node serves on).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from node.mqtt.codes import ReasonCode
from node.session.session import SessionState

from .discovery import resolve_seeds
from .messages import Adopt, encode
from .routing import RaftUnavailable
from .stored import StoredMembership, StoredStateError, describe
from .transport import PeerUnreachable, RemoteError, RequestTimeout

log = logging.getLogger("shoal.membership")

PROBE_TIMEOUT = 2.0      # seconds for one hello + cluster_info to one address
PROGRESS_EVERY = 5.0     # seconds between progress lines while waiting
JOIN_LIMIT = 60.0        # seconds a new node (nothing stored, no bootstrap) tries to join
CHANGE_TIMEOUT = 20.0    # seconds one voter change may take (retries included)
ADOPT_BATCH = 250        # sessions per adopt request when evacuating
ADOPT_PARALLEL = 32      # adoptions a node runs at once
LINK_ERRORS = (OSError, PeerUnreachable, RequestTimeout, RemoteError)


class MembershipError(Exception):
    """An operator request that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, **extra) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class Membership:
    def __init__(self, member) -> None:
        from .member import ClusterError  # one error type for everything start raises
        self.ClusterError = ClusterError
        self.member = member
        self.config = member.config
        self.node_id = member.node_id
        self.store = StoredMembership(self.config.data_dir)
        self.stored: dict | None = None
        #: new (nothing stored, no cluster yet), forming, stored, joining, member,
        #: leaving, left
        self.phase = "new"
        #: bootstrap candidates seen: node_id -> {"raft", "transport"} (this node too)
        self.candidates: dict[str, dict] = {}
        self._lock = asyncio.Lock()  # voter changes, on the leader
        self._saved: dict | None = None
        self._peer_ids: dict[tuple[str, int], str] = {}  # probed address -> node id
        self._save_task: asyncio.Task | None = None
        self._save_lock = asyncio.Lock()

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        member, config = self.member, self.config
        try:
            stored = await asyncio.to_thread(self.store.load)
        except StoredStateError as err:
            raise self.ClusterError(str(err)) from None
        if stored is not None:
            if stored["node_id"] != self.node_id:
                raise self.ClusterError(
                    f"{self.store.path} belongs to node {stored['node_id']!r}, not "
                    f"{self.node_id!r}: start it with --node-id {stored['node_id']} or give "
                    "this node its own --data-dir")
            if stored["cluster"] != config.cluster_name:
                raise self.ClusterError(
                    f"{self.store.path} is a member of cluster {stored['cluster']!r}, not "
                    f"{config.cluster_name!r}: fix --cluster-name, or drop the stored "
                    "membership with `shoal cluster reset` (or --new-cluster)")
            if config.new_cluster:
                log.warning("new_cluster set: dropping the stored membership node=%s: %s",
                            self.node_id, describe(stored))
                await asyncio.to_thread(self.store.remove)
                stored = None
        self.stored = stored
        self.candidates[self.node_id] = {"raft": member.info["raft"],
                                         "transport": member.info["transport"]}
        if stored is not None:
            self.phase = "stored"
            log.info("stored membership found node=%s: %s", self.node_id, describe(stored))
            await self._start_from_stored(stored)
        else:
            await self._start_new()
        self.phase = "member"
        await self.save()

    async def _start_from_stored(self, stored: dict) -> None:
        me = self.member.info["raft"]
        old = (stored["members"].get(self.node_id) or {}).get("raft")
        voter = not stored["left"] and (me in stored["voters"] or old in stored["voters"])
        t0 = time.monotonic()
        next_log = t0 + PROGRESS_EVERY
        waiting_for = ""
        while True:
            addrs = await self._stored_addresses(stored)
            answers = await self._probe(addrs)
            self._check_cluster_id(answers, stored.get("cluster_id"))
            ready = [(p, a) for p, a in answers.items() if a.get("ready")]
            if ready:
                voters = ready[0][1]["voters"]
                if voter and me in voters:
                    log.info("rejoining as a voter node=%s voters=%s", self.node_id, voters)
                    # (its log names its own address: kept unless that changed)
                    self.member.start_raft(voters, keep_log=me in stored["voters"])
                    await self._take_seat(stored.get("cluster_id"), ready)
                    return
                why = "it left" if stored["left"] else (
                    "its address changed" if me not in voters and voter else "")
                log.info("joining again node=%s (%s)", self.node_id,
                         why or "no longer a voter")
                if await self._join_via(ready):
                    return
            elif voter:
                voters, waiting_for = current_voters(stored, self.node_id, me, answers)
                if voters is not None:
                    log.info("no member serves: re-forming the cluster from the stored "
                             "voters node=%s voters=%s", self.node_id, voters)
                    # a log names the voters' addresses: one with addresses that changed
                    # outside Raft (all pods recreated) would bring the old ones back as
                    # voters, so it is kept only when they are the stored ones
                    self.member.start_raft(voters, keep_log=sorted(voters) == sorted(
                        stored["voters"]))
                    outcome = await self._wait_quorum(stored)
                    if outcome == "leader":
                        await self._take_seat(stored.get("cluster_id"), [])
                        return
                    await self.member.stop_raft()
                    if outcome == "excluded":
                        voter = False  # forgotten while down: join as a new member
                    continue  # "moved": a voter is back at another address
            now = time.monotonic()
            if now >= next_log:
                next_log = now + PROGRESS_EVERY
                if voter:
                    log.warning("waiting for the stored voters node=%s (%.0fs): %s; tried %s",
                                self.node_id, now - t0, waiting_for,
                                _addr_list(addrs) or "no address")
                else:
                    log.warning("waiting for a member of cluster %r to join through node=%s "
                                "(%.0fs): tried %s; this node %s, so it joins rather than "
                                "found a cluster (`shoal cluster reset` drops the stored "
                                "membership)", self.config.cluster_name, self.node_id,
                                now - t0, _addr_list(addrs) or "no address",
                                "left the cluster" if stored["left"] else
                                "is no voter any more")
            await asyncio.sleep(0.5)

    async def _wait_quorum(self, stored: dict) -> str:
        """Wait for a Raft leader among the stored voters (as long as it takes: a node with
        stored state never founds). ``leader``; ``excluded`` when a serving cluster turns
        up that no longer has this node as a voter (it was forgotten while down);
        ``moved`` when a voter answers from another address than this Raft node has."""
        raft = self.member.raft
        me = self.member.info["raft"]
        t0 = time.monotonic()
        next_check = t0 + PROGRESS_EVERY
        while raft.status()["leader"] is None:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + PROGRESS_EVERY
                st = raft.status()
                log.warning("waiting for a quorum of the stored voters node=%s (%.0fs): %d of "
                            "%d reachable, %d needed; start the other nodes of cluster %r",
                            self.node_id, now - t0, len(st["connected"]) + 1,
                            len(st["partners"]) + 1, (len(st["partners"]) + 1) // 2 + 1,
                            self.config.cluster_name)
                answers = await self._probe(await self._stored_addresses(stored))
                mine = set(raft.voters())
                for peer, a in answers.items():
                    if a.get("ready") and me not in (a.get("voters") or ()):
                        log.warning("cluster %r serves without this node as a voter "
                                    "node=%s: joining it", self.config.cluster_name,
                                    self.node_id)
                        return "excluded"
                    if a.get("phase") == "stored" and a.get("raft") not in mine:
                        log.warning("voter %s is back at %s node=%s: starting Raft again "
                                    "with its new address", peer, a.get("raft"), self.node_id)
                        return "moved"
            await asyncio.sleep(0.05)
        return "leader"

    async def _start_new(self) -> None:
        member, config = self.member, self.config
        seeds = self._seeds()
        own = (member.host, config.cluster_port)
        discovery = member.discovery
        if not seeds and discovery is None:
            if config.bootstrap_expect > 1:
                raise self.ClusterError(
                    f"bootstrap_expect is {config.bootstrap_expect} but there is no --join "
                    "or mDNS to find the other nodes with")
            await self._found()
            return
        if discovery is not None and not seeds and not config.bootstrap_expect:
            found = await discovery.wait_for_peers(1, 3.0)
            # the nodes starting together: the one with the smallest id that has not
            # formed a cluster yet founds it; the others join through the peers
            formed = [n for n, (_, _, p) in found.items() if p.get("formed") == "1"]
            if not formed and all(self.node_id < n for n in found):
                await self._found()
                return
        t0 = time.monotonic()
        next_log = t0 + PROGRESS_EVERY
        last_err = "no answer"
        expect = config.bootstrap_expect
        while True:
            # names are looked up again every round: a pod or container started at the
            # same time may not resolve yet
            addrs = await self._resolve(seeds)
            if not config.bootstrap_expect and own in addrs:
                expect = len(seeds)  # the join list names this node: the initial members
            probe = [a for a in addrs if a != own]
            for c in list(self.candidates.values()):
                a = _split(c["transport"])
                if a != own and a not in probe:
                    probe.append(a)
            if discovery is not None:
                for _n, (h, p, _props) in sorted(discovery.peers().items()):
                    if (h, p) not in probe and (h, p) != own:
                        probe.append((h, p))
            answers = await self._probe(probe)
            ready = [(p, a) for p, a in answers.items() if a.get("ready")]
            if ready:
                if await self._join_via(ready):
                    return
                last_err = "the join was not accepted yet"
            elif expect:
                self._gather_candidates(answers)
                if len(self.candidates) >= expect:
                    chosen = sorted(self.candidates)[:expect]
                    if self.node_id in chosen:
                        voters = [self.candidates[n]["raft"] for n in chosen]
                        log.info("forming a new cluster node=%s voters=%s (bootstrap_expect "
                                 "%d)", self.node_id, ",".join(chosen), expect)
                        self.phase = "forming"
                        member.start_raft(voters)
                        await self._wait_leader(60.0, "the nodes forming the cluster")
                        await self._take_seat(None, [])
                        return
            else:
                last_err = "; ".join(f"{p}: {a.get('phase')}" for p, a in answers.items()) \
                    or f"no answer from {_addr_list(probe) or 'any seed (none resolves)'}"
            now = time.monotonic()
            if not expect and now - t0 > JOIN_LIMIT:
                raise self.ClusterError(
                    f"could not join the cluster through {config.join or 'mDNS'} in "
                    f"{JOIN_LIMIT:.0f}s ({last_err}); check --join, that those nodes run, and "
                    "the cluster name and secret")
            if now >= next_log:
                next_log = now + PROGRESS_EVERY
                if expect:
                    log.info("bootstrap node=%s: %d of %d nodes seen (%s); waiting for the "
                             "others", self.node_id, len(self.candidates), expect,
                             ",".join(sorted(self.candidates)))
                else:
                    log.info("waiting to join node=%s (%.0fs): %s", self.node_id, now - t0,
                             last_err)
            await asyncio.sleep(0.3)

    def _gather_candidates(self, answers: dict) -> None:
        for peer, a in answers.items():
            if a.get("phase") in ("new", "forming"):
                self.candidates.setdefault(peer, {"raft": a["raft"],
                                                  "transport": a["transport"]})
                for n, c in (a.get("candidates") or {}).items():
                    if n != self.node_id:
                        self.candidates.setdefault(n, dict(c))

    async def _found(self) -> None:
        log.info("founding a new cluster node=%s name=%s", self.node_id,
                 self.config.cluster_name)
        self.phase = "forming"
        self.member.start_raft([])
        await self._wait_leader(10.0, "this node alone")
        await self._take_seat(None, [])

    async def _take_seat(self, cluster_id: str | None, ready: list) -> None:
        """Raft runs with this node among its voters: agree on the cluster id, put this
        node's member entry in the table and take the retained messages."""
        member = self.member
        raft = member.raft
        if raft.status()["leader"] is None:
            await self._wait_leader(60.0, "the cluster")
        agreed = await self._commit_init(raft, cluster_id or uuid.uuid4().hex)
        if cluster_id is not None and agreed != cluster_id:
            raise self.ClusterError(
                f"this node's stored membership is of cluster id {cluster_id}, but its Raft "
                f"peers form cluster {agreed}: two clusters met under the name "
                f"{self.config.cluster_name!r}; drop one node's membership with `shoal "
                "cluster reset` and let it join the other")
        try:
            await raft.run(("member", self.node_id, member.info), 10.0)
        except RaftUnavailable as err:
            raise self.ClusterError(f"joining the routing table failed: {err}") from err
        await member.wait_member(self.node_id, 15.0)
        for peer, _a in ready[:1]:
            await member.fetch_retained(peer)

    async def _commit_init(self, raft, cluster_id: str, tries: int = 6) -> str:
        """Commit ``init`` and return the cluster id the table holds. A node rejoining a
        busy cluster sees it only once it has applied the whole log behind it; pysyncobj's
        follower may throw away a stretch it applied already when a stale append arrives
        (it logs "truncating already-applied log entries") and fetch it again, so one 10 s
        wait is not always enough: retry while a leader is known, up to ``tries`` times."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await raft.run(("init", cluster_id), 10.0)
            except RaftUnavailable as err:
                st = raft.status()
                if attempt >= tries or st["leader"] is None:
                    raise self.ClusterError(
                        f"the cluster id could not be committed: {err} (leader "
                        f"{st['leader']}, applied {st['last_applied']}, commit index "
                        f"{st['commit_index']}); check that a quorum of the members named "
                        "in cluster.json is up and reachable") from err
                log.warning("still catching up with the Raft log node=%s attempt=%d "
                            "applied=%d commit_index=%d leader=%s", self.node_id, attempt,
                            st["last_applied"], st["commit_index"], st["leader"])

    async def _join_via(self, ready: list) -> bool:
        """Ask serving members to add this node (they forward to the leader)."""
        member = self.member
        self.phase = "joining"
        for peer, answer in ready:
            if member.raft is None:
                # pysyncobj's order: our Raft node runs before the leader adds it
                member.start_raft(answer["voters"])
            try:
                answer = await member.transport.request(
                    peer, "join", {"node_id": self.node_id, "info": member.info}, 60.0)
            except LINK_ERRORS as err:
                log.info("join through %s failed node=%s: %r", peer, self.node_id, err)
                continue
            if isinstance(answer, dict) and "refused" in answer:
                log.warning("join refused by %s node=%s: %s", peer, self.node_id,
                            answer["refused"])
                continue
            await member.wait_member(self.node_id, 15.0)
            cid = member.view.cluster_id
            stored_id = (self.stored or {}).get("cluster_id")
            if stored_id and cid and cid != stored_id:
                log.warning("joined cluster id=%s node=%s; the stored membership named id=%s",
                            cid, self.node_id, stored_id)
            await member.fetch_retained(peer)
            return True
        return False

    async def _wait_leader(self, timeout: float, whom: str) -> None:
        raft = self.member.raft
        t0 = time.monotonic()
        next_log = t0 + PROGRESS_EVERY
        while raft.status()["leader"] is None:
            now = time.monotonic()
            if now - t0 >= timeout:
                raise self.ClusterError(f"no Raft leader elected among {whom} in "
                                        f"{timeout:.0f}s")
            if now >= next_log:
                next_log = now + PROGRESS_EVERY
                st = raft.status()
                log.info("waiting for a Raft leader node=%s: %d of %d voters reachable",
                         self.node_id, len(st["connected"]) + 1, len(st["partners"]) + 1)
            await asyncio.sleep(0.05)

    # -- probing -----------------------------------------------------------------------------

    def _seeds(self) -> list[str]:
        return [s.strip() for s in self.config.join.split(",") if s.strip()]

    async def _resolve(self, seeds: list[str]) -> list[tuple[str, int]]:
        if not seeds:
            return []
        try:
            return await resolve_seeds(seeds, self.config.cluster_port)
        except ValueError as err:
            raise self.ClusterError(f"--join {self.config.join!r}: {err}") from err

    async def _stored_addresses(self, stored: dict) -> list[tuple[str, int]]:
        seeds = self._seeds()
        own = (self.member.host, self.config.cluster_port)
        addrs = [_split(m["transport"]) for n, m in sorted(stored["members"].items())
                 if n != self.node_id and m.get("transport")]
        for a in await self._resolve(seeds):
            if a not in addrs:
                addrs.append(a)
        return [a for a in addrs if a != own]

    async def _probe(self, addrs: list[tuple[str, int]]) -> dict[str, dict]:
        """``cluster_info`` from every address that answers: node id -> answer."""
        transport = self.member.transport

        async def one(addr):
            peer = self._peer_ids.get(addr)
            try:
                if peer is None or not transport.is_up(peer):
                    peer, _info = await transport.hello(addr[0], addr[1], PROBE_TIMEOUT)
                    self._peer_ids[addr] = peer
                return peer, await transport.request(peer, "cluster_info", self._whoami(),
                                                     PROBE_TIMEOUT)
            except LINK_ERRORS as err:
                log.debug("probe %s:%d failed node=%s: %r", addr[0], addr[1], self.node_id,
                          err)
                return None
        results = await asyncio.gather(*(one(a) for a in addrs))
        return {peer: answer for peer, answer in filter(None, results)
                if peer != self.node_id and isinstance(answer, dict)}

    def _check_cluster_id(self, answers: dict, cluster_id: str | None) -> None:
        if cluster_id is None:
            return
        for peer, a in answers.items():
            other = a.get("cluster_id")
            if a.get("ready") and other and other != cluster_id:
                raise self.ClusterError(
                    f"{peer} serves cluster id {other}, but this node's stored membership is "
                    f"of cluster id {cluster_id}: two clusters run under the name "
                    f"{self.config.cluster_name!r}. Drop this node's membership with `shoal "
                    "cluster reset` to make it join the running one")

    def _whoami(self) -> dict:
        info = self.member.info
        return {"node_id": self.node_id, "phase": self.phase, "raft": info["raft"],
                "transport": info["transport"]}

    def info(self, asking: dict | None = None) -> dict:
        """The ``cluster_info`` answer: what a starting node needs to know about this one
        (answered in every phase, before this node is a member too). A new node that asks
        is a bootstrap candidate too, even if this one cannot resolve its name yet."""
        if asking and self.phase in ("new", "forming") and \
                asking.get("phase") in ("new", "forming") and asking.get("node_id"):
            self.candidates.setdefault(asking["node_id"], {
                "raft": asking["raft"], "transport": asking["transport"]})
        member = self.member
        raft = member.raft
        ready = member.ready and raft is not None and self.phase == "member"
        status = raft.status() if raft is not None and self.phase != "left" else None
        ready = ready and status is not None and status["leader"] is not None
        return {
            "node_id": self.node_id,
            "phase": self.phase,
            "ready": ready,
            "cluster_id": member.view.cluster_id or (self.stored or {}).get("cluster_id"),
            "voters": raft.voters() if ready else None,
            "leader": member.leader_id(),
            "raft": member.info["raft"],
            "transport": member.info["transport"],
            "candidates": dict(self.candidates) if self.phase in ("new", "forming") else {},
        }

    # -- on disk -----------------------------------------------------------------------------

    def state(self) -> dict:
        member = self.member
        stored = self.stored or {}
        members = {n: {"transport": m.get("transport"), "raft": m.get("raft")}
                   for n, m in member.view.members.items()}
        raft = member.raft
        return {
            "cluster": self.config.cluster_name,
            "cluster_id": member.view.cluster_id or stored.get("cluster_id"),
            "node_id": self.node_id,
            "raft": member.info["raft"],
            "voters": raft.voters() if raft is not None and self.phase != "left"
            else stored.get("voters", []),
            "members": members or stored.get("members", {}),
            "left": self.phase == "left",
        }

    def save_soon(self) -> None:
        """The members or voters changed: write the file now (in the background)."""
        if self.phase in ("member", "leaving") and (
                self._save_task is None or self._save_task.done()):
            self._save_task = asyncio.get_running_loop().create_task(self._save_logged())

    async def _save_logged(self) -> None:
        try:
            await self.save()
        except OSError as err:
            log.error("membership not saved node=%s: %r (a restart may need --join)",
                      self.node_id, err)

    async def save(self) -> None:
        """Write the membership if it changed since the last write (one write at a time)."""
        async with self._save_lock:
            state = self.state()
            if state == self._saved:
                return
            await asyncio.to_thread(self.store.save, state)
            self._saved = state
            self.stored = state

    # -- voter changes (on the leader) -------------------------------------------------------

    async def on_leader(self, kind: str, body: dict, timeout: float):
        """Run a voter change on the Raft leader: here, or forwarded to it."""
        member = self.member
        if self.phase not in ("member", "leaving"):
            raise RuntimeError(f"{self.node_id} is not a cluster member yet; retry")
        deadline = time.monotonic() + timeout
        while True:
            status = member.raft.status()
            if status["is_leader"]:
                return await self._as_leader(kind, body)
            leader = member.leader_id()
            if leader is not None and leader != self.node_id:
                try:
                    answer = await member.transport.request(
                        leader, kind, dict(body, forwarded=True),
                        max(1.0, deadline - time.monotonic()))
                    if isinstance(answer, dict) and "refused" in answer:
                        raise MembershipError(answer["status"], answer["refused"])
                    return answer
                except RemoteError as err:
                    if "not the leader" not in str(err) or time.monotonic() >= deadline:
                        raise
            elif time.monotonic() >= deadline:
                raise RuntimeError("no Raft leader to run the change on (no quorum?)")
            await asyncio.sleep(0.1)

    async def handle(self, kind: str, body: dict):
        """A voter change request from another node; a refusal travels back as
        ``{"refused": why, "status": http_status}``."""
        try:
            if body.get("forwarded"):
                if self.member.raft is None or not self.member.raft.status()["is_leader"]:
                    raise RuntimeError(f"{self.node_id} is not the leader; retry")
                return await self._as_leader(kind, body)
            return await self.on_leader(kind, body, 60.0)
        except MembershipError as err:
            return {"refused": str(err), "status": err.status}

    async def _as_leader(self, kind: str, body: dict):
        async with self._lock:
            if kind == "join":
                return await self._add(body["node_id"], body["info"])
            if kind == "remove_member":
                return await self._remove(body["node_id"], body["raft"])
            if kind == "forget":
                return await self._forget(body["node"])
        raise ValueError(f"unknown voter change {kind!r}")

    async def _add(self, node_id: str, info: dict) -> dict:
        member = self.member
        raft = member.raft
        known = member.view.members.get(node_id)
        old = known.get("raft") if known is not None else None
        if old is not None and old != info["raft"] and old in raft.voters():
            log.info("voter replaced node=%s peer=%s old=%s new=%s", self.node_id, node_id,
                     old, info["raft"])
            await self._change(raft.remove_raft_member, old)
        if info["raft"] not in raft.voters():
            await self._change(raft.add_raft_member, info["raft"])
        await raft.run(("member", node_id, info), 10.0)
        return {"members": member.view.members, "voters": raft.voters()}

    async def _remove(self, node_id: str, raft_addr: str) -> dict:
        member = self.member
        raft = member.raft
        if raft_addr == member.info["raft"]:
            raise RuntimeError(f"{self.node_id} is the leader; it cannot remove itself "
                               "(transfer the leadership first)")
        if raft_addr in raft.voters():
            why = await self._majority_without(raft_addr)
            if why is not None:
                raise RuntimeError(why)
            await self._change(raft.remove_raft_member, raft_addr)
        # as ``forget``: what it still owned or held (a leave --force) is released
        await raft.run(("forget", node_id), 10.0)
        log.info("member removed node=%s peer=%s voters=%s", self.node_id, node_id,
                 raft.voters())
        return {"voters": raft.voters()}

    async def _forget(self, node: str) -> dict:
        member = self.member
        raft = member.raft
        view = member.view
        voters = raft.voters()
        if node in view.members:
            node_id, raft_addr = node, view.members[node].get("raft")
        elif node in voters:
            node_id, raft_addr = None, node  # a voter no member entry names (a ghost)
            owner = [n for n, m in view.members.items() if m.get("raft") == node]
            if owner:
                node_id = owner[0]
        else:
            raise MembershipError(404, f"{node} is neither a member nor a Raft voter; "
                                  "`shoal cluster status` lists both")
        if node_id == self.node_id or raft_addr == member.info["raft"]:
            raise MembershipError(409, f"{node} is running (it is the Raft leader): make it "
                                  "leave instead (`shoal cluster leave`)")
        if node_id is not None and member.peer_alive(node_id) or \
                raft_addr in raft.status()["connected"]:
            admin = (view.members.get(node_id) or {}).get("admin")
            admin = f"http://{admin}" if admin else "ITS_ADMIN_URL"
            raise MembershipError(409, f"{node} is running (linked to the leader, or lost "
                                  "less than 2 s ago): make it leave instead (`shoal cluster "
                                  f"leave --admin {admin}`); forget is for nodes that are gone "
                                  "for good")
        if raft_addr in voters:
            why = await self._majority_without(raft_addr)
            if why is not None:
                raise MembershipError(409, why)
            await self._change(raft.remove_raft_member, raft_addr)
        held = [c for c, h in view.holders.items() if h == node_id]
        released = await raft.run(("forget", node_id), 10.0) if node_id is not None else []
        promoted = sum(1 for c in held if view.holders.get(c) not in (None, node_id))
        log.warning("node forgotten node=%s forgotten=%s raft=%s sessions_promoted=%d "
                    "sessions_released=%d voters=%s", self.node_id, node_id, raft_addr,
                    promoted, len(released), raft.voters())
        return {"forgotten": node_id or raft_addr, "raft": raft_addr,
                "voters": raft.voters(), "sessions_released": len(released),
                "sessions_promoted": promoted}

    def _quorum_without(self, addr: str) -> str | None:
        """Why removing voter ``addr`` now would leave the others without a majority that
        can commit (then nothing would commit again), or None. Checked on this node's view:
        itself and the voters it is connected to."""
        raft = self.member.raft
        st = raft.status()
        rest = [v for v in raft.voters() if v != addr]
        reachable = [v for v in rest if v == st["self"] or v in st["connected"]]
        if len(reachable) * 2 > len(rest):
            return None
        down = sorted(set(rest) - set(reachable))
        return (f"without {addr} the Raft voters would be {len(rest)}, of which "
                f"{len(reachable)} are reachable: no majority (down: {', '.join(down)}). "
                "Bring those nodes back, or remove the dead ones first (`shoal cluster "
                "forget NODE`)")

    async def _majority_without(self, addr: str, wait: float = 3.0) -> str | None:
        """``_quorum_without``, given ``wait`` seconds for Raft links still being made (a
        voter that just came back at a new address): refusing is safe, a removal that
        leaves no majority is not."""
        deadline = time.monotonic() + wait
        while True:
            why = self._quorum_without(addr)
            if why is None or time.monotonic() >= deadline:
                return why
            await asyncio.sleep(0.1)

    async def _change(self, method, addr: str) -> None:
        """One voter change, committed; pysyncobj refuses one while another (or a new
        leader's first entry) is in flight: retried until CHANGE_TIMEOUT."""
        deadline = time.monotonic() + CHANGE_TIMEOUT
        while True:
            try:
                await method(addr, 10.0)
                return
            except RaftUnavailable as err:
                if time.monotonic() >= deadline:
                    raise
                log.info("voter change retried node=%s addr=%s: %s", self.node_id, addr, err)
                await asyncio.sleep(0.2)

    async def forget(self, node: str) -> dict:
        """``shoal cluster forget NODE`` / ``DELETE /api/v1/nodes/{id}`` on this node."""
        try:
            return await self.on_leader("forget", {"node": node}, 30.0)
        except (RaftUnavailable, RuntimeError, *LINK_ERRORS) as err:
            raise MembershipError(503, f"forget {node} failed: {err}; it needs a Raft quorum "
                                  "and a leader (`shoal cluster status`)") from None

    # -- leaving -----------------------------------------------------------------------------

    async def leave(self, force: bool = False, timeout: float = 60.0) -> dict:
        member = self.member
        broker = member.broker
        if self.phase == "left":
            raise MembershipError(409, f"{self.node_id} has left the cluster already; stop "
                                  "its process")
        if self.phase == "leaving":
            raise MembershipError(409, f"{self.node_id} is already leaving the cluster")
        others = [n for n in member.view.members if n != self.node_id]
        if not others:
            raise MembershipError(409, f"{self.node_id} is the only member: there is nobody "
                                  "to hand its sessions to; stop the node instead")
        self.phase = "leaving"  # a second leave request is refused from here on
        why = await self._majority_without(member.info["raft"])
        if why is not None:
            self.phase = "member"
            raise MembershipError(409, f"{self.node_id} cannot leave now: {why}")
        member.leaving = True
        t0 = time.monotonic()
        try:
            await member.raft.run(("member", self.node_id,
                                   dict(member.info, status="leaving")), 10.0)
        except RaftUnavailable as err:
            self._stay(f"marking it leaving failed: {err}")
            raise MembershipError(503, f"{self.node_id} cannot leave: no Raft quorum ({err})"
                                  ) from None
        # /readyz answers 503 from now on: let the load balancer's health checks see it
        # before the clients reconnect, or they may be sent back here
        await asyncio.sleep(self.config.drain_delay)
        connected = len(broker.clients)
        broker.kick_all(ReasonCode.USE_ANOTHER_SERVER, send_will=False)
        moved, not_moved = await self.evacuate(t0 + timeout)
        if not_moved and not force:
            self._stay(f"{len(not_moved)} sessions could not be moved")
            await self._unmark()
            raise MembershipError(409, f"{self.node_id} did not leave: {len(not_moved)} "
                                  "sessions could not be moved to other nodes (listed); it "
                                  "serves on. Retry, or `shoal cluster leave --force` to leave "
                                  "them behind (their clients then start new sessions)",
                                  not_moved=not_moved[:1000], moved=moved)
        await self._wait_outgoing(t0 + timeout)
        try:
            await self._step_down()
            answer = await self._removal(max(10.0, t0 + timeout - time.monotonic()))
        except (RaftUnavailable, RuntimeError, *LINK_ERRORS) as err:
            self._stay(f"removal failed: {err!r}")
            await self._unmark()
            raise MembershipError(503, f"{self.node_id} did not leave: the cluster could not "
                                  f"remove it from the Raft voters ({err}); it serves on. "
                                  "Check `shoal cluster status` (a quorum is needed) and "
                                  "retry") from None
        self.phase = "left"
        member.ready = False
        await member.stop_raft()
        await member.after_leaving()
        await self.save()
        log.info("left the cluster node=%s sessions_moved=%d left_behind=%d connections=%d "
                 "voters=%s", self.node_id, moved, len(not_moved), connected,
                 answer.get("voters"))
        return {"left": True, "node": self.node_id, "sessions_moved": moved,
                "sessions_not_moved": len(not_moved), "not_moved": not_moved[:1000],
                "connections_closed": connected, "voters": answer.get("voters"),
                "seconds": round(time.monotonic() - t0, 2)}

    def _stay(self, why: str) -> None:
        log.warning("leave abandoned node=%s: %s; serving on", self.node_id, why)
        self.phase = "member"
        self.member.leaving = False

    async def _unmark(self) -> None:
        try:
            await self.member.raft.run(("member", self.node_id, self.member.info), 10.0)
        except RaftUnavailable as err:
            log.warning("member entry still says leaving node=%s: %s", self.node_id, err)

    async def evacuate(self, deadline: float) -> tuple[int, list[str]]:
        """Hand every session held here to the other nodes, spread evenly: the offline
        ones are adopted (claimed and taken over without a client), the ones being taken
        over already (their clients reconnected elsewhere) are waited for."""
        member = self.member
        total = len(self._held_here())
        if not total:
            return 0, []
        log.info("evacuating sessions node=%s count=%d", self.node_id, total)
        for attempt in range(3):
            targets = sorted(n for n, m in member.view.members.items()
                             if n != self.node_id and m.get("status") != "leaving"
                             and member.transport.is_up(n))
            if not targets or time.monotonic() >= deadline:
                break
            offline = [cid for cid in self._held_here() if self._offline(cid)]
            if offline:
                per = {t: offline[i::len(targets)] for i, t in enumerate(targets)}
                await asyncio.gather(*(self._adopt_on(t, cids, deadline)
                                       for t, cids in per.items() if cids))
            # the others move with their clients' claims (or just did): wait for those
            limit = min(deadline, time.monotonic() + self.config.takeover_timeout
                        + self.config.barrier_timeout)
            while time.monotonic() < limit:
                held = self._held_here()
                if not held or all(self._offline(c) for c in held):
                    break
                await asyncio.sleep(0.05)
            if not self._held_here():
                break
            log.info("evacuation round %d left %d sessions node=%s", attempt + 1,
                     len(self._held_here()), self.node_id)
        not_moved = sorted(self._held_here())
        return total - len(not_moved), not_moved

    def _held_here(self) -> list[str]:
        """ClientIDs the table says are held here and that have a session here."""
        me = self.node_id
        sessions = self.member.broker.sessions
        return [cid for cid, h in self.member.view.holders.items()
                if h == me and cid in sessions]

    def _offline(self, client_id: str) -> bool:
        session = self.member.broker.sessions.get(client_id)
        return session is not None and session.state is SessionState.OFFLINE

    async def _adopt_on(self, target: str, cids: list[str], deadline: float) -> None:
        for i in range(0, len(cids), ADOPT_BATCH):
            batch = cids[i:i + ADOPT_BATCH]
            remaining = deadline - time.monotonic()
            if remaining <= 1.0:
                return
            try:
                result = await self.member.transport.request(
                    target, *encode(Adopt(batch)), remaining)
            except LINK_ERRORS as err:
                log.warning("hand-over of %d sessions to %s failed node=%s: %r", len(batch),
                            target, self.node_id, err)
                return
            failed = {c: r for c, r in result.items() if r not in ("moved", "gone")}
            if failed:
                log.info("sessions not taken by %s node=%s count=%d e.g. %s", target,
                         self.node_id, len(failed), next(iter(failed.items())))

    async def _wait_outgoing(self, deadline: float) -> None:
        """Hand-overs whose late messages are still to be delivered from here."""
        takeovers = self.member.takeovers
        while takeovers.outgoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if takeovers.outgoing:
            log.warning("leaving with %d hand-overs unfinished node=%s", len(takeovers.outgoing),
                        self.node_id)

    async def _step_down(self, timeout: float = 20.0) -> None:
        """Hand the Raft leadership to another voter (a leader cannot remove itself), and
        wait until another node leads. The old leader may win the election that follows
        a transfer (its log is the longest): then it transfers again."""
        raft = self.member.raft
        deadline = time.monotonic() + timeout
        while True:
            leader = self.member.leader_id()
            if leader is not None and leader != self.node_id:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the Raft leadership could not be handed over in "
                                   f"{timeout:.0f}s (leader now: {leader})")
            if raft.status()["is_leader"]:
                try:
                    await raft.transfer_leadership(5.0)
                    log.info("leadership transfer asked node=%s", self.node_id)
                except RaftUnavailable as err:
                    log.info("leadership transfer retried node=%s: %s", self.node_id, err)
                t = time.monotonic() + 1.0
                while raft.status()["is_leader"] and time.monotonic() < t:
                    await asyncio.sleep(0.02)
            else:
                await asyncio.sleep(0.05)

    async def _removal(self, timeout: float) -> dict:
        member = self.member
        body = {"node_id": self.node_id, "raft": member.info["raft"]}
        answer = await self.on_leader("remove_member", body, timeout)
        if member.info["raft"] in answer.get("voters", []):
            raise RuntimeError(f"still a voter after the removal: {answer.get('voters')}")
        return answer

    # -- adopting (the receiving side of an evacuation) --------------------------------------

    async def adopt(self, client_ids: list[str]) -> dict:
        if self.phase != "member":
            return {cid: f"{self.node_id} is {self.phase}" for cid in client_ids}
        sem = asyncio.Semaphore(ADOPT_PARALLEL)
        takeovers = self.member.takeovers

        async def one(cid: str) -> str:
            async with sem:
                return await takeovers.adopt(cid)
        results = await asyncio.gather(*(one(c) for c in client_ids))
        return dict(zip(client_ids, results))


def current_voters(stored: dict, node_id: str, raft: str,
                   answers: dict) -> tuple[list | None, str]:
    """The stored voters at their current addresses, by node id (``None`` while that
    cannot be known yet), and what is waited for. ``answers``: node id -> the
    ``cluster_info`` of the peers that answered. Nodes back at their stored addresses
    re-form at once; when any voter's address changed (pods back with new IPs), every
    stored voter must have answered first, so that all of them start Raft with the same
    configuration."""
    by_addr = {m.get("raft"): n for n, m in stored["members"].items()}
    cluster_id = stored.get("cluster_id")
    seen = {p: a["raft"] for p, a in answers.items()
            if a.get("phase") == "stored" and a.get("raft")
            and (not cluster_id or a.get("cluster_id") in (None, cluster_id))}
    current, missing, moved = [], [], False
    for addr in stored["voters"]:
        node = by_addr.get(addr)
        if node == node_id:
            now = raft
        elif node in seen:
            now = seen[node]
        else:
            now = addr
            if node is not None:
                missing.append(node)
        moved = moved or now != addr
        current.append(now)
    if moved and missing:
        return None, (f"voters moved to new addresses: waiting for all of them to answer, "
                      f"missing {', '.join(sorted(missing))}")
    return sorted(set(current)), ""


def _split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _addr_list(addrs) -> str:
    return ",".join(f"{h}:{p}" for h, p in addrs)
