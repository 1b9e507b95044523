"""The admin HTTP API: a real aiohttp Application over the broker's own state.

Routes (JSON unless said otherwise; errors are ``{"error": "<what happened and what to
do>"}`` with a 4xx/5xx status):

- ``GET /healthz``            200 ``{"status": "ok", "node_id", "uptime_s", "connections", "sessions"}``
- ``GET /readyz``             200 ``{"status": "ready"}`` when the node takes clients, else
  503 ``{"status": "not ready", "reason"}`` (starting, stopping, joining, leaving, Raft minority)
- ``GET /metrics``            Prometheus text format (node/metrics.py)
- ``GET /api/v1/stats``       ``broker.stats()`` as it is
- ``GET /api/v1/nodes``       the cluster's nodes (a node alone: itself)
- ``GET /api/v1/clients``     connected clients, paged; ``GET .../{client_id}`` one of them
- ``DELETE /api/v1/clients/{client_id}`` (or ``POST .../{client_id}/kick``): close the
  connection (v5 DISCONNECT 0x98 Administrative action); in a cluster, forwarded to the
  node the client is connected to
- ``GET /api/v1/sessions``    sessions on this node, paged; ``GET .../{client_id}`` one
  session in detail (in a cluster also its owner, epoch and holder, wherever it is)
- ``GET /api/v1/subscriptions``  paged, ``?client_id=`` to narrow
- ``GET /api/v1/retained``    retained messages, paged

Paging: ``?limit=N`` (default 100, at most 1000) and ``?after=<the previous page's
next>``; answers ``{"items": [...], "next": <cursor> | null, "total": <all items>}``,
sorted by client id (subscriptions: client id, filter; retained: topic).

The cluster plugs in through :data:`CLUSTER_ADMIN` (an object with the
:class:`ClusterAdmin` methods, set by cluster/main.py before the app starts), so ``node``
never imports ``cluster``; it may also add its own routes (``/api/v1/cluster``...).
"""

from __future__ import annotations

import base64
import bisect
import hmac
import json
import logging
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from .config import ConfigError, is_loopback
from .dashboard import add_dashboard_routes
from .metrics import CONTENT_TYPE, Exposition, broker_metrics
from .mqtt.codes import EXPIRY_NEVER

__all__ = ["BROKER", "CLUSTER_ADMIN", "ClusterAdmin", "StatsSource",
           "load_admin_token", "make_admin_app",
           "start_admin"]

log = logging.getLogger("shoal.admin")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
PREVIEW_BYTES = 64  # of a retained payload, shown in GET /api/v1/retained


class StatsSource(Protocol):
    """What the admin API needs from the broker (node.broker.Broker)."""

    def stats(self) -> dict[str, Any]: ...


class ClusterAdmin(Protocol):
    """What the cluster adds to the node's admin API."""

    def session_fields(self, client_id: str) -> dict:
        """``owner``, ``epoch``, ``holder`` of ``client_id`` from the routing table."""

    def nodes(self) -> list[dict]:
        """The members as ``GET /api/v1/cluster`` lists them."""

    async def kick_remote(self, client_id: str) -> dict | None:
        """Kick ``client_id`` on the node holding its session, when that is another node:
        ``{"node", "kicked": bool}`` or ``{"node", "admin", "error"}``; None when no other
        node holds it."""

    def metrics(self, expo: Exposition) -> None:
        """Add the cluster's families (Raft, takeovers, forwarding)."""


BROKER = web.AppKey("broker", StatsSource)
CLUSTER_ADMIN = web.AppKey("cluster_admin", ClusterAdmin)


def _json(data: Any, status: int = 200, headers=None) -> web.Response:
    # default=str: a counter type the broker adds later (Decimal, Enum) never breaks the API.
    return web.json_response(data, status=status, headers=headers,
                             dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, message: str, **extra) -> web.Response:
    return _json({"error": message, **extra}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler):
    """The router's 404 / 405 and our own bugs as JSON errors that say what to do."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        path = request.path
        if exc.status == 404:
            if path.startswith("/api/v1/cluster") and CLUSTER_ADMIN not in request.app:
                msg = ("this node runs alone (started without --cluster-port): it has no "
                       "cluster; GET /api/v1/nodes lists it")
            else:
                msg = (f"no such endpoint: {request.method} {path}; the endpoints are "
                       "listed in the README, section Admin API")
            return _error(404, msg)
        if exc.status == 405:
            allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
            return _json({"error": f"{request.method} not allowed on {path}; use "
                                   f"{' or '.join(allowed) or 'another method'}"},
                         status=405, headers={"Allow": ",".join(allowed)})
        return _error(exc.status, f"{exc.reason}: {exc.text or path}")
    except Exception:
        log.exception("admin API internal error path=%s", request.path)
        return _error(500, "internal error in the admin API; see the node's log")


# -- who may ask ---------------------------------------------------------------------------------

#: paths served without the token: probes, and the dashboard page (it holds no data; it
#: asks for the token and sends it with every request)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/dashboard"})


def load_admin_token(config) -> str | None:
    """The admin API's bearer token: ``admin_token``, else the first line of
    ``admin_token_file``; None when neither is set. ConfigError for a file that cannot be
    read or holds a short token."""
    if config.admin_token:
        return config.admin_token
    path = config.admin_token_file
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except OSError as err:
        raise ConfigError(f"admin_token_file {path} cannot be read ({err.strerror}): "
                          "check the path and its permissions") from None
    if len(token) < 16:
        raise ConfigError(f"admin_token_file {path}: the token on its first line must be "
                          "at least 16 characters (e.g. `openssl rand -hex 24`)")
    return token


def _token_guard(token: str | None, metrics_open: bool, local_only: bool):
    """Every request but the open paths carries ``Authorization: Bearer <token>`` (when a
    token is set); a state-changing request sent by a browser from another origin is
    refused either way (a page elsewhere cannot drive this API through the user's
    browser); and an API bound to loopback answers only requests addressed to a loopback
    name (``local_only``: a page whose name was rebound to 127.0.0.1 gets nothing)."""
    expected = token.encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler):
        public = request.path in OPEN_PATHS or (metrics_open and request.path == "/metrics")
        if local_only and not public:  # (a probe may come without a Host)
            name = urlsplit("//" + (request.host or "")).hostname or ""
            if not is_loopback(name):
                return _error(403, f"Host {request.host!r} is not this node's loopback "
                                   "address: use http://127.0.0.1:PORT (an API bound to "
                                   "another address is reached by that address)")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.host:
                return _error(403, f"cross-origin request refused (Origin {origin} is not "
                                   f"{request.host}): call the admin API from its own page, "
                                   "the CLI or a client that sends no Origin")
        if expected is None or public:
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 expected):
            return _json({"error": "this admin API needs a token: send `Authorization: "
                                   "Bearer <admin_token>` (the CLI sends SHOAL_ADMIN_TOKEN)"},
                         status=401, headers={"WWW-Authenticate": 'Bearer realm="shoal"'})
        return await handler(request)
    return guard


# -- health, readiness, metrics, stats -------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    stats = request.app[BROKER].stats()
    return _json({
        "status": "ok",
        "node_id": stats["node_id"],
        "uptime_s": round(max(0.0, time.time() - stats["started_at"]), 3),
        "connections": stats["connections"],
        "sessions": stats["sessions"],
    })


def _not_ready_reason(broker) -> str | None:
    check = getattr(broker, "not_ready_reason", None)
    return None if check is None else check()


async def readyz(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    reason = _not_ready_reason(broker)
    if reason is None:
        return _json({"status": "ready", "node_id": broker.node_id})
    return _json({"status": "not ready", "node_id": broker.node_id, "reason": reason,
                  "error": f"not ready: {reason}; send clients to another node"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    expo = Exposition(broker.node_id)
    broker_metrics(expo, broker, _not_ready_reason(broker) is None)
    ext = request.app.get(CLUSTER_ADMIN)
    if ext is not None:
        ext.metrics(expo)
    return web.Response(body=expo.render().encode(), headers={"Content-Type": CONTENT_TYPE})


async def api_stats(request: web.Request) -> web.Response:
    return _json(request.app[BROKER].stats())


async def api_nodes(request: web.Request) -> web.Response:
    ext = request.app.get(CLUSTER_ADMIN)
    if ext is not None:
        return _json({"items": ext.nodes()})
    broker = request.app[BROKER]
    config = broker.config
    return _json({"items": [{
        "id": broker.node_id,
        "addresses": {"mqtt": f"{config.host}:{config.mqtt_port}",
                      "admin": f"{config.admin_host}:{config.admin_port}"},
        "role": "standalone",
        "status": "up" if broker.listening else "starting",
        "sessions": len(broker.sessions),
        "connections": len(broker.clients),
        "uptime_s": round(time.time() - broker.started_at, 1),
    }]})


# -- paging ----------------------------------------------------------------------------------

class _BadRequest(Exception):
    pass


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise _BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}, not {raw!r}")
    return limit


def _page(keys: list, view, after, limit: int) -> dict:
    """``keys`` sorted: the page after ``after``, ``view(key)`` of each (only the page's
    views are built: a page of a big listing costs its sort, not a view per item)."""
    start = 0 if after is None else bisect.bisect_right(keys, after)
    chosen = keys[start:start + limit]
    more = start + limit < len(keys)
    return {"items": [view(k) for k in chosen], "next": chosen[-1] if more and chosen
            else None, "total": len(keys)}


def _encode_cursor(key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> tuple | None:
    if raw is None:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        return tuple(str(k) for k in key)
    except (ValueError, TypeError) as err:
        raise _BadRequest(f"after={raw!r} is not a cursor this API gave out (use the "
                          "previous page's \"next\")") from err


def _paged(build):
    """A paged GET handler from ``build(request, limit) -> dict``; a bad query is 400."""
    async def handler(request: web.Request) -> web.Response:
        try:
            return _json(build(request, _limit(request)))
        except _BadRequest as err:
            return _error(400, str(err))
    return handler


# -- clients ------------------------------------------------------------------------------------

def _protocol(version: int) -> str:
    return "5.0" if version == 5 else "3.1.1" if version == 4 else "3.1"


def _client_view(client) -> dict:
    session = client.session
    return {
        "client_id": client.client_id,
        "peer": client.peer,
        "protocol": _protocol(client.version),
        "keep_alive_s": client.keep_alive_timeout / 1.5 if client.keep_alive_timeout else 0,
        "subscriptions": len(session.subscriptions) if session is not None else 0,
        "queued": len(session.queue) if session is not None else 0,
        "inflight": len(session.inflight_out) if session is not None else 0,
        "expiry_interval": _expiry(session)[0] if session is not None else None,
    }


def _connected(broker) -> dict:
    """ClientID -> connection, for the connections that completed their CONNECT."""
    return {c.client_id: c for c in broker.clients
            if c.session is not None and not c.closing}


def _clients(request: web.Request, limit: int) -> dict:
    clients = _connected(request.app[BROKER])
    return _page(sorted(clients), lambda k: _client_view(clients[k]),
                 request.query.get("after"), limit)


async def api_client(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    client_id = request.match_info["client_id"]
    client = _connected(broker).get(client_id)
    if client is not None:
        return _json(dict(_client_view(client), node=broker.node_id))
    ext = request.app.get(CLUSTER_ADMIN)
    holder = ext.session_fields(client_id).get("holder") if ext is not None else None
    if holder and holder != broker.node_id:
        return _error(404, f"{client_id!r} is not connected to {broker.node_id}; its session "
                           f"is on {holder}: ask that node", node=holder)
    return _error(404, f"no client {client_id!r} is connected to {broker.node_id}")


async def api_kick(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    client_id = request.match_info["client_id"]
    if broker.kick(client_id):
        log.info("kicked by an operator client_id=%s node=%s", client_id, broker.node_id)
        return _json({"kicked": True, "client_id": client_id, "node": broker.node_id})
    ext = request.app.get(CLUSTER_ADMIN)
    if ext is not None:
        result = await ext.kick_remote(client_id)
        if result is not None:
            node = result["node"]
            if "error" in result:
                admin = result.get("admin") or "the admin URL of " + node
                return _error(502, f"{client_id!r} is on {node}, which did not answer "
                                   f"({result['error']}); ask it directly: shoal kick "
                                   f"--admin http://{admin} {client_id}", node=node)
            if result["kicked"]:
                return _json({"kicked": True, "client_id": client_id, "node": node,
                              "forwarded": True})
            return _error(404, f"{client_id!r} has a session on {node} but no connection "
                               "there: nothing to kick", node=node)
    return _error(404, f"no client {client_id!r} is connected"
                       f"{' to any node' if ext is not None else ''}: nothing to kick")


async def api_auth_reload(request: web.Request) -> web.Response:
    """Reread ``password_file`` and ``acl_file`` (as SIGHUP does), on this node."""
    broker = request.app[BROKER]
    auth = broker.auth
    if auth.passwords is None and auth.acl is None and auth.plugin is None:
        return _error(404, "this node has no password_file, acl_file or auth_plugin: "
                      "nothing to reload")
    try:
        loaded = broker.reload_auth()
    except ConfigError as err:
        return _error(400, f"not reloaded: {err}; the files loaded before stay")
    log.warning("auth reloaded node=%s users=%s acl_rules=%s subscriptions_removed=%d "
                "(admin API)", broker.node_id, loaded["users"], loaded["acl_rules"],
                loaded["subscriptions_removed"])
    return _json({"reloaded": True, **loaded, "node": broker.node_id})


# -- sessions --------------------------------------------------------------------------------

def _sub_view(entry) -> dict:
    return {"filter": entry.topic_filter, "qos": entry.qos, "no_local": entry.no_local,
            "retain_as_published": entry.retain_as_published,
            "retain_handling": entry.retain_handling, "subscription_id": entry.sub_id,
            "share_group": entry.share_group}


def _expiry(session) -> tuple[int | None, float | None]:
    interval = session.expiry_interval
    return (None if interval == EXPIRY_NEVER else interval), session.expires_at


def _session_summary(session) -> dict:
    interval, expires_at = _expiry(session)
    return {"client_id": session.client_id, "state": session.state.value,
            "connected": session.client is not None,
            "subscriptions": len(session.subscriptions), "queued": len(session.queue),
            "inflight": len(session.inflight_out), "expiry_interval": interval,
            "expires_at": expires_at}


def _session_detail(broker, session) -> dict:
    interval, expires_at = _expiry(session)
    client = session.client
    return {
        "client_id": session.client_id,
        "node": broker.node_id,
        "here": True,
        "owner": broker.node_id,
        "epoch": session.epoch,
        "holder": broker.node_id,
        "state": session.state.value,
        "connected": client is not None,
        "peer": client.peer if client is not None else None,
        "user": session.username,  # the login it was opened or last resumed with
        "protocol": _protocol(session.version),
        "subscriptions": [_sub_view(e) for _, e in sorted(session.subscriptions.items())],
        "queued": len(session.queue),
        "inflight": len(session.inflight_out),
        "inflight_in": len(session.inflight_in),
        "expiry_interval": interval,  # seconds; null: never expires
        "expires_at": expires_at,  # unix time once offline; null while connected or never
        "will": session.will is not None or session.will_at is not None,
        "will_at": session.will_at,
        "persistent": session.journal is not None,
        "created_at": session.created_at,
    }


def _sessions(request: web.Request, limit: int) -> dict:
    sessions = request.app[BROKER].sessions
    return _page(sorted(sessions), lambda k: _session_summary(sessions[k]),
                 request.query.get("after"), limit)


async def api_session(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    client_id = request.match_info["client_id"]
    session = broker.sessions.get(client_id)
    view = _session_detail(broker, session) if session is not None else {
        "client_id": client_id, "node": broker.node_id, "here": False,
        "owner": None, "epoch": None, "holder": None}
    ext = request.app.get(CLUSTER_ADMIN)
    if ext is not None:
        view.update(ext.session_fields(client_id))  # the routing table's owner, epoch, holder
    if not (view["here"] or view["owner"] or view["holder"]):
        return _error(404, f"no session {client_id!r} "
                           f"{'in the cluster' if ext is not None else 'on ' + broker.node_id}",
                      **view)
    return _json(view)


# -- subscriptions, retained ---------------------------------------------------------------

def _subscriptions(request: web.Request, limit: int) -> dict:
    sessions = request.app[BROKER].sessions
    only = request.query.get("client_id")
    ids = [only] if only is not None else sorted(sessions)
    after = _decode_cursor(request.query.get("after"))
    # sessions before the cursor's are skipped whole; filters are sorted per session
    start = 0 if after is None else bisect.bisect_left(ids, after[0])
    items: list = []
    last = None
    more = False
    for cid in ids[start:]:
        session = sessions.get(cid)
        if session is None:
            continue
        for topic_filter in sorted(session.subscriptions):
            if after is not None and (cid, topic_filter) <= after:
                continue
            if len(items) == limit:
                more = True
                break
            items.append(dict(_sub_view(session.subscriptions[topic_filter]), client_id=cid))
            last = (cid, topic_filter)
        if more:
            break
    total = sum(len(sessions[c].subscriptions) for c in ids if c in sessions)
    return {"items": items, "next": _encode_cursor(last) if more and last else None,
            "total": total}


def _retained_view(msg) -> dict:
    payload = bytes(msg.payload)
    return {"topic": msg.topic, "qos": msg.qos, "payload_bytes": len(payload),
            "payload_preview": payload[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
            "expires_at": msg.expires_at}


def _retained(request: web.Request, limit: int) -> dict:
    retained = dict(request.app[BROKER].retained.items())
    return _page(sorted(retained), lambda k: _retained_view(retained[k]),
                 request.query.get("after"), limit)


def make_admin_app(broker: StatsSource, token: str | None = None,
                   metrics_open: bool = True, local_only: bool = False) -> web.Application:
    """The admin Application for ``broker``; serve it with :func:`start_admin`.
    ``token``: the bearer token every request but the open paths needs (None: none);
    ``local_only``: it listens on loopback (requests for other host names are refused)."""
    app = web.Application(middlewares=[_json_errors,
                                       _token_guard(token, metrics_open, local_only)])
    app[BROKER] = broker
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/stats", api_stats)
    app.router.add_get("/api/v1/nodes", api_nodes)
    app.router.add_get("/api/v1/clients", _paged(_clients))
    app.router.add_get("/api/v1/clients/{client_id:.+}", api_client)
    app.router.add_delete("/api/v1/clients/{client_id:.+}", api_kick)
    app.router.add_post("/api/v1/clients/{client_id:.+}/kick", api_kick)
    app.router.add_post("/api/v1/auth/reload", api_auth_reload)
    app.router.add_get("/api/v1/sessions", _paged(_sessions))
    app.router.add_get("/api/v1/sessions/{client_id:.+}", api_session)
    app.router.add_get("/api/v1/subscriptions", _paged(_subscriptions))
    app.router.add_get("/api/v1/retained", _paged(_retained))
    add_dashboard_routes(app)  # GET /: the dashboard page (node/dashboard.py)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Set up a runner and a TCP site for ``app`` and start listening.

    Returns the runner; the caller owns it and must ``await runner.cleanup()``.
    With ``port=0`` the bound port is in ``runner.addresses``.  The access log is
    off: a load balancer's health checks would otherwise fill the log.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
