"""Finding candidate peers: static seeds, DNS names, and mDNS (zeroconf) on a LAN.

Discovery only finds *candidates*. Whether a candidate is alive, and whether it is a
member, is Raft's business: a node killed without a goodbye stays listed by mDNS for as
long as its records live in the other nodes' caches (the PTR record's TTL is 75 minutes).
``MdnsDiscovery.peers()`` therefore means "seen", and the caller copes with peers that do
not answer.

Seeds
-----
``resolve_seeds(["10.0.0.5:7000", "shoal-headless.ns.svc:7000", "[fd00::3]", "node-b"], 7000)``
turns every entry into ``(address, port)`` pairs. A DNS name yields one pair per address it
resolves to (IPv4 and IPv6), which is how a Kubernetes headless service lists its pods.
Names are resolved with ``loop.getaddrinfo`` (the resolver runs in the loop's executor,
never on the loop), concurrently, all within one deadline.

mDNS
----
Every node registers ``<node_id>._shoal._tcp.local.`` with its cluster address and port and
a TXT record ``{cluster, node_id, ...properties}``, and browses ``_shoal._tcp.local.``. Peers
whose TXT names another cluster are ignored, and so is the node itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

from zeroconf import IPVersion, NonUniqueNameException, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger("shoal.discovery")

__all__ = ("MdnsDiscovery", "parse_seed", "resolve_seeds")

# --------------------------------------------------------------------------- seeds


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit():
        raise ValueError(f"seed {entry!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"seed {entry!r}: port {port} is outside 1-65535")
    return port


def parse_seed(entry: str, default_port: int) -> tuple[str, int]:
    """Split one seed into ``(host, port)`` without resolving it.

    Accepted forms: ``host``, ``host:port``, ``1.2.3.4[:port]``, ``[v6]``, ``[v6]:port``
    and a bare IPv6 literal (``fd00::1``, which takes ``default_port``: a port after an
    IPv6 address needs brackets). Anything else raises ValueError."""
    text = entry.strip()
    if not text:
        raise ValueError("empty seed")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"seed {entry!r}: missing ']'")
        host, rest = text[1:close], text[close + 1:]
        if not isinstance(_literal_ip(host), ipaddress.IPv6Address):
            raise ValueError(f"seed {entry!r}: {host!r} in brackets is not an IPv6 address")
        if rest == "":
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"seed {entry!r}: unexpected {rest!r} after ']'")
        return host, _parse_port(rest[1:], entry)
    colons = text.count(":")
    if colons == 0:
        host, port = text, default_port
    elif colons == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, entry)
    else:
        if _literal_ip(text) is None:
            raise ValueError(f"seed {entry!r}: more than one ':' and not an IPv6 address "
                             "(write [address]:port)")
        return text, default_port
    if not host:
        raise ValueError(f"seed {entry!r}: empty host")
    if _literal_ip(host) is None:
        # A DNS name: letters, digits, '-', '_' and '.' only (no spaces, no '/', no '@').
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if not set(host) <= allowed or ".." in host or host.startswith("."):
            raise ValueError(f"seed {entry!r}: {host!r} is not a host name or IP address")
    return host, port


def _address_sort_key(address: str) -> tuple[int, bytes, str]:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.version, ip.packed, address


async def _resolve_name(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[str]:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    addresses = {str(sockaddr[0]) for family, _t, _p, _c, sockaddr in infos
                 if family in (socket.AF_INET, socket.AF_INET6)}
    # DNS servers rotate the records of a name: sort so that one set of addresses always
    # gives one order (IPv4 first, then IPv6, each by numeric value).
    return sorted(addresses, key=_address_sort_key)


async def resolve_seeds(seeds: list[str], default_port: int,
                        timeout: float = 5.0) -> list[tuple[str, int]]:
    """Resolve seed entries to ``(address, port)`` pairs, deduplicated, in seed order.

    Literal IPs pass through unresolved. A name yields one pair per address (sorted: IPv4,
    then IPv6). A name that does not resolve within ``timeout`` (one deadline shared by
    all names, which are resolved concurrently) or does not resolve at all is logged and
    skipped. A syntactically bad entry raises ValueError before anything is resolved."""
    parsed = [parse_seed(entry, default_port) for entry in seeds]
    loop = asyncio.get_running_loop()
    names = {(host, port) for host, port in parsed if _literal_ip(host) is None}
    tasks = {key: asyncio.ensure_future(_resolve_name(loop, *key)) for key in names}
    resolved: dict[tuple[str, int], list[str]] = {}
    if tasks:
        done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        for task in pending:
            task.cancel()  # the executor thread finishes on its own; nobody waits for it
        for (host, port), task in tasks.items():
            if task in pending:
                log.warning("seed %s:%d did not resolve within %.1fs; skipped", host, port,
                            timeout)
            elif task.exception() is not None:
                log.warning("seed %s:%d does not resolve (%s); skipped", host, port,
                            task.exception())
            else:
                resolved[(host, port)] = task.result()
                log.debug("seed %s:%d resolves to %s", host, port, task.result())
    result: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    for host, port in parsed:
        ip = _literal_ip(host)
        addresses = [str(ip)] if ip is not None else resolved.get((host, port), [])
        for address in addresses:
            if (address, port) not in seen:
                seen.add((address, port))
                result.append((address, port))
    return result


# --------------------------------------------------------------------------- mDNS

#: How long one peer's SRV/TXT/A records may take to arrive after its PTR (milliseconds).
_RESOLVE_TIMEOUT_MS = 3000
#: Bound on registering (probing + announcing takes about 1.5 s) and on unregistering.
_REGISTER_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class MdnsDiscovery(ServiceListener):
    """Advertise this node on the LAN and list the nodes of the same cluster that are seen.

    Usage (inside a running event loop)::

        discovery = MdnsDiscovery("prod", "node-1", "10.0.0.5", 7000)
        await discovery.start()
        peers = await discovery.wait_for_peers(2, timeout=5.0)   # node_id -> (addr, port, txt)
        ...
        discovery.update_properties({"formed": "1"})
        await discovery.stop()

    ``peers()`` lists nodes that were *seen*: one that was killed stays listed until its
    records expire from the cache. One that stops cleanly sends a goodbye and disappears
    from the others' lists about a second later."""

    SERVICE_TYPE = "_shoal._tcp.local."
    RESERVED_KEYS = frozenset({"cluster", "node_id"})

    def __init__(self, cluster_name: str, node_id: str, address: str, cluster_port: int, *,
                 interfaces: list[str] | None = None,
                 properties: dict[str, str] | None = None) -> None:
        if not cluster_name:
            raise ValueError("cluster_name must not be empty")
        if not node_id or "." in node_id or len(node_id.encode()) > 63:
            raise ValueError(f"node_id {node_id!r} must be 1-63 bytes without '.' "
                             "(it is the mDNS instance name)")
        ip = _literal_ip(address)
        if ip is None or ip.is_unspecified:
            raise ValueError(f"address {address!r} must be an IP address peers can reach")
        if not 1 <= cluster_port <= 65535:
            raise ValueError(f"cluster_port {cluster_port} is outside 1-65535")
        self.cluster_name = cluster_name
        self.node_id = node_id
        self.address = str(ip)
        self.cluster_port = cluster_port
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.instance_name = f"{node_id}.{self.SERVICE_TYPE}"
        self._properties = self._checked(properties or {})
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._peers: dict[str, tuple[str, int, dict]] = {}
        self._peer_of_name: dict[str, str] = {}       # mDNS instance name -> node_id
        self._resolving: dict[str, asyncio.Task] = {}  # instance name -> its resolve task
        self._tasks: set[asyncio.Task] = set()         # TXT updates in flight
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Register this node and start browsing. Raises RuntimeError when another node
        on the LAN already advertises the same node_id (in any cluster)."""
        if self._aiozc is not None:
            return
        self._loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self.interfaces is not None:
            kwargs["interfaces"] = self.interfaces
        self._aiozc = AsyncZeroconf(**kwargs)
        self._info = self._service_info()
        started = time.monotonic()
        # Browse first: finding the others overlaps the ~1.5 s of probing and announcing.
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, self.SERVICE_TYPE,
                                            listener=self)
        try:
            announced = await asyncio.wait_for(
                self._aiozc.async_register_service(self._info), _REGISTER_TIMEOUT)
            await asyncio.wait_for(announced, _REGISTER_TIMEOUT)
        except NonUniqueNameException as exc:
            await self._abort_start()
            raise RuntimeError(f"another node on this LAN already advertises node id "
                               f"{self.node_id!r} ({self.instance_name})") from exc
        except BaseException:
            await self._abort_start()
            raise
        log.info("mdns started node=%s cluster=%s address=%s:%d interfaces=%s "
                 "registered_in=%.2fs", self.node_id, self.cluster_name, self.address,
                 self.cluster_port, self.interfaces or "all", time.monotonic() - started)

    async def stop(self) -> None:
        """Withdraw this node (a goodbye packet) and close the sockets. Idempotent."""
        if self._aiozc is None:
            return
        for task in [*self._resolving.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._resolving.values(), *self._tasks, return_exceptions=True)
        self._resolving.clear()
        self._tasks.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._info is not None:
            try:
                goodbye = await asyncio.wait_for(
                    self._aiozc.async_unregister_service(self._info), _STOP_TIMEOUT)
                await asyncio.wait_for(goodbye, _STOP_TIMEOUT)
            except (asyncio.TimeoutError, OSError) as exc:
                log.warning("mdns node=%s goodbye not sent: %r", self.node_id, exc)
        await self._close_zeroconf()
        self._peers.clear()
        self._peer_of_name.clear()
        self._changed.set()
        log.info("mdns stopped node=%s cluster=%s", self.node_id, self.cluster_name)

    def peers(self) -> dict[str, tuple[str, int, dict]]:
        """node_id -> (address, port, TXT properties) of the same cluster's nodes seen,
        never this node. A copy: the caller may keep it."""
        return {node: (addr, port, dict(txt)) for node, (addr, port, txt) in self._peers.items()}

    async def wait_for_peers(self, count: int, timeout: float) -> dict:
        """Wait until at least ``count`` peers are seen or ``timeout`` seconds pass, then
        return ``peers()`` (which may hold fewer than ``count`` at the timeout)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self._peers) < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self.peers()

    def update_properties(self, properties: dict[str, str]) -> None:
        """Replace the extra TXT properties (``cluster`` and ``node_id`` stay) and re-announce
        them if started. The announcement is sent in the background."""
        self._properties = self._checked(properties)
        if self._aiozc is None or self._info is None:
            return
        self._info = self._service_info()
        task = asyncio.get_running_loop().create_task(self._announce(self._info))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ zeroconf callbacks
    # Called on the event loop thread: AsyncZeroconf attaches to the running loop.

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._schedule_resolve(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._schedule_resolve(name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        self._forget(name)

    # ------------------------------------------------------------------ internals

    def _forget(self, name: str) -> None:
        node = self._peer_of_name.pop(name, None)
        if node is not None and self._peers.pop(node, None) is not None:
            log.info("mdns node=%s peer gone peer=%s", self.node_id, node)
            self._changed.set()

    def _checked(self, properties: dict[str, str]) -> dict[str, str]:
        clash = self.RESERVED_KEYS & set(properties)
        if clash:
            raise ValueError(f"properties may not set {sorted(clash)}")
        return {str(k): str(v) for k, v in properties.items()}

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.SERVICE_TYPE, self.instance_name,
            port=self.cluster_port,
            properties={"cluster": self.cluster_name, "node_id": self.node_id,
                        **self._properties},
            server=f"shoal-{self.node_id}.local.",
            parsed_addresses=[self.address])

    async def _announce(self, info: AsyncServiceInfo) -> None:
        assert self._aiozc is not None
        try:
            sent = await asyncio.wait_for(self._aiozc.async_update_service(info),
                                          _REGISTER_TIMEOUT)
            await asyncio.wait_for(sent, _REGISTER_TIMEOUT)
            log.info("mdns node=%s re-announced properties=%s", self.node_id,
                     self._properties)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed announcement must be seen, not fatal
            log.warning("mdns node=%s re-announce failed: %r", self.node_id, exc)

    def _schedule_resolve(self, name: str) -> None:
        if name == self.instance_name or self._loop is None:
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        task = self._loop.create_task(self._resolve(name))
        self._resolving[name] = task
        task.add_done_callback(lambda t, n=name: self._resolve_done(n, t))

    def _resolve_done(self, name: str, task: asyncio.Task) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _resolve(self, name: str) -> None:
        if self._aiozc is None:
            return
        info = AsyncServiceInfo(self.SERVICE_TYPE, name)
        try:
            found = await info.async_request(self._aiozc.zeroconf, _RESOLVE_TIMEOUT_MS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad peer must not stop discovery
            log.warning("mdns node=%s cannot resolve %s: %r", self.node_id, name, exc)
            return
        if not found or info.port is None:
            log.info("mdns node=%s %s did not resolve within %d ms", self.node_id, name,
                     _RESOLVE_TIMEOUT_MS)
            return
        txt = {k: (v if v is not None else "") for k, v in info.decoded_properties.items()}
        node = txt.get("node_id") or name[: -len(self.SERVICE_TYPE) - 1]
        if node == self.node_id or txt.get("cluster") != self.cluster_name:
            log.debug("mdns node=%s ignores %s of cluster %r", self.node_id, node,
                      txt.get("cluster"))
            self._forget(name)  # in case it was listed before under another cluster name
            return
        addresses = info.parsed_scoped_addresses(IPVersion.All)
        if not addresses:
            log.info("mdns node=%s peer %s advertises no address", self.node_id, node)
            return
        entry = (addresses[0], info.port, txt)
        self._peer_of_name[name] = node
        if self._peers.get(node) != entry:
            log.info("mdns node=%s cluster=%s peer seen peer=%s address=%s:%d txt=%s",
                     self.node_id, self.cluster_name, node, entry[0], entry[1], txt)
            self._peers[node] = entry
            self._changed.set()

    async def _abort_start(self) -> None:
        self._info = None  # never registered: no goodbye to send
        await self.stop()

    async def _close_zeroconf(self) -> None:
        aiozc, self._aiozc = self._aiozc, None
        self._info = None
        if aiozc is not None:
            try:
                await asyncio.wait_for(aiozc.async_close(), _STOP_TIMEOUT)
            except (asyncio.TimeoutError, OSError) as exc:
                log.warning("mdns node=%s close: %r", self.node_id, exc)
