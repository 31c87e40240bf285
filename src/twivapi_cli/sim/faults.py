"""Fault injection for the simulators: make chosen requests slow, fail, return garbage or hang.

One ``Faults`` registry per simulator app. Rules are added from Python (``faults.add(...)``) or over
HTTP on the app itself, at ``/_sim/faults``::

    GET    /_sim/faults          list the rules (with how often each fired)
    POST   /_sim/faults          add one: {"kind": "status", "method": "POST", "path": "/call", "status": 429}
    DELETE /_sim/faults          clear all
    DELETE /_sim/faults/{id}     remove one

A rule matches on ``method`` ("*" = any) and ``path`` (an fnmatch pattern, e.g. ``/call*`` or
``/2010-04-01/Accounts/*/Calls.json``); ``count`` limits how many times it fires (then it expires),
``probability`` makes it fire on a share of matching requests (seeded, so runs repeat).

Kinds applied to HTTP requests by ``FaultMiddleware``:

- ``latency``  wait ``delay`` seconds, then answer normally
- ``status``   answer ``status`` with ``body`` (dict → JSON, str → as is; default: the API's own error
               shape) and optional ``headers`` (e.g. ``{"Retry-After": "2"}``)
- ``garbage``  answer ``status`` (default 200) with a non-JSON body (an HTML proxy error page)
- ``hang``     never answer (until ``delay`` seconds, default 1 h, or the client gives up)

Kinds that are only stored, for the WebSocket and webhook code of the simulated caller/assistant:

- ``drop_ws``  ``faults.ws_drop_after(path)`` → close the socket after ``frames`` frames
- ``webhook``  ``faults.webhook_sender(target)`` gives a ``before_send(message) -> [messages]`` hook
               that delays (``delay``), duplicates (``action: "duplicate"``), drops or reorders
               (holds one message back until the next) the outgoing webhooks whose target URL path
               matches ``path`` and, if given, whose message type (``match_type``) matches.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.routing import BaseRoute
    from starlette.types import ASGIApp, Receive, Scope, Send

HTTP_KINDS = ("latency", "status", "garbage", "hang")
KINDS = HTTP_KINDS + ("drop_ws", "webhook")
WEBHOOK_ACTIONS = ("delay", "duplicate", "drop", "reorder")
CONTROL_PATH = "/_sim/faults"
BeforeSend = Callable[[Any], Awaitable[list[Any]]]   # a webhook hook: message -> the deliveries to make
GARBAGE = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"


@dataclass
class FaultRule:
    kind: str
    path: str = "*"
    method: str = "*"
    count: int | None = None          # fire at most this many times, then expire
    probability: float = 1.0
    delay: float = 0.0                # latency / hang / webhook delay, seconds
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    frames: int = 0                   # drop_ws: frames before the drop
    action: str = "delay"             # webhook: delay | duplicate | drop | reorder
    match_type: str | None = None     # webhook: only messages of this type (Vapi "type" / Twilio CallStatus)
    id: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if self.kind == "webhook" and self.action not in WEBHOOK_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(WEBHOOK_ACTIONS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        self.method = self.method.upper()

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and fnmatch.fnmatchcase(path, self.path)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["remaining"] = None if self.count is None else self.count - self.fired
        return data


class Faults:
    """Thread-safe rule registry: the app's event loop reads it, tests and the control API write it."""

    def __init__(self, seed: int = 0):
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._random = random.Random(seed)

    def add(self, kind: str, path: str = "*", **options: Any) -> FaultRule:
        rule = FaultRule(kind=kind, path=path, **options)
        with self._lock:
            rule.id = next(self._ids)
            self._rules.append(rule)
        return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> int:
        with self._lock:
            count, self._rules = len(self._rules), []
            return count

    def list(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def take(self, method: str, path: str, kinds: tuple[str, ...] = HTTP_KINDS,
             accept: Callable[[FaultRule], bool] | None = None) -> FaultRule | None:
        """The first live rule of ``kinds`` matching this request; counts it as fired."""
        with self._lock:
            for rule in self._rules:
                if rule.kind not in kinds or not rule.matches(method, path):
                    continue
                if accept is not None and not accept(rule):
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                rule.fired += 1
                if rule.count is not None and rule.fired >= rule.count:
                    self._rules.remove(rule)   # expired: later requests pass untouched
                return rule
        return None

    def ws_drop_after(self, path: str) -> int | None:
        """For a WebSocket server or client: drop the socket at ``path`` after this many frames."""
        rule = self.take("WS", path, ("drop_ws",))
        return None if rule is None else rule.frames

    def webhook_sender(self, target_path: str | Callable[[], str]) -> BeforeSend:
        """A ``before_send`` hook for one webhook sender (one call): returns the deliveries to make.

        ``target_path`` is the path of the URL the webhooks go to (or a function giving it). The hook
        keeps the message held back by a ``reorder`` rule and releases it after the next one.
        """
        held: list[Any] = []

        async def before_send(message: Any) -> list[Any]:
            path = target_path() if callable(target_path) else target_path
            kind = _message_type(message)
            rule = self.take("POST", path, ("webhook",),
                             accept=lambda r: r.match_type in (None, kind))
            if rule is None:
                out = [message, *held]
                held.clear()
                return out
            if rule.delay:
                await asyncio.sleep(rule.delay)
            if rule.action == "drop":
                return []
            if rule.action == "reorder":
                held.append(message)
                return []
            out = [message, message] if rule.action == "duplicate" else [message]
            out.extend(held)
            held.clear()
            return out

        return before_send


def _message_type(message: Any) -> str | None:
    if isinstance(message, dict):
        nested = message.get("message")
        inner = nested if isinstance(nested, dict) else message
        return inner.get("type") or inner.get("CallStatus")
    return None


ErrorBody = Callable[[int], Any]


class FaultMiddleware:
    """Pure ASGI middleware: applies HTTP fault rules before the app sees the request."""

    def __init__(self, app: ASGIApp, faults: Faults, error_body: ErrorBody | None = None,
                 latency: Callable[[str, str], float] | None = None):
        self.app, self.faults = app, faults
        self.error_body = error_body or (lambda status: {"status": status, "message": "simulated fault"})
        # the service's own latency (sim/latency.py) before a fault's answer, as for any answer; the
        # rule itself is taken on arrival, so it applies to what arrives while it is set
        self.latency = latency or (lambda method, path: 0.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim/"):
            await self.app(scope, receive, send)
            return
        rule = self.faults.take(scope["method"], scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
        elif rule.kind == "latency":
            await asyncio.sleep(rule.delay)
            await self.app(scope, receive, send)
        elif rule.kind == "hang":
            await _hang(receive, rule.delay or 3600.0)
        else:
            await asyncio.sleep(self.latency(scope["method"], scope["path"]))
            await self._respond(rule, send)

    async def _respond(self, rule: FaultRule, send: Send) -> None:
        if rule.kind == "garbage":
            status = rule.status or 200
            body = (rule.body if isinstance(rule.body, str) else GARBAGE).encode()
            content_type = b"text/html"
        else:
            status = rule.status or 500
            payload = self.error_body(status) if rule.body is None else rule.body
            body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            content_type = b"text/plain" if isinstance(payload, str) else b"application/json"
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in rule.headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _hang(receive: Receive, seconds: float) -> None:
    """Answer nothing: wait until the client disconnects or ``seconds`` pass."""
    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
    try:
        await asyncio.wait_for(until_disconnect(), seconds)
    except TimeoutError:
        pass


def control_routes(faults: Faults) -> list[BaseRoute]:
    """The ``/_sim/faults`` control API (no auth: the simulators listen on loopback only)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse([rule.to_json() for rule in faults.list()])

    async def add(request: Request) -> JSONResponse:
        try:
            spec = await request.json()
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            spec.pop("id", None)
            spec.pop("fired", None)
            rule = faults.add(**spec)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(rule.to_json(), status_code=201)

    async def clear(request: Request) -> JSONResponse:
        return JSONResponse({"cleared": faults.clear()})

    async def remove(request: Request) -> JSONResponse:
        removed = faults.remove(request.path_params["rule_id"])
        return JSONResponse({"removed": removed}, status_code=200 if removed else 404)

    return [Route(CONTROL_PATH, listing, methods=["GET"]), Route(CONTROL_PATH, add, methods=["POST"]),
            Route(CONTROL_PATH, clear, methods=["DELETE"]),
            Route(CONTROL_PATH + "/{rule_id:int}", remove, methods=["DELETE"])]
