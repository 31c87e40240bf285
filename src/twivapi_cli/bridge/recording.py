"""`twivapi fixtures record`: capture the webhooks arriving at the bridge as replayable fixtures.

An ASGI middleware in front of the bridge: for every Twilio or Vapi webhook it writes a step into
``<out>/<CallSid>.json`` (one fixture per call) with the time since the call's first request and
the status the bridge answered. Nothing secret is kept: signatures and auth headers are dropped
(replay signs again), secret-looking fields in bodies are removed, and the CallSid and account SID
become ``{{call_sid}}`` / ``{{account_sid}}``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..fixtures import TWILIO_WEBHOOKS
from .vapi_hooks import call_ids

SECRET_FIELD = re.compile(r"token|secret|signature|password|api_?key|authorization", re.I)
ROUTES = {path: kind for kind, path in TWILIO_WEBHOOKS.items()}


def scrub(value: Any, call_sid: str | None, account_sid: str | None) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v, call_sid, account_sid) for k, v in value.items() if not SECRET_FIELD.search(k)}
    if isinstance(value, list):
        return [scrub(v, call_sid, account_sid) for v in value]
    if isinstance(value, str):
        if call_sid:
            value = value.replace(call_sid, "{{call_sid}}")
        if account_sid:
            value = value.replace(account_sid, "{{account_sid}}")
    return value


class RecordWebhooks:
    def __init__(self, app: ASGIApp, out: Path):
        self.app, self.out = app, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.first_seen: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or (path not in ROUTES and path != "/vapi/webhook"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def tee() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, tee, watch)
        try:
            self.record(path, b"".join(chunks), status[0] if status else None)
        except (ValueError, UnicodeDecodeError, OSError):
            pass   # recording must never break the bridge; malformed input is not worth a fixture

    def record(self, path: str, body: bytes, status: int | None) -> None:
        if path == "/vapi/webhook":
            message = json.loads(body).get("message") or {}
            call_sid, _ = call_ids(message)   # call.transport.callSid, phoneCallProviderId, our metadata
            if not call_sid:
                return
            message = {k: v for k, v in message.items() if k not in ("phoneNumber", "assistant", "customer")}
            step = {"vapi": scrub(message, call_sid, None)}
        else:
            params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            call_sid = params.get("CallSid")
            if not call_sid:
                return
            account = params.get("AccountSid")
            step = {"twilio": ROUTES[path], "params": scrub(params, call_sid, account)}
        now = time.monotonic()
        first = self.first_seen.setdefault(call_sid, now)
        step["at_ms"] = round((now - first) * 1000)
        if status is not None:
            step["expect"] = {"status": status}
        self._append(call_sid, step)

    def _append(self, call_sid: str, step: dict) -> None:
        path = self.out / f"{call_sid}.json"
        fixture: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
            "name": f"recorded-{call_sid[-8:]}", "description": "recorded by twivapi fixtures record", "steps": []}
        fixture["steps"].append(step)
        path.write_text(json.dumps(fixture, indent=2) + "\n")
