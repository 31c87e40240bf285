"""Vapi's side of a simulated call: the ``vapi.websocket`` transport socket and the server-URL poster.

``transport_routes(find_call, make_poster)`` gives the WebSocket route ``/call/{call_id}/transport``
to mount on the Vapi simulator: it finds the call record, builds a ``SimulatedAssistant`` from the
call's assistant and runs it. ``ServerPoster`` posts server messages to the assistant's server URL
the way Vapi does: ``{"message": ...}`` JSON, with ``X-Vapi-Secret`` (or an HMAC credential), and
returns the reply for the messages that expect one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

import httpx
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from .. import signing
from .vapi_assistant import Script, SimulatedAssistant

log = logging.getLogger("twivapi.sim")

FindCall = Callable[[str], "tuple[dict, dict | None] | None"]   # call id -> (call record, assistant)


class ServerPoster:
    """Posts server messages for one call; records what was sent and answered."""

    def __init__(self, url: str | None, secret: str | None, *, auth: str = "secret",
                 http: httpx.AsyncClient | None = None, timeout: float = 20.0,
                 before_send: Callable[[dict], Any] | None = None):
        self.url, self.secret, self.auth = url, secret, auth
        self.http = http or httpx.AsyncClient(timeout=timeout)
        self.owns_http = http is None
        self.before_send = before_send   # fault injection: may delay, duplicate or drop (returns a list)
        self.sent: list[dict] = []
        self.replies: list[tuple[str, int, Any]] = []
        self._lock = asyncio.Lock()      # Vapi delivers one call's messages in order

    async def __call__(self, message: dict) -> Any:
        if not self.url:
            return None
        deliveries = [message]
        if self.before_send is not None:
            deliveries = await self.before_send(message) or []
        reply = None
        for delivery in deliveries:
            reply = await self._send(delivery)
        return reply

    async def _send(self, message: dict) -> Any:
        body = json.dumps({"message": message}).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers.update(signing.sign_vapi(self.secret, body, self.auth))
        async with self._lock:
            self.sent.append(message)
            try:
                response = await self.http.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                self.replies.append((message.get("type", ""), 0, str(exc)))
                return None
        try:
            data = response.json()
        except ValueError:
            data = None
        self.replies.append((message.get("type", ""), response.status_code, data))
        return data

    async def aclose(self) -> None:
        if self.owns_http:
            await self.http.aclose()


def transport_routes(find_call: FindCall, make_poster: Callable[[dict, dict | None], ServerPoster | None],
                     on_assistant: Callable[[str, SimulatedAssistant], None] | None = None) -> list:
    async def transport(websocket: WebSocket) -> None:
        call_id = websocket.path_params["call_id"]
        found = find_call(call_id)
        if found is None:
            await websocket.close(code=4404)
            return
        call, assistant = found
        if call.get("status") == "ended":
            await websocket.close(code=4410)
            return
        poster = make_poster(call, assistant)
        simulated = SimulatedAssistant(call, poster, Script.from_assistant(assistant))
        if on_assistant:
            on_assistant(call_id, simulated)
        try:
            await simulated.run(websocket)
        finally:
            if poster is not None:
                await poster.aclose()

    return [WebSocketRoute("/call/{call_id}/transport", transport)]
