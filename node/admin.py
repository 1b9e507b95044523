"""The admin HTTP API: a real aiohttp Application over the broker's own numbers.

Routes (all JSON):

- ``GET /healthz``       200 ``{"status": "ok", "node_id", "uptime_s", "connections", "sessions"}``
- ``GET /api/v1/stats``  ``broker.stats()`` as it is

The broker owns the numbers; this module only asks ``broker.stats()``, a dict with at
least ``node_id``, ``started_at`` (a ``time.time()`` value), ``connections`` and
``sessions``, plus whatever counters the broker keeps.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from aiohttp import web

__all__ = ["BROKER", "StatsSource", "make_admin_app", "start_admin"]


class StatsSource(Protocol):
    """What the admin API needs from the broker."""

    def stats(self) -> dict[str, Any]: ...


BROKER = web.AppKey("broker", StatsSource)


def _json(data: Any, status: int = 200) -> web.Response:
    # default=str: a counter type the broker adds later (Decimal, Enum) never breaks the API.
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


async def healthz(request: web.Request) -> web.Response:
    stats = request.app[BROKER].stats()
    return _json({
        "status": "ok",
        "node_id": stats["node_id"],
        "uptime_s": round(max(0.0, time.time() - stats["started_at"]), 3),
        "connections": stats["connections"],
        "sessions": stats["sessions"],
    })


async def api_stats(request: web.Request) -> web.Response:
    return _json(request.app[BROKER].stats())


def make_admin_app(broker: StatsSource) -> web.Application:
    """The admin Application for ``broker``; serve it with :func:`start_admin`."""
    app = web.Application()
    app[BROKER] = broker
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/stats", api_stats)
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
