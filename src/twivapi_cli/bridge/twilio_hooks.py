"""Twilio's webhooks: the voice webhook (answered at once with TwiML), status callbacks, and the
``<Connect action>`` request Twilio makes when our media stream ends."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from typing import Any
from xml.sax.saxutils import escape

from starlette.requests import Request
from starlette.responses import Response
from twilio.twiml.voice_response import VoiceResponse

from ..config import revealed
from ..errors import TwivapiError
from ..models import TERMINAL_TWILIO_STATUSES, CallState, EventType, Mode, Session, Trigger
from ..signing import STREAM_TOKEN_PARAM, Params, stream_token
from ..twilio_media import ws_url
from .deps import deps
from .http import HttpError, check_twilio_signature, parse_json_object, parse_twilio_form, read_body, twiml

CALL_SID = re.compile(r"CA[0-9a-zA-Z]{32}")
IDEMPOTENCY_TTL = 24 * 3600.0
DRAINED_PARAM = "drained"   # on a voice webhook redirected away from a draining instance: not again
FALLBACK_TEXT = "Sorry, our assistant is not available right now. Please call again later."
NATIVE_TEXT = "This number is answered by Vapi directly. Please point its voice URL at Vapi."


async def signed_params(request: Request) -> Params:
    """Read, bound, parse and authenticate a Twilio webhook; 4xx on anything wrong."""
    return (await signed_request(request))[0]


async def signed_request(request: Request) -> tuple[Params, bytes, bool]:
    """``signed_params``, with the raw body and whether it was a form (not JSON)."""
    body = await read_body(request)
    params = parse_twilio_form(body, request.headers.get("content-type", ""))
    check_twilio_signature(deps(request).settings, request, params, body)
    if params is None:  # JSON body, already authenticated through bodySHA256
        data = parse_json_object(body)
        return Params({k: [v if isinstance(v, str) else json.dumps(v)] for k, v in data.items()}), body, False
    return params, body, True


def require_call_sid(params: Params) -> str:
    call_sid = params.first("CallSid")
    if not call_sid:
        raise HttpError(400, "missing_field", "CallSid is required")
    if not CALL_SID.fullmatch(call_sid):
        raise HttpError(400, "invalid_field", "CallSid must be 'CA' followed by 32 letters or digits")
    return call_sid


def fallback_twiml() -> str:
    response = VoiceResponse()
    response.say(FALLBACK_TEXT)
    response.hangup()
    return str(response)


def stream_twiml(public_url: str, call_sid: str, auth_token: str) -> str:
    """<Connect><Stream> to our media route, with the call's ``<Parameter>`` elements: its CallSid and
    the per-call token (``signing.stream_token``) that authenticates the stream when Twilio hands
    it back in ``start.customParameters`` (an answer to a signed webhook: only Twilio has it).

    The document is the same for every call but for those two values, so it is built once per base
    URL (by the TwiML builder, with placeholders) and filled in per call: the builder took 70 us a
    webhook, the fill-in takes 1."""
    head, middle, tail = _stream_template(public_url.rstrip("/"))
    return head + escape(call_sid, _ATTR) + middle + escape(stream_token(auth_token, call_sid), _ATTR) + tail


_ATTR = {'"': "&quot;"}   # saxutils.escape does &, < and >; an attribute value needs its quote too
_SID_MARK, _TOKEN_MARK = "TWIVAPI-CALL-SID", "TWIVAPI-STREAM-TOKEN"


@functools.lru_cache(maxsize=8)
def _stream_template(base: str) -> tuple[str, str, str]:
    response = VoiceResponse()
    connect = response.connect(action=f"{base}/twilio/after-stream", method="POST")
    stream = connect.stream(url=f"{ws_url(base)}/twilio/media")
    stream.parameter(name="callSid", value=_SID_MARK)
    stream.parameter(name=STREAM_TOKEN_PARAM, value=_TOKEN_MARK)
    head, _, rest = str(response).partition(_SID_MARK)
    middle, _, tail = rest.partition(_TOKEN_MARK)
    return head, middle, tail


async def _claim_retry(request: Request, scope: str) -> bool:
    """True the first time this I-Twilio-Idempotency-Token is seen (no token: always True)."""
    token = request.headers.get("i-twilio-idempotency-token")
    if not token:
        return True
    return await deps(request).store.claim(f"twilio:{scope}:{token}", IDEMPOTENCY_TTL)


async def voice(request: Request) -> Response:
    received = time.time()
    bridge = deps(request)
    params = await signed_params(request)
    call_sid = require_call_sid(params)
    if bridge.lifecycle.draining and await bridge.store.get_session(call_sid) is None:
        redirect = await _elsewhere(request)
        if redirect is not None:
            return twiml(redirect)
    first_delivery = await _claim_retry(request, "voice")
    session = Session(call_sid=call_sid, mode=bridge.settings.mode, from_number=params.first("From"),
                      to_number=params.first("To"), instance=bridge.instance)
    created = await bridge.store.create_session(session)
    caller: dict[str, Any] = {"from": session.from_number}   # "from" is a keyword: passed as a dict
    event = await bridge.recorder.record(EventType.TWILIO_VOICE, call_sid, received_at=received, mode=session.mode,
                                         retry=not first_delivery, new=created, **caller)
    if created:
        await bridge.drainer.release(call_sid)
    if created and bridge.lifecycle.draining:   # stopping, and no other instance to take the call
        await bridge.calls.move(call_sid, Trigger.FAIL, reason="bridge-draining")
        xml = fallback_twiml()
    elif bridge.settings.mode == Mode.NATIVE:
        response = VoiceResponse()
        response.say(NATIVE_TEXT)
        xml = str(response)
    elif bridge.settings.mode == Mode.BYPASS:
        xml = await _bypass(request, call_sid, session, created)
    else:
        xml = await _stream(request, call_sid, created)
    await bridge.recorder.mark(event, acked=True)
    return twiml(xml)


async def _elsewhere(request: Request) -> str | None:
    """While draining: TwiML that sends a new call to another instance through the public URL (the
    load balancer, seeing our 503, picks a live one), once; None when there is none to send it to."""
    bridge = deps(request)
    if DRAINED_PARAM in request.query_params or not bridge.settings.public_url:
        return None
    if await bridge.cluster.other_instances() == 0:
        return None
    response = VoiceResponse()
    response.redirect(f"{bridge.settings.public_url}/twilio/voice?{DRAINED_PARAM}={bridge.instance}", method="POST")
    return str(response)


async def _stream(request: Request, call_sid: str, created: bool) -> str:
    bridge = deps(request)
    if created and not bridge.setup.request(call_sid):
        await bridge.calls.move(call_sid, Trigger.FAIL, reason="overloaded")
        return fallback_twiml()
    if not created:   # a retry: the fallback if its setup failed meanwhile (a new call's has only begun)
        existing = await bridge.store.get_session(call_sid)
        if existing and existing.state == CallState.FAILED:
            return fallback_twiml()
    settings = bridge.settings
    return stream_twiml(settings.public_url or f"http://{settings.host}:{settings.port}", call_sid,
                        revealed(settings.twilio_auth_token))


async def _bypass(request: Request, call_sid: str, session: Session, created: bool) -> str:
    bridge = deps(request)
    if not created:  # a retry: answer what we answered before, create nothing twice
        existing = await bridge.store.get_session(call_sid)
        return (existing.answer if existing and existing.answer else fallback_twiml())
    await bridge.calls.move(call_sid, Trigger.SETUP_STARTED)
    started = time.monotonic()
    settings = bridge.settings
    try:
        call = await asyncio.wait_for(bridge.vapi.create_bypass_call(
            settings.vapi_assistant_id, settings.vapi_phone_number_id, session.from_number or "",
            metadata={"twilioCallSid": call_sid}), timeout=settings.bypass_timeout)
    except (TimeoutError, TwivapiError) as exc:
        reason = "vapi-timeout" if isinstance(exc, asyncio.TimeoutError) else "vapi-error"
        await bridge.recorder.record(EventType.VAPI_SETUP_FAILED, call_sid,
                                     error=reason if reason == "vapi-timeout" else str(exc))
        await bridge.calls.move(call_sid, Trigger.FAIL, reason=reason)
        await bridge.store.update_session(call_sid, answer=fallback_twiml())
        return fallback_twiml()
    xml = call["phoneCallProviderDetails"]["twiml"]
    await bridge.store.update_session(call_sid, answer=xml)
    await bridge.setup.attach(call_sid, call, setup_ms=(time.monotonic() - started) * 1000)
    return xml


async def status(request: Request) -> Response:
    received = time.time()
    params, body, form = await signed_request(request)
    call_sid = require_call_sid(params)
    first = await _status(request, params, call_sid, received)
    forwarder = deps(request).forwarder
    if forwarder.twilio_url and first:   # after our own processing; a retry is not forwarded again
        forwarder.inform_twilio(call_sid, body, request.headers.get("content-type", ""), params if form else None,
                                request.headers.get("i-twilio-idempotency-token"))
    return Response(status_code=204)


async def _status(request: Request, params: Params, call_sid: str, received: float) -> bool:
    """Apply an authenticated status callback; False when it is a retry of one already applied."""
    app = deps(request)
    call_status = params.first("CallStatus")
    if not call_status:
        raise HttpError(400, "missing_field", "CallStatus is required")
    sequence = params.first("SequenceNumber")
    if sequence is not None and not sequence.isdigit():
        raise HttpError(400, "invalid_field", "SequenceNumber must be a whole number")
    if not await _claim_retry(request, "status"):
        await app.recorder.record(EventType.TWILIO_STATUS_DUPLICATE, call_sid, received_at=received,
                                  status=call_status)
        return False
    event = await app.recorder.record(EventType.TWILIO_STATUS, call_sid, received_at=received, status=call_status,
                                      sequence=sequence)
    await app.recorder.mark(event, acked=True)
    session = await app.store.get_session(call_sid)
    if session is None:
        return True
    if sequence is not None and not await app.store.apply_status_sequence(call_sid, int(sequence)):
        await app.recorder.record(EventType.TWILIO_STATUS_STALE, call_sid, status=call_status, sequence=sequence)
        return True
    if call_status in TERMINAL_TWILIO_STATUSES:
        await app.calls.end(call_sid, f"twilio-{call_status}")
    await app.recorder.mark(event, processed=True)
    return True


async def after_stream(request: Request) -> Response:
    """Twilio asks what to do once our <Connect><Stream> ended: the fallback if setup failed."""
    app = deps(request)
    params = await signed_params(request)
    call_sid = require_call_sid(params)
    session = await app.store.get_session(call_sid)
    await app.recorder.record(EventType.TWILIO_AFTER_STREAM, call_sid, state=session.state.value if session else None)
    if session is not None and session.state == CallState.FAILED:
        return twiml(fallback_twiml())
    response = VoiceResponse()
    response.hangup()
    return twiml(str(response))
