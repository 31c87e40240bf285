"""Vapi server-URL messages: authenticate, acknowledge at once, process in order per call.

Messages that need an answer (assistant-request, tool-calls, and the other request types) are
answered inline, well inside Vapi's deadlines: by ``_answer`` (the built-in answers), or with
``--forward-to`` by the user's app, ``_answer`` being its fallback (``forward.py``). Everything else
is acknowledged with ``{}`` and queued on the call's FIFO (and, with ``--forward-to``, on the
app's); a message for a call whose session does not exist yet is parked until it does (the seed's
race), within bounds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import signing
from ..config import Settings, revealed
from ..models import EventType, Session, SignalKind, Trigger
from ..store import Store
from .call_control import CallControl, transfer_destination
from .calls import Calls
from .deps import Deps, deps
from .events import Recorder
from .forward import vapi_signer
from .http import HttpError, parse_json_object, public_url_for, read_body
from .signals import Signals

log = logging.getLogger("twivapi.bridge")
DUPLICATE_TTL = 3600.0   # seconds a delivered message is remembered (Vapi's retries come within seconds)

# Every ServerMessage type in the spec (reference/vapi.md §2.2) plus enum-only names.
KNOWN_TYPES = frozenset({
    "assistant-request", "tool-calls", "function-call", "transfer-destination-request",
    "handoff-destination-request", "knowledge-base-request", "voice-request", "call.endpointing.request",
    "campaign.predial", "status-update", "speech-update", "transcript", "transcript[transcriptType=\"final\"]",
    "conversation-update", "model-output", "user-interrupted", "hang", "end-of-call-report", "transfer-update",
    "phone-call-control", "language-change-detected", "language-changed", "voice-input",
    "assistant.speechStarted", "assistant.started", "chat.created", "chat.deleted", "session.created",
    "session.updated", "session.deleted", "call.deleted", "call.delete.failed", "call.artifact.upload",
})

# The types Vapi waits for an answer to (a ServerMessageResponse* schema): answered inline.
REQUEST_TYPES = frozenset({
    "assistant-request", "tool-calls", "function-call", "transfer-destination-request", "handoff-destination-request",
    "knowledge-base-request", "call.endpointing.request", "campaign.predial",
})


def parse_message(body: bytes) -> dict:
    data = parse_json_object(body, not_object=("invalid_envelope", 'expected {"message": {"type": ...}}'))
    message = data.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise HttpError(400, "invalid_envelope", 'expected {"message": {"type": ...}}')
    # a type not in KNOWN_TYPES is no error: Vapi adds types over time (webhook() answers it {})
    if message.get("call") is not None and not isinstance(message["call"], dict):
        raise HttpError(400, "invalid_field", "message.call must be an object")
    return message


@functools.lru_cache(maxsize=16)
def hmac_plan(settings: Settings) -> signing.HmacPlan:
    """The HMAC credential Vapi signs with (``HMACAuthenticationPlan``), from the VAPI_HMAC_* settings."""
    return signing.HmacPlan(
        algorithm=settings.vapi_hmac_algorithm, signature_header=settings.vapi_hmac_signature_header,
        timestamp_header=settings.vapi_hmac_timestamp_header, signature_prefix=settings.vapi_hmac_signature_prefix or "",
        include_timestamp=settings.vapi_hmac_include_timestamp, payload_format=settings.vapi_hmac_payload_format or "",
        message_id_header=settings.vapi_hmac_message_id_header or "", signature_encoding=settings.vapi_hmac_encoding,
        secret_is_base64=settings.vapi_hmac_secret_is_base64)


def call_ids(message: dict) -> tuple[str | None, str | None]:
    """(Twilio CallSid, Vapi call id). The CallSid is, first, ``call.transport.callSid`` (a
    ``TwilioTransport``: where Vapi puts it now), then the deprecated ``call.phoneCallProviderId``,
    then the metadata we set in assistantOverrides on POST /call (WebSocket-transport calls have
    neither). Only non-empty strings count."""
    call = _object(message.get("call"))
    transport = _object(call.get("transport"))
    overrides = _object(call.get("assistantOverrides"))
    metadata = _object(overrides.get("metadata")) or _object(call.get("metadata"))
    candidates = (transport.get("callSid") if transport.get("provider") == "twilio" else None,
                  call.get("phoneCallProviderId"), metadata.get("twilioCallSid"))
    call_sid = next((c for c in candidates if isinstance(c, str) and c), None)
    vapi_id = call.get("id")
    return (call_sid, str(vapi_id) if vapi_id else None)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _summary(message: dict) -> dict[str, Any]:
    keys = ("status", "role", "turn", "transcriptType", "endedReason", "turnId")
    return {k: message[k] for k in keys if k in message and isinstance(message[k], (str, int, float))}


async def webhook(request: Request) -> Response:
    received = time.time()
    app = deps(request)
    body = await read_body(request)
    settings = app.settings
    plan = hmac_plan(settings)
    url = public_url_for(settings, request.url) if "{url}" in plan.format else ""   # what Vapi signed, if asked
    ok, how = signing.verify_vapi(revealed(settings.vapi_webhook_secret), request.headers, body, plan=plan, url=url)
    if not ok:
        log.warning("403 /vapi/webhook: %s", how)
        raise HttpError(403, "bad_signature", "Vapi webhook credential is missing or invalid")
    message = parse_message(body)
    kind = message["type"]
    call_sid, vapi_id = call_ids(message)
    forward = functools.partial(vapi_signer, settings, how, request.headers, body)   # made only when forwarding
    if kind not in KNOWN_TYPES:
        response = await _unknown_type(app, kind, call_sid, vapi_id, received)
        if app.forwarder.vapi_url:   # new to us, maybe not to the app
            app.forwarder.inform_vapi(kind, body, forward(), call_sid, call_sid or vapi_id or "")
        return response
    first: bool | None = None   # first delivery of this body? asked once, when it matters
    if _is_barge_in(message, app.settings.barge_in):   # urgent: stale audio must stop now, not after the queue
        first = await _first_delivery(app.store, body)
        if first:
            await _interrupt_now(app, message, call_sid, vapi_id, received)
    event = await app.recorder.record(EventType.vapi_message(kind), call_sid, received_at=received, vapi_call_id=vapi_id,
                                      **_summary(message))
    builtin = functools.partial(_answer, app, kind, message)
    if kind in REQUEST_TYPES and app.forwarder.vapi_url:
        reply = await app.forwarder.answer(kind, body, forward(), call_sid, builtin)
    else:
        reply = await builtin()
    if reply is None:
        reply = {}
        if first is None:
            first = await _first_delivery(app.store, body)
        if first:
            await _dispatch(app, message, call_sid, vapi_id, event)
            if app.forwarder.vapi_url:   # after the bridge's own processing is queued; never holds the ack
                app.forwarder.inform_vapi(kind, body, forward(), call_sid, call_sid or vapi_id or "")
        else:
            session = await _session_for(app.store, message)
            await app.recorder.record(EventType.VAPI_DUPLICATE, session.call_sid if session else call_sid, type=kind,
                                      of=event.seq)
            await app.recorder.mark_processed(event.seq)
    await app.recorder.mark(event, acked=True)
    return JSONResponse(reply)


_unknown_logged: set[str] = set()   # the unknown types this process has logged (once each)
UNKNOWN_LOGGED_MAX = 256             # past this many distinct types, counted but no longer logged


async def _unknown_type(app: Deps, kind: str, call_sid: str | None, vapi_id: str | None,
                        received: float) -> Response:
    """A message type this bridge does not know (Vapi adds types over time): 200 ``{}``, never a 400,
    which Vapi would log as an error and retry. Counted (``vapi.unknown_type``), recorded, and
    logged once per type per process."""
    app.recorder.count("vapi.unknown_type")
    if kind not in _unknown_logged and len(_unknown_logged) < UNKNOWN_LOGGED_MAX:
        _unknown_logged.add(kind)
        log.info("/vapi/webhook: message type %r is new to this bridge: answered {} and not applied "
                 "(logged once per type)", kind[:60])
    event = await app.recorder.record(EventType.VAPI_UNKNOWN_TYPE, call_sid, received_at=received,
                                      vapi_call_id=vapi_id, type=kind[:60])
    await app.recorder.mark(event, acked=True, processed=True)
    return JSONResponse({})


def _is_barge_in(message: dict, barge_in: str = "interrupted") -> bool:
    """``user-interrupted``: Vapi decided the caller interrupts the assistant. The caller's
    ``speech-update`` ``started`` only with ``TWIVAPI_BARGE_IN=speech``: Vapi reports speech it does
    not treat as an interruption too (``stopSpeakingPlan.numWords``, "okay", "uh-huh"), and the
    assistant keeps talking through it."""
    if message["type"] == "user-interrupted":
        return True
    return (barge_in == "speech" and message["type"] == "speech-update" and message.get("role") == "user"
            and message.get("status") == "started")


async def _interrupt_now(app: Deps, message: dict, call_sid: str | None, vapi_id: str | None,
                         received: float) -> None:
    """Barge-in skips the call's queue: the media socket (here or on another instance) clears at
    once. Safe out of order: an interruption only drops what is queued to play."""
    if call_sid is None and vapi_id:
        session = await app.store.find_session(vapi_call_id=vapi_id)
        call_sid = session.call_sid if session else None
    if call_sid:
        await app.signals.send(call_sid, SignalKind.INTERRUPT, {"source": "webhook", "type": message["type"],
                                                                "turn": message.get("turn"), "at": received})


async def _first_delivery(store: Store, body: bytes) -> bool:
    """Vapi retries a message (``server.backoffPlan``) with the same body: its digest is the
    message's idempotency key. Requests (tool calls...) are answered again rather than remembered."""
    return await store.claim("vapi:" + hashlib.sha256(body).hexdigest()[:32], DUPLICATE_TTL)


async def _answer(app: Deps, kind: str, message: dict) -> dict | None:
    """Replies for the request-type messages; None for informational ones."""
    if kind == "assistant-request":
        if app.settings.vapi_assistant_id:
            return {"assistantId": app.settings.vapi_assistant_id}
        return {"error": "No assistant is configured on this bridge (set VAPI_ASSISTANT_ID)."}
    if kind in ("tool-calls", "function-call"):
        if kind == "function-call":
            call = _object(message.get("functionCall"))
            result = await app.tools.run_one({"id": "", "function": {
                "name": call.get("name", ""), "arguments": call.get("parameters", {})}})
            return {"result": result.get("result", result.get("error"))}
        return await app.tools.run(message)
    # the other request types, each answered as its ServerMessageResponse* schema asks
    if kind == "transfer-destination-request":   # TWIVAPI_TRANSFER_DESTINATIONS (bridge/call_control.py)
        return transfer_destination(app.settings)
    if kind == "handoff-destination-request":   # `destination` is required; with `error` no handoff is made
        return {"destination": {}, "error": "No handoff destination is configured on this bridge."}
    if kind == "knowledge-base-request":         # no documents: the model answers on its own
        return {"documents": []}
    if kind == "call.endpointing.request":       # `timeoutSeconds` (0-15) is required
        return {"timeoutSeconds": _endpointing_timeout(message)}
    if kind == "campaign.predial":
        return {"eligible": True}
    return None


DEFAULT_ENDPOINTING_S = 0.4   # startSpeakingPlan.waitSeconds' default


def _endpointing_timeout(message: dict) -> float:
    """The assistant's own ``startSpeakingPlan.waitSeconds`` when the message carries it, else
    Vapi's default; within the schema's 0-15 s."""
    plan = _object(_object(message.get("assistant")).get("startSpeakingPlan"))
    wait = plan.get("waitSeconds")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait == wait:
        return float(min(15.0, max(0.0, wait)))
    return DEFAULT_ENDPOINTING_S


async def _dispatch(app: Deps, message: dict, call_sid: str | None, vapi_id: str | None, event: Any) -> None:
    session = await _session_for(app.store, message)
    key = session.call_sid if session else (call_sid or vapi_id)
    if key is None:
        await app.recorder.mark(event, processed=True)  # not about a call: nothing to apply
        return
    item = {"message": message, "seq": event.seq}
    if await app.drainer.submit(key, item, parked=session is None) and session is None:
        await app.recorder.record(EventType.VAPI_PARKED, call_sid, key=key, type=message["type"])


async def _session_for(store: Store, message: dict) -> Session | None:
    call_sid, vapi_id = call_ids(message)
    session = (await store.get_session(call_sid)) if call_sid else None
    if session is None and vapi_id:
        session = await store.find_session(vapi_call_id=vapi_id)
    return session


class MessageProcessor:
    """Applies queued messages for the drainer: one at a time per call, in order."""

    def __init__(self, store: Store, calls: Calls, signals: Signals, recorder: Recorder,
                 control: CallControl | None = None):
        self.store, self.calls, self.signals, self.recorder = store, calls, signals, recorder
        self.control = control

    async def known(self, item: dict) -> bool:
        return await _session_for(self.store, item["message"]) is not None

    async def apply(self, item: dict) -> bool:
        session = await _session_for(self.store, item["message"])
        if session is None:
            return False
        await self.process(item["message"], session)
        await self.recorder.mark_processed(item["seq"])
        return True

    async def process(self, message: dict, session: Session) -> None:
        """Apply one message to its call's session (on the call's queue, one at a time)."""
        kind = message["type"]
        sid = session.call_sid
        if session.state.terminal and await self._end_late_vapi_call(message, session):
            return
        if kind == "status-update":
            status = message.get("status")
            if status == "in-progress":
                await self.calls.move(sid, Trigger.VAPI_IN_PROGRESS)
            elif status == "ended":
                await self.calls.end(sid, str(message.get("endedReason") or "vapi-ended"))
        elif kind == "end-of-call-report":
            metrics = _dict((_dict(message.get("artifact"))).get("performanceMetrics"))
            await self.recorder.record(EventType.VAPI_REPORT, sid, ended_reason=message.get("endedReason"),
                                       turn_latency_avg=metrics.get("turnLatencyAverage"),
                                       turn_latencies=turn_latencies(metrics))
            await self.calls.end(sid, str(message.get("endedReason") or "end-of-call-report"))
        elif kind == "user-interrupted":
            pass   # signalled on arrival (_interrupt_now)
        elif kind == "phone-call-control" and self.control is not None:
            await self.control.apply(message, session)   # forward / hang-up on the Twilio call
        elif kind == "speech-update":
            await self.signals.send(sid, SignalKind.SPEECH, {
                "role": message.get("role"), "status": message.get("status"), "turn": message.get("turn"),
                "source": "webhook", "at": time.time()})

    async def _end_late_vapi_call(self, message: dict, session: Session) -> bool:
        """A Vapi call going live for a call that is already over (say its POST /call answered after
        our deadline, so we never learnt its id): end it rather than leave it running. True if so."""
        call = message.get("call") or {}
        if message["type"] != "status-update" or message.get("status") not in ("queued", "ringing", "in-progress"):
            return False
        if not isinstance(call.get("monitor"), dict) or not call["monitor"].get("controlUrl"):
            return False
        await self.recorder.record(EventType.RACE_VAPI_CALL_AFTER_END, session.call_sid, vapi_call_id=call.get("id"),
                                   state=session.state.value)
        await self.calls.end_vapi_call(session.call_sid, call)
        return True


TURN_PARTS = ("transcriber", "endpointing", "model", "voice", "turn")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def turn_latencies(metrics: dict[str, Any]) -> list[dict[str, float | None]]:
    """``PerformanceMetrics.turnLatencies`` as ``{transcriber, endpointing, model, voice, turn}`` ms per
    turn (a field that is missing or not a number: None); anything else in the list is skipped."""
    turns = metrics.get("turnLatencies")
    if not isinstance(turns, list):
        return []
    out = []
    for turn in turns[:500]:
        if isinstance(turn, dict):
            out.append({part: _number(turn.get(f"{part}Latency")) for part in TURN_PARTS})
    return out


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None
