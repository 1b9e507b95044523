"""A small Toxiproxy-API-compatible TCP fault-injection proxy for the tests.

The real Toxiproxy (github.com/Shopify/toxiproxy) is a Go binary that no package registry
reachable from the test machines ships; the tests talk to it through the toxiproxy-python
client, so this module serves the part of Toxiproxy's HTTP API that client uses, with
Toxiproxy's JSON shapes and status codes, over real TCP forwarding with real toxics. The
same tests run unchanged against a real Toxiproxy when ``TOXIPROXY_URL`` is set (see the
``toxiproxy`` fixture in tests/conftest.py).

Run it: ``python tests/toxiproxy_server.py --host 127.0.0.1 --port 8474`` (``--port 0``
picks a free port); it prints ``toxiproxy listening on HOST:PORT`` once it accepts requests.
Import it: ``ToxiproxyServer().start(host, port)`` inside a running event loop.

HTTP API (JSON bodies; errors are ``{"error": text, "status": code}``)
  GET    /version                          200 ``{"version": ...}``
  POST   /reset                            204: enable every proxy, remove every toxic
  GET    /proxies                          200 ``{name: proxy}``
  POST   /proxies                          201 proxy; 409 name taken; 400 missing field
  POST   /populate                         201 ``{"proxies": [...]}`` (create or replace)
  GET    /proxies/{name}                   200 proxy; 404 unknown
  POST   /proxies/{name}  (also PATCH)     200 proxy: update enabled / listen / upstream
  DELETE /proxies/{name}                   204
  GET    /proxies/{name}/toxics            200 [toxic]
  POST   /proxies/{name}/toxics            200 toxic; 409 name taken; 400 bad type/stream
  GET    /proxies/{name}/toxics/{toxic}    200 toxic; 404 unknown
  POST   /proxies/{name}/toxics/{toxic}    200 toxic: update toxicity / attributes
  DELETE /proxies/{name}/toxics/{toxic}    204
  proxy = ``{"name", "listen", "upstream", "enabled", "toxics": [toxic]}``; ``listen`` with
  port 0 is replaced by the real address once listening, as Toxiproxy does.
  toxic = ``{"name", "type", "stream", "toxicity", "attributes"}``; defaults: stream
  ``downstream``, name ``<type>_<stream>``, toxicity 1.0.

Forwarding: each enabled proxy listens on ``listen``; every accepted connection dials
``upstream`` and copies bytes both ways (32 KiB reads, a bounded queue per direction, so a
slow side back-pressures the other through TCP). ``upstream`` toxics act on client ->
upstream data, ``downstream`` on upstream -> client. When either side closes, the whole
connection is closed (as Toxiproxy does). Disabling a proxy closes its listener and its
connections; enabling listens again on the same address.

Toxics (``toxicity`` = the probability that a given connection gets the toxic, decided
per connection and direction when the toxic or the connection appears; adding, updating
and removing a toxic applies to live connections too):
  latency     latency, jitter (ms): each chunk leaves ``latency +- jitter`` after it arrived
  bandwidth   rate (KB/s, 1 KB = 1000 bytes): chunks paced to that rate, 100 ms slices
  slicer      average_size, size_variation (bytes), delay (us): chunks cut in small pieces
  timeout     timeout (ms): data is dropped; the connection closes after ``timeout`` from
              when the toxic met the connection; 0 = never. Removing it closes the
              connections it had stalled (as Toxiproxy >= 2.5 does); new ones flow normally
  reset_peer  timeout (ms): the first data after the toxic is swallowed, and ``timeout``
              later both sockets are closed with SO_LINGER 0 (TCP RST)
  limit_data  bytes: the connection closes once that many bytes went through
  slow_close  delay (ms): the close that follows an EOF is delayed by ``delay``

Not implemented: the ``/metrics`` and ``/events`` endpoints, ``/proxies/{name}/toxics``
toxic ordering by a ``"position"`` field, UDP, TLS, the CLI, the ``down`` toxic, and
Toxiproxy's exact chunk boundaries (bandwidth has no burst allowance; latency of two
stacked latency toxics is not additive, as in Toxiproxy, since both count from arrival).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import time
from typing import Any

from aiohttp import web

VERSION = "2.12.0-shoal-tests"
READ_SIZE = 32 * 1024
QUEUE_CHUNKS = 32
STREAMS = ("upstream", "downstream")
TOXIC_TYPES = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "limit_data": {"bytes": 0},
    "slow_close": {"delay": 0},
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _LinkClosed(Exception):
    """Unwinds a direction's toxic chain once a toxic closed the connection."""


# --------------------------------------------------------------------------- toxics


class Toxic:
    def __init__(self, name: str, type_: str, stream: str, toxicity: float,
                 attributes: dict) -> None:
        self.name = name
        self.type = type_
        self.stream = stream
        self.toxicity = toxicity
        self.attributes = attributes

    @classmethod
    def from_json(cls, body: Any) -> "Toxic":
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body")
        type_ = body.get("type")
        if type_ not in TOXIC_TYPES:
            raise ApiError(400, "invalid toxic type")
        stream = body.get("stream") or "downstream"
        if stream not in STREAMS:
            raise ApiError(400, "stream was invalid, can be either upstream or downstream")
        name = body.get("name") or f"{type_}_{stream}"
        toxicity = _toxicity(body.get("toxicity", 1.0))
        attributes = dict(TOXIC_TYPES[type_])
        attributes.update(_attributes(body.get("attributes") or {}, type_))
        return cls(name, type_, stream, toxicity, attributes)

    def update(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body")
        if "toxicity" in body:
            self.toxicity = _toxicity(body["toxicity"])
        if body.get("attributes"):
            self.attributes.update(_attributes(body["attributes"], self.type))

    def to_json(self) -> dict:
        return {"attributes": dict(self.attributes), "name": self.name, "type": self.type,
                "stream": self.stream, "toxicity": self.toxicity}

    def attr(self, key: str) -> float:
        return float(self.attributes.get(key) or 0)


def _toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ApiError(400, "toxicity must be a number between 0 and 1")
    return float(value)


def _attributes(attrs: Any, type_: str) -> dict:
    if not isinstance(attrs, dict):
        raise ApiError(400, "attributes must be an object")
    out = {}
    for key, value in attrs.items():
        if key not in TOXIC_TYPES[type_]:
            continue  # Toxiproxy ignores unknown attributes too
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ApiError(400, f"attribute {key} must be a non-negative number")
        out[key] = value
    return out


class _Stage:
    """One toxic as it applies to one direction of one connection."""

    def __init__(self, toxic: Toxic, pipe: "Pipe") -> None:
        self.toxic = toxic
        self.pipe = pipe
        self.active = random.random() < toxic.toxicity
        self.count = 0
        self.timer: asyncio.Task | None = None
        if self.active and toxic.type == "timeout" and toxic.attr("timeout") > 0:
            self.timer = asyncio.ensure_future(self._expire(toxic.attr("timeout") / 1000))

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.pipe.link.close()

    def detach(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.active and self.toxic.type == "timeout":
            self.pipe.link.close()


# --------------------------------------------------------------------------- forwarding


class Pipe:
    """One direction of a connection: reader task -> bounded queue -> toxic chain -> dst."""

    def __init__(self, link: "Link", stream: str, src: asyncio.StreamReader,
                 dst: asyncio.StreamWriter) -> None:
        self.link = link
        self.stream = stream
        self.src = src
        self.dst = dst
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.stages: dict[str, _Stage] = {}
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._read()),
                      asyncio.ensure_future(self._process())]

    def attach(self, toxic: Toxic) -> None:
        self.detach(toxic.name, cleanup=False)
        self.stages[toxic.name] = _Stage(toxic, self)

    def detach(self, name: str, cleanup: bool = True) -> None:
        stage = self.stages.pop(name, None)
        if stage is not None:
            if cleanup:
                stage.detach()
            elif stage.timer is not None:
                stage.timer.cancel()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.src.read(READ_SIZE)
                if not data:
                    break
                await self.queue.put((data, time.monotonic()))
        except (ConnectionError, OSError):
            self.link.close()
            return
        await self.queue.put(None)

    async def _process(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                stages = [s for s in self.stages.values() if s.active]
                if item is None:
                    for stage in stages:
                        if stage.toxic.type == "slow_close":
                            await asyncio.sleep(stage.toxic.attr("delay") / 1000)
                    self.link.close()
                    return
                data, arrived = item
                await self._emit(stages, 0, data, arrived)
        except _LinkClosed:
            return
        except (ConnectionError, OSError):
            self.link.close()

    async def _emit(self, stages: list, i: int, data: bytes, arrived: float) -> None:
        if self.link.closed:
            raise _LinkClosed
        if i == len(stages):
            self.dst.write(data)
            await self.dst.drain()
            return
        stage = stages[i]
        toxic = stage.toxic
        kind = toxic.type
        if kind == "latency":
            jitter = toxic.attr("jitter")
            delay = (toxic.attr("latency") + random.uniform(-jitter, jitter)) / 1000
            wait = arrived + delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._emit(stages, i + 1, data, arrived)
        elif kind == "bandwidth":
            rate = toxic.attr("rate") * 1000  # bytes per second
            if rate <= 0:
                await self._emit(stages, i + 1, data, arrived)
                return
            step = max(int(rate / 10), 1)
            while len(data) > step:
                await asyncio.sleep(0.1)
                await self._emit(stages, i + 1, data[:step], arrived)
                data = data[step:]
            await asyncio.sleep(len(data) / rate)
            await self._emit(stages, i + 1, data, arrived)
        elif kind == "slicer":
            average = int(toxic.attr("average_size"))
            variation = int(toxic.attr("size_variation"))
            delay = toxic.attr("delay") / 1_000_000
            if average <= 0:
                await self._emit(stages, i + 1, data, arrived)
                return
            first = True
            while data:
                size = max(1, average + random.randint(-variation, variation))
                if not first and delay > 0:
                    await asyncio.sleep(delay)
                first = False
                await self._emit(stages, i + 1, data[:size], arrived)
                data = data[size:]
        elif kind == "timeout":
            return  # dropped, as Toxiproxy drops it
        elif kind == "reset_peer":
            await asyncio.sleep(toxic.attr("timeout") / 1000)
            self.link.close(reset=True)
            raise _LinkClosed
        elif kind == "limit_data":
            remaining = int(toxic.attr("bytes")) - stage.count
            if len(data) < remaining:
                stage.count += len(data)
                await self._emit(stages, i + 1, data, arrived)
                return
            if remaining > 0:
                stage.count += remaining
                await self._emit(stages, i + 1, data[:remaining], arrived)
            self.link.close()
            raise _LinkClosed
        else:  # slow_close acts on the close only
            await self._emit(stages, i + 1, data, arrived)


class Link:
    """One client connection through a proxy and its upstream connection."""

    def __init__(self, proxy: "Proxy", client: tuple, upstream: tuple) -> None:
        self.proxy = proxy
        self.closed = False
        self.writers = (client[1], upstream[1])
        self.pipes = {"upstream": Pipe(self, "upstream", client[0], upstream[1]),
                      "downstream": Pipe(self, "downstream", upstream[0], client[1])}

    def start(self, toxics: list[Toxic]) -> None:
        for toxic in toxics:
            self.pipes[toxic.stream].attach(toxic)
        for pipe in self.pipes.values():
            pipe.start()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        for pipe in self.pipes.values():
            for stage in pipe.stages.values():
                if stage.timer is not None:
                    stage.timer.cancel()
        for writer in self.writers:
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):  # already gone: nothing to reset
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for pipe in self.pipes.values():
            for task in pipe.tasks:
                if task is not current:
                    task.cancel()


def _split_hostport(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ApiError(400, f"address {address!r} has no port")
    try:
        port_number = int(port)
    except ValueError:
        raise ApiError(400, f"address {address!r} has a bad port") from None
    return host.strip("[]"), port_number


class Proxy:
    def __init__(self, name: str, listen: str, upstream: str, enabled: bool) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = enabled
        self.toxics: dict[str, Toxic] = {}
        self.links: set[Link] = set()
        self.server: asyncio.AbstractServer | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "listen": self.listen, "upstream": self.upstream,
                "enabled": self.enabled,
                "toxics": [t.to_json() for t in self.toxics.values()]}

    async def start(self) -> None:
        if self.server is not None:
            return
        host, port = _split_hostport(self.listen)
        try:
            self.server = await asyncio.start_server(self._accept, host or None, port)
        except OSError as e:
            raise ApiError(500, f"listen tcp {self.listen}: {e.strerror or e}") from None
        sockname = self.server.sockets[0].getsockname()
        shown = host if host else "[::]"
        self.listen = f"{shown}:{sockname[1]}"
        self.enabled = True

    async def stop(self) -> None:
        self.enabled = False
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for link in list(self.links):
            link.close()
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        host, port = _split_hostport(self.upstream)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        if self.server is None:  # disabled while dialling
            up_writer.close()
            writer.close()
            return
        link = Link(self, (reader, writer), (up_reader, up_writer))
        self.links.add(link)
        link.start(list(self.toxics.values()))

    def add_toxic(self, toxic: Toxic) -> None:
        if toxic.name in self.toxics:
            raise ApiError(409, "toxic already exists")
        self.toxics[toxic.name] = toxic
        for link in list(self.links):
            link.pipes[toxic.stream].attach(toxic)

    def remove_toxic(self, name: str) -> None:
        toxic = self.toxics.pop(name, None)
        if toxic is None:
            raise ApiError(404, "toxic not found")
        for link in list(self.links):
            link.pipes[toxic.stream].detach(name)

    def update_toxic(self, name: str, body: Any) -> Toxic:
        toxic = self.toxics.get(name)
        if toxic is None:
            raise ApiError(404, "toxic not found")
        toxic.update(body)
        for link in list(self.links):
            link.pipes[toxic.stream].attach(toxic)
        return toxic


# --------------------------------------------------------------------------- HTTP API


class ToxiproxyServer:
    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None
        self.app = web.Application(middlewares=[self._errors])
        r = self.app.router
        r.add_get("/version", self.version)
        r.add_post("/reset", self.reset)
        r.add_get("/proxies", self.list_proxies)
        r.add_post("/proxies", self.create_proxy)
        r.add_post("/populate", self.populate)
        r.add_get("/proxies/{proxy}", self.get_proxy)
        r.add_post("/proxies/{proxy}", self.update_proxy)
        r.add_patch("/proxies/{proxy}", self.update_proxy)
        r.add_delete("/proxies/{proxy}", self.delete_proxy)
        r.add_get("/proxies/{proxy}/toxics", self.list_toxics)
        r.add_post("/proxies/{proxy}/toxics", self.create_toxic)
        r.add_get("/proxies/{proxy}/toxics/{toxic}", self.get_toxic)
        r.add_post("/proxies/{proxy}/toxics/{toxic}", self.update_toxic)
        r.add_patch("/proxies/{proxy}/toxics/{toxic}", self.update_toxic)
        r.add_delete("/proxies/{proxy}/toxics/{toxic}", self.delete_toxic)

    async def start(self, host: str = "127.0.0.1", port: int = 8474) -> tuple[str, int]:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.address = (host, self.runner.addresses[0][1])  # the real port for port 0
        return self.address

    async def stop(self) -> None:
        for proxy in list(self.proxies.values()):
            await proxy.stop()
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response({"error": e.message, "status": e.status},
                                     status=e.status)

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise ApiError(400, "bad request body") from None

    def _proxy(self, request: web.Request) -> Proxy:
        proxy = self.proxies.get(request.match_info["proxy"])
        if proxy is None:
            raise ApiError(404, "proxy not found")
        return proxy

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def reset(self, request: web.Request) -> web.Response:
        for proxy in self.proxies.values():
            for name in list(proxy.toxics):
                proxy.remove_toxic(name)
            await proxy.start()
        return web.Response(status=204)

    async def list_proxies(self, request: web.Request) -> web.Response:
        return web.json_response({n: p.to_json() for n, p in self.proxies.items()})

    async def _create(self, body: Any) -> Proxy:
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body")
        for key in ("name", "upstream"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise ApiError(400, f"missing required field: {key}")
        if body["name"] in self.proxies:
            raise ApiError(409, "proxy already exists")
        listen = body.get("listen") or "127.0.0.1:0"
        _split_hostport(body["upstream"])
        proxy = Proxy(body["name"], listen, body["upstream"], False)
        if body.get("enabled", True):
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return proxy

    async def create_proxy(self, request: web.Request) -> web.Response:
        proxy = await self._create(await self._body(request))
        return web.json_response(proxy.to_json(), status=201)

    async def populate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, list):
            raise ApiError(400, "bad request body")
        created = []
        for entry in body:
            if isinstance(entry, dict) and entry.get("name") in self.proxies:
                old = self.proxies.pop(entry["name"])
                await old.stop()
            created.append((await self._create(entry)).to_json())
        return web.json_response({"proxies": created}, status=201)

    async def get_proxy(self, request: web.Request) -> web.Response:
        return web.json_response(self._proxy(request).to_json())

    async def update_proxy(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        body = await self._body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body")
        moved = False
        for key in ("listen", "upstream"):
            value = body.get(key)
            if isinstance(value, str) and value and value != getattr(proxy, key):
                _split_hostport(value)
                setattr(proxy, key, value)
                moved = True
        enabled = body.get("enabled", proxy.enabled)
        if moved or not enabled:
            await proxy.stop()
        if enabled:
            await proxy.start()
        return web.json_response(proxy.to_json())

    async def delete_proxy(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        del self.proxies[proxy.name]
        await proxy.stop()
        return web.Response(status=204)

    async def list_toxics(self, request: web.Request) -> web.Response:
        return web.json_response([t.to_json() for t in self._proxy(request).toxics.values()])

    async def create_toxic(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        toxic = Toxic.from_json(await self._body(request))
        proxy.add_toxic(toxic)
        return web.json_response(toxic.to_json())

    def _toxic(self, request: web.Request) -> tuple[Proxy, Toxic]:
        proxy = self._proxy(request)
        toxic = proxy.toxics.get(request.match_info["toxic"])
        if toxic is None:
            raise ApiError(404, "toxic not found")
        return proxy, toxic

    async def get_toxic(self, request: web.Request) -> web.Response:
        return web.json_response(self._toxic(request)[1].to_json())

    async def update_toxic(self, request: web.Request) -> web.Response:
        proxy, toxic = self._toxic(request)
        proxy.update_toxic(toxic.name, await self._body(request))
        return web.json_response(toxic.to_json())

    async def delete_toxic(self, request: web.Request) -> web.Response:
        proxy, toxic = self._toxic(request)
        proxy.remove_toxic(toxic.name)
        return web.Response(status=204)


async def _main(host: str, port: int) -> None:
    server = ToxiproxyServer()
    address = await server.start(host, port)
    print(f"toxiproxy listening on {address[0]}:{address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8474)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
