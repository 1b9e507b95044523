"""cluster.transport: real sockets on 127.0.0.1, every wait bounded by a deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import defaultdict

import pytest

from cluster.transport import PeerUnreachable, RemoteError, RequestTimeout, Transport

HOST = "127.0.0.1"


def run(coro, timeout: float = 60.0):
    async def main():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


async def until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Node:
    """A Transport with recording callbacks and a few request handlers."""

    def __init__(self, node_id: str, *, secret: bytes = b"s3cret", cluster: str = "test",
                 port: int = 0, **kw) -> None:
        self.got: dict[str, list] = defaultdict(list)
        self.ups: list[str] = []
        self.downs: list[str] = []
        self.hanging = 0
        self.t = Transport(node_id, cluster, secret, HOST, port, on_message=self.on_message,
                           on_request=self.on_request, on_peer_up=self.ups.append,
                           on_peer_down=self.downs.append, **kw)
        self.t.info = {"name": node_id}

    @property
    def id(self) -> str:
        return self.t.node_id

    def on_message(self, peer, kind, body) -> None:
        self.got[peer].append(body)

    async def on_request(self, peer, kind, body):
        if kind == "echo":
            return {"by": self.id, "from": peer, "body": body}
        if kind == "count":
            return len(self.got[peer])
        if kind == "fail":
            raise ValueError(f"boom {body}")
        if kind == "hang":
            self.hanging += 1
            await asyncio.Event().wait()
        if kind == "unsendable":
            return {1, 2, 3}
        raise KeyError(kind)

    async def start(self) -> "Node":
        await self.t.start()
        return self


async def mesh(*nodes: Node) -> None:
    for x in nodes:
        for y in nodes:
            if x is not y:
                x.t.set_peer(y.id, HOST, y.t.port)
    for x in nodes:
        others = {y.id for y in nodes if y is not x}
        await until(lambda: x.t.peers_up() == others, 5.0, f"{x.id} linked to {others}")


async def stop_all(*nodes: Node) -> None:
    for n in nodes:
        await n.t.stop()


class Proxy:
    """A TCP relay whose connections the test can cut at any moment."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer) -> None:
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(HOST, self.target_port), 2)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        self.pairs.append((writer, uw))
        for r, w in ((reader, uw), (ur, writer)):
            t = asyncio.get_running_loop().create_task(self._pump(r, w))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, reader, writer) -> None:
        try:
            while True:
                data = await reader.read(7919)  # odd size: frames get cut anywhere
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> int:
        pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            a.transport.abort()
            b.transport.abort()
        return len(pairs)

    async def stop(self) -> None:
        self.cut()
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)


# --------------------------------------------------------------------------- tests


def test_three_nodes_one_link_per_pair_order_and_requests():
    async def main():
        a, b, c = [await Node(n).start() for n in ("a", "b", "c")]
        try:
            await mesh(a, b, c)
            nodes = {"a": a, "b": b, "c": c}
            # exactly one TCP connection per pair: the smaller id dialled, both ends agree
            for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
                lx = nodes[x].t._peers[y].link
                ly = nodes[y].t._peers[x].link
                assert (lx.direction, ly.direction) == ("out", "in")
                assert lx.sockname == ly.peername and lx.peername == ly.sockname
            for n in nodes.values():
                assert n.t.stats["links_up"] == 2, n.t.stats
                assert sorted(n.ups) == sorted(set(nodes) - {n.id})
            assert a.t.stats["accepts"] == 0 and c.t.stats["dials"] == 0
            assert a.t.peer_info("b") == {"name": "b"}

            for x in nodes.values():
                for y in nodes.values():
                    if x is not y:
                        for i in range(1000):
                            assert x.t.send(y.id, "n", i)
            for x in nodes.values():
                for y in nodes.values():
                    if x is not y:
                        await until(lambda: len(y.got[x.id]) >= 1000, 5, f"{x.id}->{y.id}")
                        assert y.got[x.id] == list(range(1000))

            # request/response both directions, ordered after earlier send()s
            assert await a.t.request("c", "echo", [1, "x"], 2) == {
                "by": "c", "from": "a", "body": [1, "x"]}
            assert (await c.t.request("a", "echo", b"\x00", 2))["body"] == b"\x00"
            for i in range(100):
                b.t.send("a", "n", 1000 + i)
            assert await b.t.request("a", "count", None, 2) == 1100
            with pytest.raises(RemoteError, match="ValueError: boom 7"):
                await b.t.request("c", "fail", 7, 2)
            with pytest.raises(RemoteError, match="KeyError"):
                await c.t.request("b", "nope", None, 2)
            with pytest.raises(RemoteError, match="not sendable"):
                await c.t.request("b", "unsendable", None, 2)
            with pytest.raises(RequestTimeout):
                await a.t.request("b", "hang", None, 0.3)
            with pytest.raises(PeerUnreachable):
                await a.t.request("zz", "echo", None, 0.3)
            assert not a.t.send("zz", "n", 1)
            # the link is still healthy afterwards
            assert (await c.t.request("b", "echo", 1, 2))["by"] == "b"
            await until(lambda: all(n.t.queue_depth(p) == 0 for n in nodes.values()
                                    for p in nodes if p != n.id), 3, "all acked")
        finally:
            await stop_all(a, b, c)
    run(main())


@pytest.mark.parametrize("mismatch", ["secret", "cluster"])
def test_wrong_secret_or_cluster_gets_no_link(mismatch):
    async def main():
        a = await Node("a").start()
        b = await (Node("b", secret=b"other") if mismatch == "secret"
                   else Node("b", cluster="elsewhere")).start()
        try:
            a.t.set_peer("b", HOST, b.t.port)
            b.t.set_peer("a", HOST, a.t.port)
            assert a.t.send("b", "n", 1)  # queued for later, never delivered
            await until(lambda: a.t.stats["handshake_failures"] >= 2
                        and b.t.stats["handshake_failures"] >= 2, 5, "refused handshakes")
            assert not a.t.is_up("b") and not b.t.is_up("a")
            assert a.ups == b.ups == [] and not b.got
            with pytest.raises(PeerUnreachable):
                await b.t.hello(HOST, a.t.port, 2)
            with pytest.raises(PeerUnreachable):
                await b.t.request("a", "echo", None, 0.2)
            assert not b.got and not a.got
        finally:
            await stop_all(a, b)
    run(main())


def test_hello_links_a_seed_whose_id_is_unknown():
    async def main():
        a, b, c = [await Node(n).start() for n in ("a", "b", "c")]
        try:
            # the larger id contacts the smaller: the hello connection becomes the link
            peer, info = await c.t.hello(HOST, a.t.port, 2)
            assert (peer, info) == ("a", {"name": "a"})
            assert c.t.is_up("a") and a.t.is_up("c")
            assert (await c.t.request("a", "echo", 1, 2))["by"] == "a"
            assert (await a.t.request("c", "echo", 1, 2))["by"] == "c"
            # the smaller id contacts the larger
            peer, info = await a.t.hello(HOST, b.t.port, 2)
            assert peer == "b" and (await b.t.request("a", "echo", 2, 2))["by"] == "a"
            with pytest.raises(PeerUnreachable):
                await a.t.hello(HOST, a.t.port, 2)  # ourselves
            with pytest.raises((PeerUnreachable, OSError)):
                await a.t.hello(HOST, free_port(), 2)
        finally:
            await stop_all(a, b, c)
    run(main())


@pytest.mark.parametrize("fault", ["abort_dialer", "abort_acceptor", "proxy"])
def test_exactly_once_in_order_across_link_drops(fault):
    N = 20_000

    async def main():
        a = await Node("a", queue_limit=4000).start()
        b = await Node("b").start()
        proxy = None
        try:
            if fault == "proxy":
                proxy = Proxy(b.t.port)
                await proxy.start()
                a.t.set_peer("b", HOST, proxy.port)
            else:
                a.t.set_peer("b", HOST, b.t.port)
            await until(lambda: a.t.is_up("b") and b.t.is_up("a"), 5, "link")
            cuts = 0
            sent = 0
            cut_at = {2500, 6000, 9000, 12500, 16000, 19000}
            while sent < N:
                if a.t.send("b", "n", sent):
                    sent += 1
                else:
                    await a.t.drain("b", 10)
                if sent % 100 == 0:
                    await asyncio.sleep(0)
                if sent in cut_at:
                    cut_at.discard(sent)
                    await until(lambda: a.t.is_up("b") and b.t.is_up("a")
                                and len(b.got["a"]) > 0, 5, "link back")
                    await asyncio.sleep(0)
                    if fault == "proxy":
                        assert proxy.cut() >= 1
                    elif fault == "abort_dialer":
                        a.t._peers["b"].link.tr.abort()
                    else:
                        b.t._peers["a"].link.tr.abort()
                    cuts += 1
            await until(lambda: len(b.got["a"]) >= N, 30,
                        lambda: f"all messages (got {len(b.got['a'])})")
            assert b.got["a"] == list(range(N))
            assert cuts == 6 and a.t.stats["links_up"] >= 7
            await until(lambda: a.t.queue_depth("b") == 0, 5, "everything acknowledged")
            assert b.downs == ["a"] * len(b.downs)
        finally:
            await stop_all(a, b)
            if proxy:
                await proxy.stop()
    run(main(), 90)


def test_peer_restart_relinks_and_fails_pending_requests():
    async def main():
        a = await Node("a").start()
        b1 = await Node("b").start()
        port = b1.t.port
        b2 = None
        try:
            a.t.set_peer("b", HOST, port)
            await until(lambda: a.t.is_up("b"), 5, "link")
            for i in range(100):
                a.t.send("b", "n", i)
            await until(lambda: len(b1.got["a"]) == 100, 5, "first messages")
            pending = asyncio.get_running_loop().create_task(
                a.t.request("b", "hang", None, 20))
            await until(lambda: b1.hanging == 1, 5, "handler running")
            await b1.t.stop()
            await until(lambda: a.downs == ["b"], 5, "on_peer_down")
            assert not pending.done()
            assert a.t.send("b", "n", "queued while down")
            b2 = await Node("b", port=port).start()
            await until(lambda: a.t.is_up("b") and len(a.ups) == 2, 10, "link to restarted b")
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable, match="restarted"):
                await asyncio.wait_for(pending, 5)
            assert time.monotonic() - t0 < 5
            a.t.send("b", "n", "after")
            await until(lambda: len(b2.got["a"]) == 2, 5, "messages to the new b")
            assert b2.got["a"] == ["queued while down", "after"]
            assert (await a.t.request("b", "echo", 1, 2))["by"] == "b"
            assert (await b2.t.request("a", "echo", 1, 2))["by"] == "a"
            assert a.ups == ["b", "b"] and a.downs == ["b"]
        finally:
            await stop_all(a, b1, *(x for x in [b2] if x))
    run(main())


def test_back_pressure_on_unreachable_peer_then_delivery():
    async def main():
        port = free_port()
        a = await Node("a", queue_limit=100).start()
        b = None
        try:
            a.t.set_peer("b", HOST, port)  # nobody listens there yet
            assert all(a.t.send("b", "n", i) for i in range(100))
            assert not a.t.send("b", "n", 100)
            assert a.t.queue_depth("b") == 100
            with pytest.raises(PeerUnreachable):
                await a.t.drain("b", 0.2)
            with pytest.raises(PeerUnreachable):
                await a.t.request("b", "echo", None, 0.2)
            await until(lambda: a.t.stats["dial_failures"] >= 2, 5, "dial retries")
            b = await Node("b", port=port).start()
            await a.t.drain("b", 5)
            await until(lambda: len(b.got["a"]) == 100, 5, "queued messages")
            assert b.got["a"] == list(range(100))
        finally:
            await stop_all(a, *(x for x in [b] if x))
    run(main())


def test_big_and_unencodable_messages_keep_the_stream_intact():
    async def main():
        a = await Node("a", max_frame=4 << 20).start()
        b = await Node("b", max_frame=4 << 20).start()
        try:
            await mesh(a, b)
            a.t.send("b", "n", 0)
            for i in range(1, 8):
                a.t.send("b", "n", bytes([i]) * 700_000)  # several frames of about 1 MiB
            a.t.send("b", "n", b"x" * (5 << 20))  # over max_frame: dropped, logged
            a.t.send("b", "n", {1, 2})  # not msgpack-able: dropped, logged
            a.t.send("b", "n", "last")
            await until(lambda: b.got["a"] and b.got["a"][-1] == "last", 5, "last message")
            got = b.got["a"]
            assert got[0] == 0 and got[-1] == "last" and len(got) == 9
            assert [g[:1] for g in got[1:8]] == [bytes([i]) for i in range(1, 8)]
            assert a.t.stats["dropped_unencodable"] == 2
            with pytest.raises(ValueError):
                await a.t.request("b", "echo", {1}, 2)
            assert (await a.t.request("b", "echo", 1, 2))["by"] == "b"
        finally:
            await stop_all(a, b)
    run(main())


def test_keepalive_holds_a_quiet_link_and_silence_drops_it():
    async def main():
        a, b = Node("a"), Node("b")
        for n in (a, b):
            n.t.KEEPALIVE, n.t.IDLE_TIMEOUT = 0.05, 0.3
        await a.start()
        await b.start()
        try:
            await mesh(a, b)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # quiet for > 3 idle timeouts: stays up
                assert a.t.is_up("b") and b.t.is_up("a")
                await asyncio.sleep(0.02)
            assert a.t.stats["links_up"] == 1
            b.t.KEEPALIVE = 60.0  # b goes silent: a drops the link, then re-dials
            await until(lambda: a.t.stats["links_down"] >= 1, 3, "silent link dropped")
            assert a.downs and a.downs[0] == "b"
        finally:
            await stop_all(a, b)
    run(main())


def test_throughput_one_message_per_send(capsys):
    N = 200_000
    body = b"p" * 100

    async def main():
        a = await Node("a").start()
        b = await Node("b").start()
        count = 0

        def on_message(peer, kind, msg):
            nonlocal count
            count += 1
        b.t._on_message = on_message
        try:
            await mesh(a, b)
            send = a.t.send
            t0 = time.perf_counter()
            i = 0
            while i < N:
                if send("b", "pub", (i, body)):
                    i += 1
                    if i & 255 == 0:
                        await asyncio.sleep(0)
                else:
                    await a.t.drain("b", 10)
            await until(lambda: count >= N, 30, "all delivered")
            return N / (time.perf_counter() - t0)
        finally:
            await stop_all(a, b)
    rate = run(main())
    with capsys.disabled():
        print(f"\ntransport throughput: {rate:,.0f} msg/s (1 message per send, 100-byte body)")
    assert rate > 20_000
