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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from .. import net, signing, twilio_media
from .vapi_assistant import Script, SimulatedAssistant

if TYPE_CHECKING:
    from .faults import Faults
    from .state import SimState

log = logging.getLogger("twivapi.sim")

FindCall = Callable[[str], "tuple[dict, dict | None] | None"]   # call id -> (call record, assistant)


class ServerPoster:
    """Posts server messages for one call; records what was sent and answered."""

    def __init__(self, url: str | None, secret: str | None, *, auth: str = "secret",
                 http: httpx.AsyncClient | None = None, timeout: float = 20.0,
                 before_send: Callable[[dict[str, Any]], Awaitable[list[Any]]] | None = None):
        self.url, self.secret, self.auth = url, secret, auth
        self.http = http or net.async_client(timeout=timeout)
        self.owns_http = http is None
        self.before_send = before_send   # fault injection: may delay, duplicate or drop (returns a list)
        self.sent: list[dict[str, Any]] = []
        self.replies: list[tuple[str, int, Any]] = []
        self._lock = asyncio.Lock()      # Vapi delivers one call's messages in order

    async def __call__(self, message: dict[str, Any]) -> Any:
        url = self.url
        if not url:
            return None
        deliveries = [message]
        if self.before_send is not None:
            deliveries = await self.before_send(message) or []
        reply = None
        for delivery in deliveries:
            reply = await self._send(url, delivery)
        return reply

    async def _send(self, url: str, message: dict[str, Any]) -> Any:
        body = json.dumps({"message": message}).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers.update(signing.sign_vapi(self.secret, body, self.auth))
        async with self._lock:
            self.sent.append(message)
            try:
                # the same body again: the receiver deduplicates it (Vapi's backoffPlan retries likewise)
                response = await net.post_idempotent(self.http, url, content=body, headers=headers)
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


def transport_routes(find_call: FindCall,
                     make_poster: Callable[[dict[str, Any], dict[str, Any] | None], ServerPoster | None],
                     on_assistant: Callable[[str, SimulatedAssistant], None] | None = None,
                     drop_after: Callable[[str], int | None] = lambda path: None) -> list[BaseRoute]:
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
        simulated = SimulatedAssistant(call, poster, Script.from_assistant(assistant),
                                       drop_after_frames=drop_after(websocket.url.path))
        if on_assistant:
            on_assistant(call_id, simulated)
        try:
            await simulated.run(websocket)
        finally:
            if poster is not None:
                await poster.aclose()

    return [WebSocketRoute("/call/{call_id}/transport", transport)]


class TwilioStreamAdapter:
    """Lets the assistant serve a Twilio Media Streams socket (bypass and imported-number calls,
    where Twilio streams to Vapi directly): Twilio's JSON frames in, binary-frame semantics out."""

    def __init__(self, websocket: WebSocket):
        self.ws = websocket
        self.stream_sid: str | None = None

    async def accept(self) -> None:
        await self.ws.accept()

    async def receive(self) -> MutableMapping[str, Any]:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect" or message.get("text") is None:
                return {"type": "websocket.disconnect"} if message["type"] == "websocket.disconnect" else message
            try:
                event = twilio_media.parse(message["text"], max_payload=None)
            except twilio_media.BadMessage:
                continue
            if isinstance(event, twilio_media.Start):
                self.stream_sid = event.stream_sid
            elif isinstance(event, twilio_media.Media):
                return {"type": "websocket.receive", "bytes": event.payload}
            elif isinstance(event, twilio_media.Stop):
                return {"type": "websocket.disconnect"}

    async def send_bytes(self, frame: bytes) -> None:
        await self.ws.send_text(twilio_media.media_frame(self.stream_sid, frame))

    async def send_text(self, text: str) -> None:
        """Control messages have no place on Twilio's socket; barge-in becomes a ``clear``."""
        try:
            kind = json.loads(text).get("type")
        except ValueError:
            return
        if kind == "user-interrupted" and self.stream_sid:
            await self.ws.send_text(twilio_media.serialize(twilio_media.Clear(self.stream_sid)))

    async def close(self, code: int = 1000) -> None:
        await self.ws.close(code=code)


def assistant_routes(state: SimState, faults: Faults | None = None) -> list[BaseRoute]:
    """The simulated assistant's routes for the Vapi simulator sharing ``state``: the
    ``vapi.websocket`` transport and Twilio's direct stream, both posting server messages to the
    call's server URL with the org's webhook secret (through ``faults``' webhook rules)."""

    def make_poster(call: dict[str, Any], assistant: dict[str, Any] | None) -> ServerPoster | None:
        record = state.vapi.calls.get(call["id"])
        url = record.server_url if record else None
        if not url:
            return None
        hook = faults.webhook_sender(urlsplit(url).path) if faults is not None else None
        return ServerPoster(url, state.vapi.webhook_secret, before_send=hook)

    def watch_control(call_id: str, simulated: SimulatedAssistant) -> None:
        state.vapi.drivers[call_id] = simulated
        record = state.vapi.calls.get(call_id)
        if record is not None:
            loop = asyncio.get_running_loop()
            record.on_control(lambda message: message.get("type") == "end-call" and loop.create_task(
                simulated.hang_up("manually-canceled")))

    drop_after = faults.ws_drop_after if faults is not None else (lambda path: None)
    routes = transport_routes(state.vapi.find_call, make_poster, watch_control, drop_after)

    async def twilio_stream(websocket: WebSocket) -> None:
        found = state.vapi.find_call(websocket.path_params["call_id"])
        if found is None:
            await websocket.close(code=4404)
            return
        call, assistant = found
        call.setdefault("transport", {})["audioFormat"] = {"format": "mulaw", "container": "raw",
                                                           "sampleRate": 8000}
        poster = make_poster(call, assistant)
        simulated = SimulatedAssistant(call, poster, Script.from_assistant(assistant))
        state.vapi.drivers[call["id"]] = simulated
        try:
            await simulated.run(TwilioStreamAdapter(websocket))
        finally:
            if poster is not None:
                await poster.aclose()

    return routes + [WebSocketRoute("/call/{call_id}/twilio-stream", twilio_stream)]
