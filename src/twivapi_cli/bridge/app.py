"""The bridge's ASGI app: ``create_app(settings, store, cluster, vapi)``, explicit routes and
dependencies.

No module-level app and no environment reads. Everything the handlers need is one frozen ``Deps``
(``bridge/deps.py``), built here in dependency order, each part given what it uses through its
constructor:

    store, cluster ─> recorder ─> signals ─> calls ─> control ─> processor ─> drainer ─> setup ─> sweeper

Requests flow the other way: a webhook handler (twilio_hooks, vapi_hooks) or the media socket
(media) acks first, then moves calls (calls), queues Vapi messages (drain) or starts a setup
(setup); the cluster carries signals and queues between instances.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..cluster import Cluster
from ..config import Settings
from ..errors import StoreError
from ..models import Mode
from ..store import Store
from . import media, twilio_hooks, vapi_hooks
from .call_control import CallControl
from .calls import Calls
from .deps import Deps, deps
from .drain import Drainer
from .events import Recorder
from .forward import Forwarder
from .http import HttpError, error_response
from .setup import SetupPool
from .signals import Signals
from .sweeper import Sweeper
from .tools import ToolRegistry
from .webhook_log import CaptureWebhooks

log = logging.getLogger("twivapi.bridge")


def check_settings(settings: Settings) -> None:
    """Fail at start, naming every variable a mode needs."""
    needed = ["twilio_auth_token", "vapi_webhook_secret"]
    if settings.mode in (Mode.STREAM, Mode.BYPASS):
        needed += ["vapi_api_key", "vapi_assistant_id"]
    if settings.mode == Mode.BYPASS:
        needed.append("vapi_phone_number_id")
    settings.require(*needed)


async def health(request: Request) -> JSONResponse:
    bridge = deps(request)
    store = await bridge.store.health()
    active = await bridge.store.count_active() if store.get("ok") else None
    status = "draining" if bridge.lifecycle.draining else "ok" if store.get("ok") else "degraded"
    body = {"status": status, "version": __version__, "mode": bridge.settings.mode,
            "instance": bridge.instance, "active_sessions": active, "store": store,
            "uptime_s": round(time.monotonic() - bridge.started, 1), **bridge.stats()}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


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


def routes(extra: list[BaseRoute] | None = None) -> list[BaseRoute]:
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

    def __init__(self, app: ASGIApp, counts: dict[tuple[str, int], int], known: set[str]):
        self.app, self.counts, self.known = app, counts, known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.known else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (path, message["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def build_deps(settings: Settings, store: Store, cluster: Cluster, vapi: Any,
               tools: ToolRegistry | None = None) -> Deps:
    recorder = Recorder(store, cluster)
    signals = Signals(store, cluster)
    calls = Calls(store, recorder, signals, vapi)
    control = CallControl(settings, calls, recorder)
    drainer = Drainer(cluster.queues, vapi_hooks.MessageProcessor(store, calls, signals, recorder, control), recorder)
    setup = SetupPool(settings, store, calls, drainer, recorder, vapi)
    sweeper = Sweeper(settings, store, cluster, calls, setup, drainer, recorder)
    return Deps(settings=settings, store=store, cluster=cluster, vapi=vapi, recorder=recorder, signals=signals,
                calls=calls, drainer=drainer, setup=setup, sweeper=sweeper,
                tools=tools or ToolRegistry.from_settings(settings), control=control,
                forwarder=Forwarder(settings, recorder, cluster.instance), started=time.monotonic())


def create_app(settings: Settings, store: Store, cluster: Cluster, vapi: Any, *, tools: ToolRegistry | None = None,
               extra_routes: list[BaseRoute] | None = None) -> Starlette:
    bridge = build_deps(settings, store, cluster, vapi, tools)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        await cluster.open(bridge.signals)
        bridge.sweeper.start()
        try:
            await bridge.sweeper.recover()
        except StoreError as exc:   # serve anyway: /health says the store is down
            log.warning("could not recover the previous run's sessions: %s", exc)
        try:
            yield
        finally:
            await bridge.sweeper.stop()
            await bridge.setup.stop()
            await bridge.drainer.stop()
            await bridge.forwarder.stop()
            await bridge.calls.stop()
            await bridge.vapi_sockets.aclose()
            await bridge.control.aclose()
            await cluster.close()
            await vapi.aclose()
            await store.close()

    table = routes(extra_routes)
    handlers: dict[Any, Any] = {   # Starlette types handlers for Exception only; each takes its own class
        HttpError: _http_error, HTTPException: _starlette_error, StoreError: _store_error, Exception: _unexpected}
    app = Starlette(routes=table, lifespan=lifespan, exception_handlers=handlers,
        middleware=[Middleware(CountResponses, counts=bridge.http_counts, known={r.path for r in table if isinstance(r, (Route, WebSocketRoute))}),
                    Middleware(CaptureWebhooks, log=bridge.webhooks)])
    app.state.deps = bridge
    return app
