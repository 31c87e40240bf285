"""Call control in stream mode: Vapi's ``phone-call-control`` carried out on the Twilio call, and
``transfer-destination-request`` answered from ``TWIVAPI_TRANSFER_DESTINATIONS``.

In stream mode the Twilio call is the bridge's, not Vapi's: Vapi cannot transfer it or hang it up.
With ``phone-call-control`` in the assistant's ``serverMessages`` (``provision`` asks for it), Vapi
hands both jobs to the server (the spec: "Vapi will no longer do the actual transfer and hangup"):

- ``forward``: the Twilio call is redirected (``calls(sid).update(twiml=...)``) to
  ``<Dial callerId=...><Number>`` for a number or ``<Dial><Sip>`` for a SIP URI. A redirect takes the
  call out of ``<Connect><Stream>``: Twilio stops the media stream itself and the caller is put
  through; then the Vapi call is ended.
- ``hang-up``: ``calls(sid).update(status="completed")``, then the Vapi call is ended.

The order matters. The session is ended first (``forwarded`` / ``assistant-hung-up``) without
closing the media socket, then Twilio is told, then the Vapi side is ended. Closing our socket, or
Vapi's, before Twilio has the redirect would send Twilio to the ``<Connect action>`` (after-stream),
whose ``<Hangup/>`` would end the call the caller is being put through on. A destination that is
neither an E.164 number nor a SIP URI is refused before anything changes (the call goes on with
the assistant); a Twilio error after the session ended ends the call (it was the assistant's last
act) and is recorded with Twilio's code.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from twilio.twiml.voice_response import VoiceResponse

from ..config import E164, SIP_URI, Settings, revealed
from ..models import EventType, Session, SignalKind
from .calls import Calls
from .events import Recorder

log = logging.getLogger("twivapi.bridge")

DEFAULT_API = "https://api.twilio.com"
TWILIO_TIMEOUT = 10.0                # seconds a Calls update may take: the call's queue waits on it
FORWARDED = "forwarded"              # the session's ended_reason after a forward
HUNG_UP = "assistant-hung-up"        # ... after the assistant's hang-up


class TwilioCalls:
    """The Twilio REST calls the bridge makes, through the ``twilio`` SDK (pointed at
    ``TWILIO_API_BASE_URL``), built on first use and closed with the app. Its blocking client runs
    in a worker thread: the SDK's aiohttp client warns on every request (aiohttp deprecated the
    ``BasicAuth`` it uses), and call control is rare enough that a thread costs nothing."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: Any = None

    def _sdk(self) -> Any:
        if self._client is None:
            self.settings.require("twilio_account_sid", "twilio_auth_token")
            from twilio.http.http_client import TwilioHttpClient
            from twilio.rest import Client
            client = Client(self.settings.twilio_account_sid, revealed(self.settings.twilio_auth_token),
                            http_client=TwilioHttpClient(timeout=TWILIO_TIMEOUT))
            if self.settings.twilio_api_base_url != DEFAULT_API:
                client.api.base_url = self.settings.twilio_api_base_url   # the SDK's documented override
            self._client = client
        return self._client

    async def update(self, call_sid: str, **fields: Any) -> None:
        await asyncio.to_thread(self._sdk().calls(call_sid).update, **fields)

    async def aclose(self) -> None:
        session = getattr(getattr(self._client, "http_client", None), "session", None)
        if session is not None:
            session.close()


def forward_twiml(destination: dict[str, Any], session: Session) -> str:
    """``<Dial>`` for a ``TransferDestinationNumber`` (with its caller ID) or ``TransferDestinationSip``.
    ValueError says what is wrong with a destination that is neither."""
    kind = destination.get("type")
    response = VoiceResponse()
    if kind == "number":
        number = destination.get("number")
        if not isinstance(number, str) or not E164.fullmatch(number):
            raise ValueError(f"destination.number {number!r} is not an E.164 number")
        dial = response.dial(caller_id=caller_id(destination, session))
        dial.number(number, send_digits=_extension(destination))
    elif kind == "sip":
        uri = destination.get("sipUri")
        if not isinstance(uri, str) or not SIP_URI.fullmatch(uri):
            raise ValueError(f"destination.sipUri {uri!r} is not a SIP URI")
        response.dial().sip(uri)
    else:
        raise ValueError(f"destination.type {kind!r} is not number or sip")
    return str(response)


def caller_id(destination: dict[str, Any], session: Session) -> str | None:
    """The spec's ``callerId``: unset, the caller's own number (an inbound call's, as Vapi does);
    ``{{customer.number}}`` the caller's, ``{{phoneNumber.number}}`` the number they called."""
    wanted = destination.get("callerId")
    if wanted == "{{phoneNumber.number}}":
        return session.to_number
    if wanted in (None, "", "{{customer.number}}"):
        return session.from_number
    return str(wanted)


def _extension(destination: dict[str, Any]) -> str | None:
    extension = destination.get("extension")
    return f"w{extension}" if isinstance(extension, str) and extension.isdigit() else None   # w: half a second


def transfer_destination(settings: Settings, name: str | None = None) -> dict[str, Any]:
    """The answer to ``transfer-destination-request`` from ``TWIVAPI_TRANSFER_DESTINATIONS``: the
    destination called ``name``, else the one named ``default``, else the first; ``{"error": ...}``
    (Vapi then makes no transfer) when there is none or ``name`` is not in the table."""
    table = dict(settings.transfer_destinations)
    if not table:
        return {"error": "No transfer destination is configured on this bridge (TWIVAPI_TRANSFER_DESTINATIONS)."}
    if name is not None and name not in table:
        return {"error": f"Unknown transfer destination {name!r} (TWIVAPI_TRANSFER_DESTINATIONS has: "
                         f"{', '.join(table)})."}
    chosen = name or ("default" if "default" in table else next(iter(table)))
    target = table[chosen]
    if E164.fullmatch(target):
        return {"destination": {"type": "number", "number": target}}
    return {"destination": {"type": "sip", "sipUri": target}}


class CallControl:
    """Carries out ``phone-call-control`` messages (on the call's queue, in order with its others)."""

    def __init__(self, settings: Settings, calls: Calls, recorder: Recorder, twilio: TwilioCalls | None = None):
        self.calls, self.recorder = calls, recorder
        self.twilio = twilio or TwilioCalls(settings)

    async def apply(self, message: dict[str, Any], session: Session) -> None:
        request = message.get("request")
        if session.state.terminal:   # the caller hung up first, or a second request: nothing to control
            await self._refuse(session, f"the call is already over ({session.ended_reason})", request)
        elif request == "forward":
            await self.forward(session, message.get("destination"))
        elif request == "hang-up":
            await self.hang_up(session)
        else:
            await self._refuse(session, f"request {request!r} is not forward or hang-up", request)

    async def forward(self, session: Session, destination: Any) -> None:
        if not isinstance(destination, dict):
            return await self._refuse(session, "forward without a destination object", "forward")
        try:
            twiml = forward_twiml(destination, session)
        except ValueError as exc:
            return await self._refuse(session, str(exc), "forward")
        target = destination.get("number") or destination.get("sipUri")
        await self._carry_out(session, FORWARDED, EventType.CALL_FORWARDED, {"twiml": twiml},
                              to=target, kind=destination.get("type"))

    async def hang_up(self, session: Session) -> None:
        await self._carry_out(session, HUNG_UP, EventType.CALL_HUNG_UP, {"status": "completed"})

    async def _carry_out(self, session: Session, reason: str, event: str, update: dict[str, str],
                         **detail: Any) -> None:
        change = await self.calls.move_to_end(session.call_sid, reason)   # media socket left to Twilio
        if change is None:
            return await self._refuse(session, "the call ended meanwhile", detail.get("kind") or reason)
        try:
            await self.twilio.update(session.call_sid, **update)
        except Exception as exc:   # TwilioRestException, a missing setting, the network: recorded, never raised
            await self._failed(change, exc)
            return
        await self.recorder.record(event, session.call_sid, **detail)
        self.calls.end_vapi_side(change)

    async def _failed(self, session: Session, exc: Exception) -> None:
        status, code = getattr(exc, "status", None), getattr(exc, "code", None)
        message = getattr(exc, "msg", None) or str(exc)
        log.warning("call control for %s failed: %s", session.call_sid, message)
        await self.recorder.record(EventType.CALL_CONTROL_FAILED, session.call_sid, error=str(message)[:300], status=status, code=code)
        # the session is over: the media socket and the Vapi side end too (the caller hears the end)
        await self.calls.signals.send(session.call_sid, SignalKind.END, {"reason": session.ended_reason or "ended"})
        self.calls.end_vapi_side(session)

    async def _refuse(self, session: Session, why: str, request: Any) -> None:
        log.warning("phone-call-control for %s not carried out: %s", session.call_sid, why)
        await self.recorder.record(EventType.CALL_CONTROL_REFUSED, session.call_sid, request=str(request)[:40], reason=why[:300])

    async def aclose(self) -> None:
        await self.twilio.aclose()

