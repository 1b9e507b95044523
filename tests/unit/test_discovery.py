"""cluster.discovery: seed resolution and mDNS discovery, on real sockets.

mDNS runs on loopback (``interfaces=['127.0.0.1']``): several zeroconf instances in one
process talk through real multicast sockets, like separate hosts would. Every test uses
its own cluster name and node ids, so parallel runs and other mDNS users on this machine
cannot disturb it. Waits are on conditions with deadlines, never on bare sleeps.

The multi-address seed test runs ``resolve_seeds`` in a network namespace of its own whose
/etc/hosts (bind-mounted by ``ip netns exec`` from /etc/netns/<ns>/hosts) maps one name to
several addresses; it is skipped when namespaces cannot be created (not root).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cluster.discovery import MdnsDiscovery, parse_seed, resolve_seeds

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ["127.0.0.1"]
#: Bound on how long nodes on one link take to find each other (measured: about 1.6 s,
#: the probe-and-announce time of the last node to start).
DISCOVERY_BOUND = 8.0


def run(coro, timeout: float = 30.0):
    """Run one coroutine on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float, what: str) -> float:
    """Wait on the loop until ``predicate()`` is true; return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


def tag() -> str:
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- parse_seed


@pytest.mark.parametrize("entry, expected", [
    ("10.0.0.5", ("10.0.0.5", 7000)),
    ("10.0.0.5:7100", ("10.0.0.5", 7100)),
    (" node-b.example:7100 ", ("node-b.example", 7100)),
    ("node-b", ("node-b", 7000)),
    ("::1", ("::1", 7000)),
    ("fd00::3", ("fd00::3", 7000)),
    ("[fd00::3]", ("fd00::3", 7000)),
    ("[fd00::3]:7200", ("fd00::3", 7200)),
    ("shoal-headless.default.svc.cluster.local:7000",
     ("shoal-headless.default.svc.cluster.local", 7000)),
])
def test_parse_seed_forms(entry, expected):
    assert parse_seed(entry, 7000) == expected


@pytest.mark.parametrize("entry", [
    "a:b:c", "host:", "host:port", "host:0", "host:65536", "host:-1", ":7000", "",
    "   ", "[fd00::3", "[fd00::3]x", "[fd00::3]:", "[10.0.0.1]:7000", "[name]:7000",
    "bad host:7000", "user@host:7000", "http://host:7000", "a..b",
])
def test_parse_seed_rejects_bad_entries(entry):
    with pytest.raises(ValueError):
        parse_seed(entry, 7000)


# --------------------------------------------------------------------------- resolve_seeds


def test_literal_addresses_pass_through_in_order_deduplicated():
    result = run(resolve_seeds(
        ["10.0.0.5", "10.0.0.6:7100", "[fd00::3]:7200", "fd00::4", "10.0.0.5:7000",
         "[0:0:0:0:0:0:0:1]"], 7000))
    assert result == [("10.0.0.5", 7000), ("10.0.0.6", 7100), ("fd00::3", 7200),
                      ("fd00::4", 7000), ("::1", 7000)]


def test_localhost_resolves_to_its_loopback_addresses():
    expected = sorted({info[4][0] for info in socket.getaddrinfo(
        "localhost", 7000, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)},
        key=lambda a: (":" in a, a))
    result = run(resolve_seeds(["localhost:7001", "localhost"], 7000))
    assert result == [(a, 7001) for a in expected] + [(a, 7000) for a in expected]
    assert "127.0.0.1" in expected  # on this machine localhost is 127.0.0.1 (and maybe ::1)


def test_unresolvable_name_is_skipped_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.discovery")
    result = run(resolve_seeds(["nothing-here.invalid:7000", "127.0.0.1:7001",
                                "also-not.invalid"], 7000))
    assert result == [("127.0.0.1", 7001)]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "nothing-here.invalid" in messages and "also-not.invalid" in messages


def test_bad_entry_raises_before_resolving():
    with pytest.raises(ValueError, match="a:b:c"):
        run(resolve_seeds(["127.0.0.1:7000", "a:b:c"], 7000))
    with pytest.raises(ValueError):
        run(resolve_seeds(["127.0.0.1:99999"], 7000))


def test_empty_seed_list():
    assert run(resolve_seeds([], 7000)) == []


def test_slow_resolver_is_bounded_by_timeout(monkeypatch, caplog):
    """A name whose resolver never answers is skipped at the deadline; the others stay."""
    caplog.set_level(logging.WARNING, logger="shoal.discovery")

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo
        never = loop.create_future()

        async def getaddrinfo(host, *args, **kwargs):
            if host == "hangs.example":
                await never
            return await real(host, *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        start = loop.time()
        result = await resolve_seeds(["hangs.example:7000", "localhost:7001", "10.1.1.1"],
                                     7000, timeout=0.5)
        return result, loop.time() - start

    result, elapsed = run(main())
    assert ("127.0.0.1", 7001) in result and ("10.1.1.1", 7000) in result
    assert all(addr != "hangs.example" for addr, _ in result)
    assert 0.4 < elapsed < 3.0
    assert "did not resolve within" in caplog.text


NETNS_SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from cluster.discovery import resolve_seeds
print(json.dumps(asyncio.run(resolve_seeds(
    ["seeds.test:7000", "single.test", "seeds.test:7000"], 7100, timeout=5.0))))
"""


def test_name_with_several_addresses_yields_each_in_private_netns():
    """Like a Kubernetes headless service: one name, several A/AAAA records."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a private network namespace")
    ns = f"shoalseed{os.getpid()}"
    netns_root = Path("/etc/netns")
    created_root = not netns_root.exists()
    ns_dir = netns_root / ns
    add = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True,
                         timeout=10)
    if add.returncode != 0:
        pytest.skip(f"`ip netns add` failed: {add.stderr.strip()}")
    try:
        ns_dir.mkdir(parents=True)
        # Listed out of order and with a duplicate: the result is sorted and deduplicated.
        (ns_dir / "hosts").write_text(
            "127.0.0.2 seeds.test\n127.0.0.1 seeds.test\n::1 seeds.test\n"
            "127.0.0.2 seeds.test\n127.0.0.9 single.test\n")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_SCRIPT, str(REPO_ROOT)],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        result = [tuple(pair) for pair in json.loads(out.stdout)]
        assert result == [("127.0.0.1", 7000), ("127.0.0.2", 7000), ("::1", 7000),
                          ("127.0.0.9", 7100)]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        shutil.rmtree(ns_dir, ignore_errors=True)
        if created_root:
            try:
                netns_root.rmdir()
            except OSError:
                pass  # someone else put a namespace directory there meanwhile


# --------------------------------------------------------------------------- MdnsDiscovery


def test_constructor_validates():
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "has.dot", "127.0.0.1", 7000)
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "x" * 64, "127.0.0.1", 7000)
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "n1", "0.0.0.0", 7000)
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "n1", "node-b.example", 7000)
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "n1", "127.0.0.1", 0)
    with pytest.raises(ValueError):
        MdnsDiscovery("", "n1", "127.0.0.1", 7000)
    with pytest.raises(ValueError):
        MdnsDiscovery("c", "n1", "127.0.0.1", 7000, properties={"cluster": "other"})
    d = MdnsDiscovery("c", "n1", "127.0.0.1", 7000)
    with pytest.raises(ValueError):
        d.update_properties({"node_id": "n2"})
    assert d.peers() == {}


# Ports are only advertised in the TXT/SRV records, never bound, so fixed numbers are safe.
def make_nodes(cluster: str, prefix: str, count: int, base_port: int = 17000,
               **kwargs) -> list[MdnsDiscovery]:
    return [MdnsDiscovery(cluster, f"{prefix}-{i}", "127.0.0.1", base_port + i,
                          interfaces=LOOPBACK, **kwargs) for i in range(count)]


def test_three_nodes_find_each_other_and_ignore_another_cluster():
    t = tag()

    async def main():
        nodes = make_nodes(f"shoal-{t}", f"n{t}", 3, properties={"role": "core"})
        stranger = MdnsDiscovery(f"other-{t}", f"x{t}", "127.0.0.1", 17100,
                                 interfaces=LOOPBACK)
        everyone = [stranger, *nodes]
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await asyncio.gather(*(d.start() for d in everyone))
            found = await asyncio.gather(*(d.wait_for_peers(2, DISCOVERY_BOUND)
                                           for d in nodes))
            took = loop.time() - began
            for d, peers in zip(nodes, found):
                others = {n.node_id for n in nodes} - {d.node_id}
                assert set(peers) == others, (d.node_id, peers)
            addr, port, txt = nodes[0].peers()[nodes[1].node_id]
            assert (addr, port) == ("127.0.0.1", 17001)
            assert txt == {"cluster": f"shoal-{t}", "node_id": nodes[1].node_id,
                           "role": "core"}
            # The stranger is on the same link and was announced before anyone was
            # complete; it is still not listed, and it lists nobody of this cluster.
            assert all(stranger.node_id not in d.peers() for d in nodes)
            assert stranger.peers() == {}
            logging.getLogger(__name__).info("3 nodes found each other in %.2fs", took)
            return took
        finally:
            await asyncio.gather(*(d.stop() for d in everyone))

    took = run(main())
    assert took < DISCOVERY_BOUND


def test_late_joiner_is_found_and_finds_the_others():
    t = tag()

    async def main():
        first, second, late = make_nodes(f"shoal-{t}", f"n{t}", 3, base_port=17200)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(first.start(), second.start())
            assert set(await first.wait_for_peers(1, DISCOVERY_BOUND)) == {second.node_id}
            began = loop.time()
            await late.start()
            assert set(await late.wait_for_peers(2, DISCOVERY_BOUND)) == {
                first.node_id, second.node_id}
            await until(lambda: late.node_id in first.peers()
                        and late.node_id in second.peers(), DISCOVERY_BOUND,
                        "the others to see the late joiner")
            return loop.time() - began
        finally:
            await asyncio.gather(first.stop(), second.stop(), late.stop())

    assert run(main()) < DISCOVERY_BOUND


def test_stop_sends_goodbye_and_others_drop_the_node():
    """Measured here: the others drop a stopped node within a few ms of its goodbye."""
    t = tag()

    async def main():
        nodes = make_nodes(f"shoal-{t}", f"n{t}", 3, base_port=17300)
        try:
            await asyncio.gather(*(d.start() for d in nodes))
            for d in nodes:
                assert len(await d.wait_for_peers(2, DISCOVERY_BOUND)) == 2
            gone = nodes[2]
            await gone.stop()
            assert gone.peers() == {}
            took = await until(lambda: all(gone.node_id not in d.peers() for d in nodes[:2]),
                               3.0, "the stopped node to disappear")
            assert set(nodes[0].peers()) == {nodes[1].node_id}
            await gone.stop()  # idempotent
            return took
        finally:
            await asyncio.gather(*(d.stop() for d in nodes))

    assert run(main()) < 3.0


def test_update_properties_is_seen_by_peers():
    t = tag()

    async def main():
        a, b = make_nodes(f"shoal-{t}", f"n{t}", 2, base_port=17400)
        try:
            await asyncio.gather(a.start(), b.start())
            assert a.node_id in await b.wait_for_peers(1, DISCOVERY_BOUND)
            assert "formed" not in b.peers()[a.node_id][2]
            a.update_properties({"formed": "1"})
            await until(lambda: b.peers().get(a.node_id, ("", 0, {}))[2].get("formed") == "1",
                        DISCOVERY_BOUND, "the new TXT record")
            txt = b.peers()[a.node_id][2]
            assert txt == {"cluster": f"shoal-{t}", "node_id": a.node_id, "formed": "1"}
        finally:
            await asyncio.gather(a.stop(), b.stop())

    run(main())


def test_wait_for_peers_is_bounded_when_alone():
    t = tag()

    async def main():
        (alone,) = make_nodes(f"shoal-{t}", f"n{t}", 1, base_port=17500)
        await alone.start()
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            assert await alone.wait_for_peers(1, 0.5) == {}
            assert 0.4 < loop.time() - began < 2.0
            assert await alone.wait_for_peers(0, 5.0) == {}
        finally:
            await alone.stop()

    run(main())


DUP_SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from cluster.discovery import MdnsDiscovery
cluster, node_id, address, hold = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "hold"
async def main():
    d = MdnsDiscovery(cluster, node_id, address, 17600, interfaces=[address])
    try:
        await d.start()
    except RuntimeError as exc:
        print("refused:", exc, flush=True)
        await d.stop()  # harmless after a failed start
        return
    print("started", flush=True)
    if hold:  # advertise until the test closes our stdin
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await d.stop()
asyncio.run(main())
"""


def test_same_node_id_twice_on_one_link_is_refused():
    """Two hosts on one link (two network namespaces on a bridge, each with its own
    port 5353, so mDNS answers reach the asking host as on a real LAN; in one namespace
    the kernel hands a unicast probe answer to either socket bound to 5353)."""
    from faults import netns  # tests/faults/netns.py (tests/ is on sys.path)
    why = netns.unavailable()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: this test must run here, but {why}")
        pytest.skip(why)
    t = tag()
    with netns.NetnsLab(nodes=2) as lab:
        def child(i, cluster, hold):
            return subprocess.Popen(
                ["ip", "netns", "exec", lab.ns(i), sys.executable, "-c", DUP_SCRIPT,
                 str(REPO_ROOT), cluster, f"dup{t}", lab.address(i),
                 "hold" if hold else "once"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
        first = child(1, f"a-{t}", hold=True)
        try:
            assert first.stdout.readline().strip() == "started", first.stderr.read()
            second = child(2, f"b-{t}", hold=False)
            out, err = second.communicate(timeout=30)
            assert second.returncode == 0, err
            assert out.startswith("refused:") and "already advertises" in out, out + err
        finally:
            first.stdin.close()
            first.wait(timeout=30)
