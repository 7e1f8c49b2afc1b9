"""The Starlette app behind `memplan serve`: one static page and three JSON endpoints.

  GET /              the page (static/index.html, app.js, app.css; plotly.min.js from the plotly package)
  GET /api/form      the form: every training flag of options.FLAGS with its default and choices, the models
                     (catalog + --config labels), the catalog GPUs
  GET /api/plan?...  plan_view (api.py): estimate, per-GPU verdicts, fit, figure; a bad value -> 400 with the
                     CLI's one-line message as {"error": ...}
Anything else is a 404 / 405 with a one-line JSON error; an unexpected failure is a 500 that names the exception
class only (the traceback goes to the server's log, never to the page). Host headers are checked (DNS rebinding)
unless the server was started for remote use.
"""
from __future__ import annotations

import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from memplan import __version__
from memplan.errors import MemplanError
from memplan.report.figures import plotly_js
from memplan.web import api

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
HEADERS = {  # the page loads only its own files; nothing may frame it
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
log = logging.getLogger("memplan.web")


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=HEADERS)


def create_app(models: api.Models | None = None, allow_remote: bool = False) -> Starlette:
    models = models or api.Models()

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            path = plotly_js()
            if path is None:
                return _json({"error": "plotly is not installed: pip install 'memplan[web]'"}, 404)
            return FileResponse(path, media_type="text/javascript", headers=HEADERS)
        if name not in PAGE_FILES:  # a fixed list: no path from a request reaches the file system
            return _json({"error": f"no such file {name!r}"}, 404)
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=HEADERS)

    async def form(request: Request) -> Response:
        from memplan.catalog import gpu_list

        return _json({"memplan_version": __version__, "fields": api.form_fields(), "models": models.names(),
                      "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes, "kind": g.kind} for g in gpu_list()],
                      "defaults": {"model": api.DEFAULT_MODEL, "gpu": api.DEFAULT_GPU, "margin": ""}})

    def plan(request: Request) -> Response:  # sync: Starlette runs it in its thread pool, off the event loop
        try:
            return _json(api.plan_view(request.query_params, models))
        except MemplanError as e:
            return _json({"error": str(e)}, 400)

    async def health(request: Request) -> Response:
        return _json({"ok": True, "memplan_version": __version__})

    async def favicon(request: Request) -> Response:
        return Response(status_code=204, headers=HEADERS)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        words = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        return _json({"error": f"{request.method} {request.url.path}: {words}"}, exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("memplan serve: %s failed", request.url.path)
        return _json({"error": f"internal error ({exc.__class__.__name__}); the server log has the details"}, 500)

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/form", form),
              Route("/api/plan", plan), Route("/api/health", health), Route("/favicon.ico", favicon)]
    middleware = [] if allow_remote else [Middleware(TrustedHostMiddleware, allowed_hosts=LOCAL_HOSTS)]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
