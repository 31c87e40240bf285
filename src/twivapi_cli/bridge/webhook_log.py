"""The webhooks the bridge received lately, as they came (path, raw body, status, time): what the
inspector copies as a fixture (as ``fixtures record`` would write it) and re-sends.

An ASGI middleware keeps the last ``KEPT`` webhooks in memory, raw: keeping one costs an append
(no parsing on the hot path); they are parsed only when the inspector asks for a call's. Nothing
leaves the process but through the admin app (loopback, token), and a fixture is scrubbed
(``recording.scrub``) before it is handed out.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..fixtures import TWILIO_WEBHOOKS

KEPT = 5000
ROUTES = frozenset(TWILIO_WEBHOOKS.values())
VAPI_PATH = "/vapi/webhook"


@dataclass(frozen=True)
class Webhook:
    path: str
    body: bytes
    status: int | None
    at: float   # epoch seconds


class WebhookLog:
    def __init__(self, kept: int = KEPT) -> None:
        self.webhooks: collections.deque[Webhook] = collections.deque(maxlen=kept)

    def add(self, webhook: Webhook) -> None:
        self.webhooks.append(webhook)

    def of_call(self, call_sid: str) -> list[tuple[Webhook, dict[str, Any]]]:
        """This call's webhooks, oldest first, each with its fixture step (scrubbed, ``at_ms`` from
        the call's first webhook)."""
        from .recording import fixture_step  # (recording reads Vapi's ids through vapi_hooks, which needs deps)
        found: list[tuple[Webhook, dict[str, Any]]] = []
        for webhook in list(self.webhooks):
            try:
                parsed = fixture_step(webhook.path, webhook.body, webhook.status)
            except (ValueError, UnicodeDecodeError, AttributeError):
                continue
            if parsed is not None and parsed[0] == call_sid:
                found.append((webhook, parsed[1]))
        for webhook, step in found:
            step["at_ms"] = round((webhook.at - found[0][0].at) * 1000)
        return found

    def fixture(self, call_sid: str) -> dict[str, Any]:
        """What ``fixtures record`` would have written for the call (webhooks only)."""
        return {"name": f"recorded-{call_sid[-8:]}", "description": "copied from twivapi inspect",
                "steps": [step for _, step in self.of_call(call_sid)]}


class CaptureWebhooks:
    """ASGI middleware in front of the bridge: every Twilio and Vapi webhook into a ``WebhookLog``."""

    def __init__(self, app: ASGIApp, log: WebhookLog):
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (path not in ROUTES and path != VAPI_PATH) or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        status: list[int] = []
        at = time.time()

        async def tee() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, tee, watch)
        finally:
            self.log.add(Webhook(path, b"".join(chunks), status[0] if status else None, at))


def summary(webhook: Webhook, step: dict[str, Any]) -> dict[str, Any]:
    """One webhook for the inspector's list: its route, status, time and what it said."""
    kind = step.get("twilio") or (step.get("vapi") or {}).get("type")
    return {"path": webhook.path, "status": webhook.status, "at": webhook.at, "kind": kind,
            "step": json.loads(json.dumps(step, default=str))}
