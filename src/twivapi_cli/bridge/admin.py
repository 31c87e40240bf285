"""The admin app: the bridge's event stream, sessions, latency and Prometheus metrics.

Served only on a separate loopback port (``serve`` never binds it elsewhere) and only with the
bearer token ``serve`` generates per run and writes, with the address, to ``<state dir>/bridge.json``
(mode 0600). Nothing here is reachable through the public port or a tunnel.

    GET /events    Server-Sent Events: the event log from ``after`` (seq), then live; ``call``, ``type``
                   (prefix), ``since`` (epoch s) filter; ``once=1`` stops after the backlog. A viewer
                   too slow to keep up gets ``event: dropped`` with how many it lost.
    GET /sessions  active sessions with their last event
    GET /latency   latency histograms (p50/p95/p99, sparkline) and counters
    GET /metrics   the same in Prometheus text format
    /inspect, /calls/...  the call inspector (``inspector.py``)
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cluster import Dropped
from ..models import Event
from ..tail import Histogram
from .deps import Deps
from .http import error_response
from .inspector import CallIndex, inspector_routes

KEEPALIVE_S = 15.0
PROM_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _authorized(request: Request) -> bool:
    """The run's token, as ``Authorization: Bearer`` or, for what a browser loads by URL (the
    inspector's page, its files, event stream and audio), a ``token`` query parameter."""
    token = request.app.state.token
    if not token:
        return True
    header = request.headers.get("authorization", "")
    query = request.query_params.get("token", "")
    return (hmac.compare_digest(header.encode(), f"Bearer {token}".encode())
            or hmac.compare_digest(query.encode(), token.encode()))


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def guarded(request: Request) -> Response:
        if not _authorized(request):
            return error_response(401, "unauthorized", "admin token missing or wrong (see bridge.json)")
        return await endpoint(request)
    return guarded


def _sse(kind: str, data: Any, seq: int | None = None) -> str:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def _matches(event: Event, call: str | None, kind: str | None, since: float | None) -> bool:
    return ((call is None or event.call_sid == call) and (kind is None or event.type.startswith(kind))
            and (since is None or event.received_at >= since))


async def events(request: Request) -> Response:
    if not _authorized(request):
        return error_response(401, "unauthorized", "admin token missing or wrong (see bridge.json)")
    bridge: Deps = request.app.state.bridge
    query = request.query_params
    try:
        after = int(query.get("after", "0"))
        since = float(query["since"]) if query.get("since") else None
    except ValueError:
        return error_response(400, "bad_request", "after must be an integer, since a number")
    call, kind, once = query.get("call"), query.get("type"), query.get("once") == "1"
    return StreamingResponse(_stream(bridge, after, call, kind, since, once), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def _stream(bridge: Deps, after: int, call: str | None, kind: str | None, since: float | None,
                  once: bool) -> AsyncIterator[str]:
    """The event log from ``after``, then live (every instance's, when several share the store)."""
    quiet_since = time.monotonic()
    async for item in bridge.cluster.follow(bridge.store, after, call_sid=call, once=once):
        if item is None:   # nothing new for a while
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
        elif isinstance(item, Dropped):
            yield _sse("dropped", {"dropped": item.count})
        elif _matches(item, call, kind, since):
            quiet_since = time.monotonic()
            yield _sse("event", item.to_dict(), item.seq)


async def sessions(request: Request) -> JSONResponse:
    if not _authorized(request):
        return error_response(401, "unauthorized", "admin token missing or wrong (see bridge.json)")
    bridge = request.app.state.bridge
    now = time.time()
    rows = []
    for session in await bridge.store.active_sessions():
        last = bridge.recorder.last_event.get(session.call_sid)
        rows.append({**session.to_dict(), "age_s": round(now - session.created_at, 1),
                     "last_event": last[0] if last else None,
                     "last_event_age_s": round(now - last[1], 1) if last else None})
    return JSONResponse({"sessions": rows})


async def latency(request: Request) -> JSONResponse:
    if not _authorized(request):
        return error_response(401, "unauthorized", "admin token missing or wrong (see bridge.json)")
    bridge = request.app.state.bridge
    return JSONResponse({"latency": bridge.recorder.latency.snapshot(), "counters": dict(bridge.recorder.counters),
                         "http": {f"{path} {status}": n for (path, status), n in bridge.http_counts.items()}})


class _Collector:
    """Prometheus view of the recorder: built at scrape time from the same histograms tail shows."""

    def __init__(self, bridge: Deps, active: int):
        self.bridge, self.active = bridge, active

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily("twivapi_latency_ms", "Latency of the bridge's steps, ms", labels=["figure"])
        for name, histogram in self.bridge.recorder.latency.histograms.items():
            latency.add_metric([name], _buckets(histogram), sum_value=histogram.total)
        yield latency
        http = CounterMetricFamily("twivapi_http_responses", "Webhook responses by route and status",
                                   labels=["route", "status"])
        for (path, status), n in self.bridge.http_counts.items():
            http.add_metric([path, str(status)], n)
        yield http
        events = CounterMetricFamily("twivapi_events", "Events recorded, by type", labels=["type"])
        for kind, n in self.bridge.recorder.counters.items():
            events.add_metric([kind], n)
        yield events
        counters = self.bridge.recorder.counters
        yield CounterMetricFamily("twivapi_interruptions", "Barge-ins that sent clear",
                                  value=counters.get("media.interruptions", 0))
        yield CounterMetricFamily("twivapi_frames_relayed", "Media frames relayed (sampled relay stamps x 50)",
                                  value=counters.get("media.relay", 0) * 50)
        yield CounterMetricFamily("twivapi_errors", "Refused or failed work",
                                  value=sum(n for k, n in counters.items() if k in (
                                      "media.bad_message", "vapi.setup-failed", "state.rejected",
                                      "media.handshake_refused", "parked.dropped")))
        yield GaugeMetricFamily("twivapi_active_sessions", "Sessions not yet ended", value=self.active)
        forwarder = self.bridge.forwarder
        if forwarder.vapi_url or forwarder.twilio_url:   # serve --forward-to / --forward-twilio-to
            yield GaugeMetricFamily("twivapi_forward_queued", "Informational messages waiting to be forwarded",
                                    value=forwarder.queued)
            yield CounterMetricFamily("twivapi_forward_dropped", "Forwarded messages dropped (queue full or "
                                      "undeliverable after retries)", value=counters.get("forward.dropped", 0))
            yield CounterMetricFamily("twivapi_forward_fallbacks", "Request messages answered with the built-in "
                                      "answer because the app did not answer in time or well",
                                      value=counters.get("forward.fallback", 0))


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    cumulative = 0
    ordered = sorted(histogram.counts.items())
    index = 0
    for bound in PROM_BOUNDS_MS:
        while index < len(ordered) and histogram._value(ordered[index][0]) <= bound:
            cumulative += ordered[index][1]
            index += 1
        out.append((str(float(bound)), cumulative))
    out.append(("+Inf", histogram.count))
    return out


async def metrics(request: Request) -> Response:
    if not _authorized(request):
        return error_response(401, "unauthorized", "admin token missing or wrong (see bridge.json)")
    bridge = request.app.state.bridge
    registry = CollectorRegistry()
    registry.register(_Collector(bridge, await bridge.store.count_active()))
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


def create_admin_app(bridge_app: Starlette, token: str | None) -> Starlette:
    """The admin app over a bridge app's dependencies (same recorder, store and cluster)."""
    inspect = [Route(r.path, _guarded(r.endpoint), methods=r.methods) for r in inspector_routes()
               if isinstance(r, Route)]
    app = Starlette(routes=[Route("/events", events), Route("/sessions", sessions), Route("/latency", latency),
                            Route("/metrics", metrics), *inspect])
    bridge: Deps = bridge_app.state.deps
    app.state.bridge, app.state.bridge_app, app.state.token = bridge, bridge_app, token
    app.state.call_index = index = CallIndex()
    bridge.recorder.listeners.append(index.observe)
    return app
