"""Connection admission: how many connections a node takes, in all and per source address,
and how fast one address may open them; sans-IO (the caller passes the clock).

``max_connections`` (0: the process's open-file limit less ``RESERVED_FDS``, so that the
store, the cluster links and the admin API always find a descriptor: a node that runs out
of sockets refuses connections instead of failing a store write and stopping),
``max_connections_per_address`` and ``max_connection_rate`` (new connections per second
and address, over a one-second window). A refused connection is closed before any MQTT is
read; with the PROXY protocol the per-address rules apply to the client's real address
once the header is read.
"""

from __future__ import annotations

__all__ = ["ConnectionLimits", "FlappingGuard", "RESERVED_FDS", "default_max_connections"]

RESERVED_FDS = 256
MAX_TRACKED_ADDRESSES = 100_000  # rate windows (addresses, ClientIDs) kept at most


def default_max_connections() -> int:
    """The open-file limit less the descriptors kept for everything else."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - RESERVED_FDS)


class ConnectionLimits:
    """Counts per address and rate windows; the broker owns one."""

    __slots__ = ("max_total", "max_per_address", "max_rate", "per_address", "windows",
                 "refused", "_logged_at", "_unlogged")

    def __init__(self, config) -> None:
        self.max_total = config.max_connections or default_max_connections()
        self.max_per_address = config.max_connections_per_address
        self.max_rate = config.max_connection_rate
        self.per_address: dict[str, int] = {}
        self.windows: dict[str, list] = {}  # address -> [window start, count]
        self.refused: dict[str, int] = {"max_connections": 0, "per_address": 0, "rate": 0}
        self._logged_at = float("-inf")
        self._unlogged = 0

    def log_due(self, now: float, every: float = 10.0) -> int | None:
        """Rate-limits the refusal warnings: None (stay quiet), or how many refusals went
        unlogged since the last line."""
        if now - self._logged_at < every:
            self._unlogged += 1
            return None
        self._logged_at, skipped, self._unlogged = now, self._unlogged, 0
        return skipped

    def admit_total(self, open_connections: int) -> str | None:
        """Before anything else: None, or why the connection is refused."""
        if open_connections >= self.max_total:
            self.refused["max_connections"] += 1
            return f"max_connections ({self.max_total}) reached"
        return None

    def admit_address(self, address: str, now: float) -> str | None:
        """A connection from ``address`` (counted until ``release``): None, or why not."""
        if self.max_rate:
            window = self.windows.get(address)
            if window is None or now - window[0] >= 1.0:
                if window is None and len(self.windows) >= MAX_TRACKED_ADDRESSES:
                    self._prune(now)
                self.windows[address] = window = [now, 0]
            window[1] += 1
            if window[1] > self.max_rate:
                self.refused["rate"] += 1
                return f"more than {self.max_rate} connections per second from {address}"
        count = self.per_address.get(address, 0)
        if self.max_per_address and count >= self.max_per_address:
            self.refused["per_address"] += 1
            return f"max_connections_per_address ({self.max_per_address}) from {address}"
        self.per_address[address] = count + 1
        return None

    def release(self, address: str) -> None:
        count = self.per_address.get(address, 0) - 1
        if count > 0:
            self.per_address[address] = count
        else:
            self.per_address.pop(address, None)

    def _prune(self, now: float) -> None:
        old = [a for a, w in self.windows.items() if now - w[0] >= 1.0]
        for a in old:
            del self.windows[a]
        if len(self.windows) >= MAX_TRACKED_ADDRESSES:
            self.windows.clear()  # (a flood from that many addresses: start over)


class FlappingGuard:
    """``flapping_connects``: a ClientID that connects more than that many times within
    ``flapping_window`` seconds is refused (CONNACK 0x9F, connection rate exceeded; 3.1.1:
    3) for ``flapping_ban`` seconds (a client stuck in a reconnect loop, or two devices
    fighting over one ClientID, stop costing the node a takeover each time)."""

    __slots__ = ("limit", "window", "ban", "recent", "banned", "refused")

    def __init__(self, config) -> None:
        self.limit = config.flapping_connects
        self.window = config.flapping_window
        self.ban = config.flapping_ban
        self.recent: dict[str, list] = {}   # client_id -> [window start, connects in it]
        self.banned: dict[str, float] = {}  # client_id -> until
        self.refused = 0

    def check(self, client_id: str, now: float) -> float | None:
        """Count a CONNECT of ``client_id``: None, or the seconds its ban still lasts."""
        if not self.limit:
            return None
        until = self.banned.get(client_id)
        if until is not None:
            if now < until:
                self.refused += 1
                return until - now
            del self.banned[client_id]
        entry = self.recent.get(client_id)
        if entry is None or now - entry[0] >= self.window:
            if entry is None and len(self.recent) >= MAX_TRACKED_ADDRESSES:
                self._prune(now)
            self.recent[client_id] = entry = [now, 0]
        entry[1] += 1
        if entry[1] > self.limit:
            del self.recent[client_id]
            self.banned[client_id] = now + self.ban
            self.refused += 1
            return self.ban
        return None

    def _prune(self, now: float) -> None:
        for cid in [c for c, e in self.recent.items() if now - e[0] >= self.window]:
            del self.recent[cid]
        for cid in [c for c, until in self.banned.items() if now >= until]:
            del self.banned[cid]
        if len(self.recent) >= MAX_TRACKED_ADDRESSES:
            self.recent.clear()
