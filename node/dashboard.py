"""The dashboard: one self-contained HTML page served at ``GET /`` of the admin port.

The page (``node/static/dashboard.html``: inline CSS and vanilla JavaScript, no build step,
nothing loaded from another origin) polls this node's own JSON every 2 s:
``/api/v1/cluster`` (membership, leader, per-node load; 404 on a node without a cluster,
then it shows this node alone) and ``/api/v1/stats`` (live counters, rates from their
deltas). The Content-Security-Policy below keeps it that way: scripts and styles only
inline, requests only to this origin.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from aiohttp import web

__all__ = ["add_dashboard_routes", "dashboard_html"]

_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"),
}


@lru_cache(maxsize=1)
def dashboard_html() -> str:
    """The page's text (package data, read once)."""
    return resources.files("node").joinpath("static", "dashboard.html").read_text("utf-8")


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(text=dashboard_html(), content_type="text/html", charset="utf-8",
                        headers=_HEADERS)


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the dashboard at ``GET /`` (and ``/dashboard``) of the admin ``app``."""
    app.router.add_get("/", _dashboard)
    app.router.add_get("/dashboard", _dashboard)
