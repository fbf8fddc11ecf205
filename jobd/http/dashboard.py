"""The dashboard of ``jobd-http`` (SPEC §10): ``GET /`` and the files it loads.

This module owns serving the page's static files from the package (``jobd/http/static``,
shipped as package data: no build step, nothing from a CDN) and the headers that keep
the page to itself: a content security policy allowing only its own scripts, styles and
calls, no referrer, no framing. The page needs no token to load; it signs in with one
and sends it only in the ``Authorization`` header of its own calls to the API.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

__all__ = ["router"]

#: the files the page is made of, and what each is
FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # a new version of jobd-http serves its new page at once
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    if name not in FILES:
        return PlainTextResponse(f"/static/{name}: the dashboard has no such file; "
                                 "open / for the dashboard", status_code=404)
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(data, media_type=FILES[name], headers=HEADERS)


def router() -> APIRouter:
    """The dashboard's routes: the page at ``/``, its script and style under ``/static/``."""
    r = APIRouter()

    # HEAD too: an uptime probe or `curl -I` of the dashboard's address
    @r.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return _file("index.html")

    @r.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(name: str) -> Response:
        return _file(name)

    return r
