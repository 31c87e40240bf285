"""The bridge's ASGI app: ``create_app(settings, store, vapi)``, explicit routes and dependencies.

No module-level app and no environment reads: everything the handlers need hangs off
``app.state`` (settings, store, recorder, registry, vapi, tools), built here.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import __version__
from ..config import Settings
from ..errors import StoreError
from ..store import Store
from . import media, twilio_hooks, vapi_hooks
from .events import Recorder
from .http import HttpError, error_response
from .sessions import CallRegistry
from .tools import ToolRegistry

log = logging.getLogger("twivapi.bridge")


def check_settings(settings: Settings) -> None:
    """Fail at start, naming every variable a mode needs."""
    needed = ["twilio_auth_token", "vapi_webhook_secret"]
    if settings.mode in ("stream", "bypass"):
        needed += ["vapi_api_key", "vapi_assistant_id"]
    if settings.mode == "bypass":
        needed.append("vapi_phone_number_id")
    settings.require(*needed)


async def health(request: Request) -> JSONResponse:
    state = request.app.state
    store = await state.store.health()
    active = len(await state.store.active_sessions()) if store.get("ok") else None
    body = {"status": "ok" if store.get("ok") else "degraded", "version": __version__, "mode": state.settings.mode,
            "instance": state.instance, "active_sessions": active, "store": store,
            "uptime_s": round(time.monotonic() - state.started, 1), **state.registry.stats()}
    return JSONResponse(body, status_code=200 if store.get("ok") else 503)


async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message)


async def _starlette_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    log.error("store unavailable on %s: %s", request.url.path, exc)
    return error_response(503, "store_unavailable", "state store unavailable; retry later")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal_error", "internal error (logged)")


def routes(extra: list | None = None) -> list:
    table = [
        Route("/twilio/voice", twilio_hooks.voice, methods=["POST"]),
        Route("/twilio/status", twilio_hooks.status, methods=["POST"]),
        Route("/twilio/after-stream", twilio_hooks.after_stream, methods=["POST"]),
        Route("/vapi/webhook", vapi_hooks.webhook, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return table + media.routes() + (extra or [])


class CountResponses:
    """ASGI middleware: responses by route and status, for /metrics (known routes only: a scanner
    hitting random paths must not grow the table)."""

    def __init__(self, app, counts: dict, known: set[str]):
        self.app, self.counts, self.known = app, counts, known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.known else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                key = (path, message["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(settings: Settings, store: Store, vapi: Any, *, tools: ToolRegistry | None = None,
               instance: str | None = None, extra_routes: list | None = None) -> Starlette:
    recorder = Recorder(store, instance or uuid.uuid4().hex[:8])
    registry = CallRegistry(settings, store, recorder, vapi)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await store.open()
        registry.start()
        try:
            await registry.recover()
        except StoreError as exc:   # serve anyway: /health says the store is down
            log.warning("could not recover the previous run's sessions: %s", exc)
        app.state.started = time.monotonic()
        try:
            yield
        finally:
            await registry.stop()
            await vapi.aclose()
            await store.close()

    table = routes(extra_routes)
    http_counts: dict[tuple[str, int], int] = {}
    app = Starlette(routes=table, lifespan=lifespan, exception_handlers={
        HttpError: _http_error, HTTPException: _starlette_error, StoreError: _store_error, Exception: _unexpected},
        middleware=[Middleware(CountResponses, counts=http_counts, known={r.path for r in table})])
    app.state.http_counts = http_counts
    app.state.settings = settings
    app.state.store = store
    app.state.recorder = recorder
    app.state.registry = registry
    registry.processor = vapi_hooks.MessageProcessor(app.state)
    app.state.vapi = vapi
    app.state.tools = tools or ToolRegistry.default()
    app.state.instance = recorder.instance
    app.state.started = time.monotonic()
    return app
