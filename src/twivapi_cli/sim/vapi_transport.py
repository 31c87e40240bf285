"""Vapi's side of a simulated call: the ``vapi.websocket`` transport socket and the server-URL poster.

``transport_routes(find_call, make_poster)`` gives the WebSocket route ``/call/{call_id}/transport``
to mount on the Vapi simulator: it finds the call record, builds a ``SimulatedAssistant`` from the
call's assistant and runs it. ``ServerPoster`` posts server messages to the call's server URL the
way Vapi does: ``{"message": ...}`` JSON, only the types the assistant's ``serverMessages`` lists
(Vapi's default list when it has none), authenticated only as that ``server`` says (its ``headers``,
its ``credentialId``'s bearer or HMAC plan; nothing else: a server without either gets unsigned
messages, as from Vapi), and returns the reply for the messages that expect one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from .. import net, signing, twilio_media
from .state import twilio_transport
from .vapi_assistant import MANUALLY_CANCELED, Script, SimulatedAssistant

if TYPE_CHECKING:
    from .faults import Faults
    from .state import SimState

log = logging.getLogger("twivapi.sim")

FindCall = Callable[[str], "tuple[dict, dict | None] | None"]   # call id -> (call record, assistant)


# CreateAssistantDTO.serverMessages: the spec's default, when an assistant lists none
DEFAULT_SERVER_MESSAGES = ("conversation-update", "end-of-call-report", "function-call", "hang", "speech-update",
                           "status-update", "tool-calls", "transfer-destination-request",
                           "handoff-destination-request", "user-interrupted", "assistant.started")
# ... and every value it may list: a message type outside it (assistant-request) is always sent
SERVER_MESSAGE_ENUM = frozenset({
    "assistant.started", "assistant.speechStarted", "conversation-update", "end-of-call-report", "function-call",
    "hang", "language-changed", "language-change-detected", "model-output", "phone-call-control", "speech-update",
    "status-update", "transcript", 'transcript[transcriptType="final"]', "tool-calls", "transfer-destination-request",
    "handoff-destination-request", "transfer-update", "user-interrupted", "voice-input", "chat.created",
    "chat.deleted", "session.created", "session.updated", "session.deleted", "call.deleted", "call.delete.failed",
    "call.artifact.upload"})
FINAL_TRANSCRIPTS = 'transcript[transcriptType="final"]'


def server_messages(assistant: dict[str, Any] | None) -> frozenset[str]:
    """The message types an assistant's server gets: its ``serverMessages``, or the default list."""
    listed = (assistant or {}).get("serverMessages")
    return frozenset(listed if isinstance(listed, list) else DEFAULT_SERVER_MESSAGES)


def wanted(message: dict[str, Any], messages: frozenset[str] | None) -> bool:
    """Whether ``messages`` (a serverMessages list; None: everything) lets ``message`` through."""
    kind = message.get("type", "")
    if messages is None or kind not in SERVER_MESSAGE_ENUM or kind in messages:
        return True
    return kind == "transcript" and FINAL_TRANSCRIPTS in messages and message.get("transcriptType") == "final"


Signer = Callable[[bytes], dict[str, str]]   # a body -> the headers that authenticate it


def server_signer(server: dict[str, Any] | None, credentials: dict[str, dict[str, Any]]) -> Signer:
    """How Vapi authenticates a message to ``server``: its ``credentialId``'s plan (bearer: the
    token in ``headerName``, ``Bearer `` unless ``bearerPrefixEnabled`` is false; hmac: as
    ``HMACAuthenticationPlan`` says), then its ``headers`` as they are (an ``Authorization`` there
    overrides the credential's). Nothing at all without either."""
    server = server or {}
    headers = {str(k): str(v) for k, v in (server.get("headers") or {}).items()} \
        if isinstance(server.get("headers"), dict) else {}
    credential = credentials.get(server.get("credentialId") or "") if server.get("credentialId") else None
    plan = (credential or {}).get("authenticationPlan") or {}
    url = str(server.get("url") or "")

    def sign(body: bytes) -> dict[str, str]:
        signed: dict[str, str] = {}
        if plan.get("type") == "bearer":
            prefix = "Bearer " if plan.get("bearerPrefixEnabled", True) else ""
            signed[plan.get("headerName") or "Authorization"] = prefix + str(plan.get("token", ""))
        elif plan.get("type") == "hmac":
            signed.update(signing.sign_vapi(str(plan.get("secretKey", "")), body, "hmac", plan=hmac_plan(plan),
                                            url=url, message_id=f"msg_{uuid.uuid4().hex}"))
        lowered = {k.lower() for k in headers}
        return {**{k: v for k, v in signed.items() if k.lower() not in lowered}, **headers}
    return sign


def hmac_plan(plan: dict[str, Any]) -> signing.HmacPlan:
    """An ``HMACAuthenticationPlan`` (the spec's camelCase fields and defaults) as ``signing.HmacPlan``."""
    return signing.HmacPlan(
        algorithm=plan.get("algorithm", "sha256"), signature_header=plan.get("signatureHeader") or "x-signature",
        timestamp_header=plan.get("timestampHeader") or "x-timestamp", signature_prefix=plan.get("signaturePrefix", ""),
        include_timestamp=plan.get("includeTimestamp", True), payload_format=plan.get("payloadFormat", ""),
        message_id_header=plan.get("messageIdHeader", ""), signature_encoding=plan.get("signatureEncoding", "hex"),
        secret_is_base64=plan.get("secretIsBase64", False))


class ServerPoster:
    """Posts server messages for one call; records what was sent, answered and left out.

    ``sign`` authenticates each body (``server_signer``: as the call's ``server`` says); without it,
    ``secret`` signs as ``auth`` says (``signing.sign_vapi``), or nothing does. ``messages`` is the
    assistant's ``serverMessages`` (``server_messages``): other types are not sent (``skipped``)."""

    def __init__(self, url: str | None, secret: str | None = None, *, auth: str = "secret",
                 http: httpx.AsyncClient | None = None, timeout: float = 20.0,
                 before_send: Callable[[dict[str, Any]], Awaitable[list[Any]]] | None = None,
                 sign: Signer | None = None, messages: frozenset[str] | None = None):
        self.url, self.secret, self.auth = url, secret, auth
        self.sign, self.messages = sign, messages
        self.http = http or net.async_client(timeout=timeout)
        self.owns_http = http is None
        self.before_send = before_send   # fault injection: may delay, duplicate or drop (returns a list)
        self.sent: list[dict[str, Any]] = []
        self.skipped: list[str] = []     # types left out: not in the assistant's serverMessages
        self.replies: list[tuple[str, int, Any]] = []
        self._lock = asyncio.Lock()      # Vapi delivers one call's messages in order

    @classmethod
    def for_server(cls, server: dict[str, Any] | None, credentials: dict[str, dict[str, Any]], *,
                   messages: frozenset[str] | None = None, **options: Any) -> ServerPoster:
        """A poster for a ``Server`` (``url``, ``headers``, ``credentialId``, ``timeoutSeconds``)."""
        server = server or {}
        timeout = server.get("timeoutSeconds")
        if isinstance(timeout, (int, float)) and "timeout" not in options and "http" not in options:
            options["timeout"] = float(timeout)
        return cls(server.get("url"), sign=server_signer(server, credentials), messages=messages, **options)

    async def __call__(self, message: dict[str, Any]) -> Any:
        url = self.url
        if not url:
            return None
        if not wanted(message, self.messages):
            self.skipped.append(message.get("type", ""))
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
        if self.sign is not None:
            headers.update(self.sign(body))
        elif self.secret:
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

    def __init__(self, websocket: WebSocket, on_start: Callable[[twilio_media.Start], None] | None = None):
        self.ws = websocket
        self.stream_sid: str | None = None
        self.on_start = on_start   # Twilio's start message: the call's CallSid and account

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
                if self.on_start is not None:
                    self.on_start(event)
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
    call's server URL as its ``server`` says (``ServerPoster.for_server``: the assistant's
    ``serverMessages``, the server's headers or credential), through ``faults``' webhook rules."""

    def make_poster(call: dict[str, Any], assistant: dict[str, Any] | None) -> ServerPoster | None:
        record = state.vapi.calls.get(call["id"])
        url = record.server_url if record else None
        if not url or record is None:
            return None
        hook = faults.webhook_sender(urlsplit(url).path) if faults is not None else None
        return ServerPoster.for_server(record.server, state.vapi.credentials, messages=server_messages(assistant),
                                       before_send=hook)

    def watch_control(call_id: str, simulated: SimulatedAssistant) -> None:
        state.vapi.drivers[call_id] = simulated
        record = state.vapi.calls.get(call_id)
        if record is not None:
            loop = asyncio.get_running_loop()
            record.on_control(lambda message: message.get("type") == "end-call" and loop.create_task(
                simulated.hang_up(MANUALLY_CANCELED)))

    drop_after = faults.ws_drop_after if faults is not None else (lambda path: None)
    routes = transport_routes(state.vapi.find_call, make_poster, watch_control, drop_after)

    async def twilio_stream(websocket: WebSocket) -> None:
        found = state.vapi.find_call(websocket.path_params["call_id"])
        if found is None:
            await websocket.close(code=4404)
            return
        call, assistant = found
        poster = make_poster(call, assistant)
        simulated = SimulatedAssistant(call, poster, Script.from_assistant(assistant),
                                       audio_format={"format": "mulaw", "container": "raw", "sampleRate": 8000})
        state.vapi.drivers[call["id"]] = simulated

        def started(start: twilio_media.Start) -> None:
            """Twilio streams to Vapi (a bypass call learns its CallSid here): the call's
            TwilioTransport, and the deprecated provider id."""
            if (call.get("transport") or {}).get("provider") != "twilio":
                call["transport"] = twilio_transport(start.account_sid, start.call_sid)
            call.setdefault("phoneCallProviderId", start.call_sid)
        try:
            await simulated.run(TwilioStreamAdapter(websocket, on_start=started))
        finally:
            if poster is not None:
                await poster.aclose()

    return routes + [WebSocketRoute("/call/{call_id}/twilio-stream", twilio_stream)]
