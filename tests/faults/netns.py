"""Network partitions for the fault tests: cluster nodes in Linux network namespaces.

Layout (``NetnsLab``), all names unique per run (``sh<4 hex>`` + suffix: Linux interface
names are at most 15 characters):

* a bridge ``sh<tag>b`` in the root namespace with ``10.<a>.<b>.1/24`` (a /24 of 10/8
  that nothing on the host routes yet);
* per node i (1-based) a namespace ``sh<tag>n<i>`` with ``lo`` up and a veth pair: the
  host end ``sh<tag>v<i>`` is a bridge port, the namespace end ``sh<tag>p<i>`` has
  ``10.<a>.<b>.<10+i>/24`` and a default route via the bridge address.

The test process stays in the root namespace and reaches every node through the bridge
(source address ``10.<a>.<b>.1``). ``isolate(i)`` drops, inside node i's namespace
(iptables INPUT and OUTPUT), all traffic from and to the *other nodes'* addresses; clients
in the root namespace still reach node i, so a client connected to the minority sees the
minority's behaviour. ``heal(i)`` removes exactly those rules.

``NetnsCluster`` is the ``Cluster`` of tests/cluster/conftest.py with ``NetnsNode``s: a
``ClusterNodeProcess`` whose ``host`` is its namespace address and whose command runs
under ``ip netns exec <ns>`` (which execs the program: the Popen pid is the node's own
python process, so ``kill -9`` of its process group works as before), with the admin API
bound to that address too (``--admin-host``). Ports are still
picked on the host (every namespace has its own port space, so they are free there too).

Needs root, ``ip`` (iproute2) and ``iptables``; ``unavailable()`` says why not.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import shutil
import subprocess

from support import ClusterNodeProcess

IP = "ip"
IPTABLES = "iptables"
TC = "tc"


class NetnsError(RuntimeError):
    pass


def unavailable() -> str | None:
    """None when this process can build a NetnsLab; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, iptables)"
    missing = [p for p in (IP, IPTABLES, TC) if shutil.which(p) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian: apt-get install "
                f"{' '.join(sorted({'iptables' if p == IPTABLES else 'iproute2' for p in missing}))})")
    return None


def run(*cmd: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} -> {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _routed_networks() -> list:
    """Every IPv4 network the host routes or has an address in (any table)."""
    nets = []
    for cmd in ((IP, "-j", "-4", "route", "show", "table", "all"),
                (IP, "-j", "-4", "addr", "show")):
        out = run(*cmd).stdout or "[]"
        for entry in json.loads(out):
            if "dst" in entry:
                dst = entry["dst"]
                if dst == "default":
                    continue
                try:
                    nets.append(ipaddress.ip_network(dst, strict=False))
                except ValueError:
                    continue
            for info in entry.get("addr_info", []):
                try:
                    nets.append(ipaddress.ip_network(
                        f"{info['local']}/{info.get('prefixlen', 32)}", strict=False))
                except (KeyError, ValueError):
                    continue
    return nets


def _existing_names() -> set[str]:
    names = set()
    for entry in json.loads(run(IP, "-j", "link", "show").stdout or "[]"):
        names.add(entry.get("ifname", ""))
    for line in run(IP, "netns", "list").stdout.splitlines():
        if line.strip():
            names.add(line.split()[0])
    return names


class NetnsLab:
    """Bridge + one namespace per node; a context manager (teardown always runs, also
    when setup fails half-way; registered with atexit too, teardown is idempotent)."""

    def __init__(self, nodes: int = 3, rng: random.Random | None = None) -> None:
        assert 1 <= nodes <= 200
        self.n = nodes
        self.rng = rng or random.Random()
        self.tag = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.isolated: set[int] = set()
        self.slowed: set[int] = set()
        self._rules: dict[int, list[list[str]]] = {}
        self._made_bridge = False
        self._made_ns: list[str] = []
        self._up = False

    # -- names and addresses
    @property
    def bridge(self) -> str:
        return f"sh{self.tag}b"

    def ns(self, i: int) -> str:
        return f"sh{self.tag}n{i}"

    def veth(self, i: int) -> str:
        return f"sh{self.tag}v{i}"

    def peer(self, i: int) -> str:
        return f"sh{self.tag}p{i}"

    @property
    def gateway(self) -> str:
        """The bridge address: what the root namespace (test process, toxiproxy) is seen
        as from inside the namespaces."""
        return str(self.subnet.network_address + 1)

    def address(self, i: int) -> str:
        return str(self.subnet.network_address + 10 + i)

    def names(self) -> list[str]:
        return [self.bridge] + [self.ns(i) for i in range(1, self.n + 1)]

    # -- life cycle
    def __enter__(self) -> "NetnsLab":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _pick(self) -> None:
        taken = _existing_names()
        for _ in range(100):
            tag = f"{self.rng.getrandbits(16):04x}"
            if not any(name.startswith(f"sh{tag}") for name in taken):
                self.tag = tag
                break
        else:
            raise NetnsError("no unused sh<tag> name in 100 draws")
        routed = _routed_networks()
        for _ in range(500):
            net = ipaddress.ip_network(
                f"10.{self.rng.randrange(100, 250)}.{self.rng.randrange(0, 256)}.0/24")
            if not any(net.overlaps(r) for r in routed):
                self.subnet = net
                return
        raise NetnsError("no free /24 in 10.100.0.0-10.249.255.0 after 500 draws")

    def setup(self) -> "NetnsLab":
        assert not self._up, "set up twice"
        self._up = True
        atexit.register(self.teardown)
        try:
            self._pick()
            run(IP, "link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            run(IP, "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            run(IP, "link", "set", self.bridge, "up")
            # another run could have picked the same /24 between our check and our address
            routes = run(IP, "-4", "route", "show", str(self.subnet)).stdout.splitlines()
            if len([r for r in routes if r.strip()]) != 1:
                raise NetnsError(f"{self.subnet} is routed twice: {routes}")
            for i in range(1, self.n + 1):
                ns = self.ns(i)
                run(IP, "netns", "add", ns)
                self._made_ns.append(ns)
                run(IP, "-n", ns, "link", "set", "lo", "up")
                run(IP, "link", "add", self.veth(i), "type", "veth",
                    "peer", "name", self.peer(i), "netns", ns)
                run(IP, "link", "set", self.veth(i), "master", self.bridge)
                run(IP, "link", "set", self.veth(i), "up")
                run(IP, "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.peer(i))
                run(IP, "-n", ns, "link", "set", self.peer(i), "up")
                run(IP, "-n", ns, "route", "add", "default", "via", self.gateway)
                # the namespace starts with empty ACCEPT chains; make sure of it
                run(IP, "netns", "exec", ns, IPTABLES, "-w", "5", "-S")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Delete the namespaces (their veth ends go with them) and the bridge. Idempotent;
        raises NetnsError if something is left behind."""
        if not self._up:
            return
        self._up = False
        problems = []
        for ns in self._made_ns:
            p = run(IP, "netns", "del", ns, check=False)
            if p.returncode != 0:
                problems.append(f"netns del {ns}: {p.stderr.strip()}")
        self._made_ns = []
        for i in range(1, self.n + 1):   # normally gone with the namespace already
            if self.tag and run(IP, "link", "show", self.veth(i), check=False).returncode == 0:
                run(IP, "link", "del", self.veth(i), check=False)
        if self._made_bridge:
            p = run(IP, "link", "del", self.bridge, check=False)
            if p.returncode != 0:
                problems.append(f"link del {self.bridge}: {p.stderr.strip()}")
            self._made_bridge = False
        self.isolated.clear()
        self._rules.clear()
        atexit.unregister(self.teardown)
        left = self.leftovers()
        if problems or left:
            raise NetnsError(f"netns teardown: {problems} left behind: {left}")

    def leftovers(self) -> list[str]:
        """Names of this lab still present on the host (empty after teardown)."""
        if not self.tag:
            return []
        return sorted(name for name in _existing_names() if name.startswith(f"sh{self.tag}"))

    # -- faults
    def _iptables(self, i: int, *args: str, check: bool = True):
        return run(IP, "netns", "exec", self.ns(i), IPTABLES, "-w", "5", *args, check=check)

    def isolate(self, i: int, reset: bool = False) -> None:
        """Cut node i from every other node (both directions); the root namespace still
        reaches it. ``reset``: TCP between them is answered with RST instead of silence
        (every node-to-node connection of node i breaks at its next packet)."""
        assert 1 <= i <= self.n and i not in self.isolated, (i, self.isolated)
        target = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"] if reset \
            else ["-j", "DROP"]
        rules = []
        for j in range(1, self.n + 1):
            if j != i:
                rules.append(["INPUT", "-s", f"{self.address(j)}/32", *target])
                rules.append(["OUTPUT", "-d", f"{self.address(j)}/32", *target])
        self._rules[i] = []
        self.isolated.add(i)
        for rule in rules:
            self._iptables(i, "-I", *rule)
            self._rules[i].append(rule)

    def heal(self, i: int) -> None:
        """Remove the rules ``isolate(i)`` added (all of them, even if one fails)."""
        errors = []
        for rule in self._rules.pop(i, []):
            p = self._iptables(i, "-D", *rule, check=False)
            if p.returncode != 0:
                errors.append(f"{rule}: {p.stderr.strip()}")
        self.isolated.discard(i)
        if errors:
            raise NetnsError(f"heal {i}: {errors}")

    def heal_all(self) -> None:
        for i in sorted(self.isolated):
            self.heal(i)
        for i in sorted(self.slowed):
            self.unslow(i)

    def slow(self, i: int, rate: str = "256kbit", latency_ms: int = 300) -> None:
        """Node i's egress (to the other nodes and to its clients) through a token bucket
        of ``rate``: what exceeds it queues up to ``latency_ms`` (then it is dropped)."""
        assert i not in self.slowed, i
        run(IP, "netns", "exec", self.ns(i), TC, "qdisc", "add", "dev", self.peer(i), "root",
            "tbf", "rate", rate, "burst", "16kb", "latency", f"{latency_ms}ms")
        self.slowed.add(i)

    def unslow(self, i: int) -> None:
        self.slowed.discard(i)
        run(IP, "netns", "exec", self.ns(i), TC, "qdisc", "del", "dev", self.peer(i), "root")

    def rules(self, i: int) -> list[str]:
        """``iptables -S`` inside node i's namespace (for checks and reports)."""
        return self._iptables(i, "-S").stdout.splitlines()


class NetnsNode(ClusterNodeProcess):
    """A cluster node inside namespace ``ns`` at ``host``."""

    def __init__(self, *args, ns: str, host: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.ns = ns
        self.host = host
        # the admin API binds 127.0.0.1 by default: the namespace's own loopback
        self.options.setdefault("admin_host", host)
        # (an admin API reachable from other addresses needs a token: the harness's
        # api() sends it)
        self.options.setdefault("admin_token", "netns-admin-token-0123456789")

    def command(self) -> tuple[list[str], dict]:
        cmd, env = super().command()
        return [IP, "netns", "exec", self.ns, *cmd], env


def netns_cluster_class(base):
    """``NetnsCluster`` on the given ``Cluster`` class (tests/cluster/conftest.py is
    loaded by file path in tests/faults/conftest.py, so the base is passed in)."""

    class NetnsCluster(base):
        """``Cluster`` whose node i runs in ``lab``'s namespace i."""

        def __init__(self, workdir, lab: NetnsLab, **kw) -> None:
            super().__init__(workdir, **kw)
            self.lab = lab

        def _make_node(self, node_id: str, join: str | None,
                       options: dict) -> ClusterNodeProcess:
            i = len(self.nodes) + 1
            assert i <= self.lab.n, f"the lab has {self.lab.n} namespaces"
            # (bound to a namespace's address, not loopback: the run's clients connect
            # without a username, which such a node refuses unless told otherwise)
            options = {"allow_anonymous": "true", **options}
            return NetnsNode(self.workdir, node_id, self.secret, self.name, join=join,
                             options=options, ns=self.lab.ns(i), host=self.lab.address(i))

        def isolate(self, i: int) -> None:
            self.lab.isolate(i)

        def heal(self, i: int) -> None:
            self.lab.heal(i)

    return NetnsCluster
