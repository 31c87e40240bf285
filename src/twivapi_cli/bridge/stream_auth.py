"""Who may open a media stream, and for which call.

Sources disagree on whether Twilio signs the Media Streams upgrade, and over which URL (its docs say
to validate ``X-Twilio-Signature`` there; its own agent library says the upgrade is not signed). So
the stream is authenticated by what only Twilio can have: the TwiML we answered to a signed voice
webhook carries a per-call token as a ``<Parameter>`` (``signing.stream_token``: an HMAC of the
CallSid keyed by the Auth Token), and Twilio hands it back in ``start.customParameters``. A
``start`` without the right token for its CallSid is refused (1008), whatever the upgrade carried.

The upgrade's signature is checked when present and the outcome logged, with the usual diagnosis
(which URL it is valid for, when not ours); ``TWIVAPI_MEDIA_SIGNATURE=required`` makes a valid one
mandatory as well (refused before the socket opens). And Twilio opens one bidirectional stream per
call: a ``start`` for a call that already has one (another socket) is refused too.
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from .. import signing, twilio_media
from ..config import revealed
from ..models import EventType
from .deps import Deps
from .http import public_url_for

log = logging.getLogger("twivapi.bridge")

REQUIRED = "required"


def upgrade_allowed(bridge: Deps, websocket: WebSocket) -> bool:
    """Whether the upgrade may open: always, unless TWIVAPI_MEDIA_SIGNATURE=required and its
    X-Twilio-Signature is missing or not valid for the wss:// public URL. Every outcome but a
    valid signature is logged (a missing one at debug level: Twilio may not sign)."""
    required = bridge.settings.media_signature == REQUIRED
    signature = websocket.headers.get(signing.TWILIO_SIGNATURE_HEADER)
    url = public_url_for(bridge.settings, websocket.url, websocket=True)
    problem = _signature_problem(bridge, websocket, url, signature)
    if problem is None:
        log.debug("media upgrade: X-Twilio-Signature valid for %s", url)
        return True
    if required:
        log.warning("403 /twilio/media: %s (TWIVAPI_MEDIA_SIGNATURE=required)", problem)
        return False
    if signature is None:
        log.debug("media upgrade: %s; the stream's start token authenticates it", problem)
        return True
    bridge.recorder.count("media.signature_invalid")
    log.warning("media upgrade: %s; not refused (TWIVAPI_MEDIA_SIGNATURE=optional): the stream's start token "
                "authenticates it", problem)
    return True


def _signature_problem(bridge: Deps, websocket: WebSocket, url: str, signature: str | None) -> str | None:
    """None when ``signature`` is Twilio's for ``url`` (or ``url/``: Twilio's docs say to try the
    trailing slash too); else what is wrong, saying which URL it is valid for when that is found."""
    if signature is None:
        return "no X-Twilio-Signature on the upgrade"
    if not signature.isascii():   # Twilio's is base64
        return "X-Twilio-Signature is not ASCII (Twilio sends base64)"
    token = revealed(bridge.settings.twilio_auth_token)
    if any(signing.verify_twilio(token, candidate, {}, signature) for candidate in (url, url.rstrip("/") + "/")):
        return None
    path_qs = websocket.url.path + (f"?{websocket.url.query}" if websocket.url.query else "")
    candidates = signing.candidate_urls(bridge.settings.public_url, path_qs, websocket.headers, websocket.url.scheme)
    matched = signing.diagnose_twilio_url(token, signature, {}, None, candidates, url)
    if matched:
        return (f"X-Twilio-Signature is valid for {matched} but this bridge validates against {url}; set "
                "TWIVAPI_PUBLIC_URL (or --public-url) to the base URL Twilio calls")
    return f"X-Twilio-Signature does not match {url} (wrong TWILIO_AUTH_TOKEN?)"


async def start_refusal(bridge: Deps, start: twilio_media.Start) -> str | None:
    """None when this ``start`` may link its socket to its call; else the end reason of a refusal,
    recorded (``media.refused``), counted (``media.start_refused``) and logged: no valid token for
    its CallSid (``bad-stream-token``), no live session (``no-session``), or a call that already
    has a media stream (``stream-already-open``). The token is checked first: the store is not
    asked about a call by anyone who could not have had our TwiML."""
    auth_token = revealed(bridge.settings.twilio_auth_token)
    given = start.custom_parameters.get(signing.STREAM_TOKEN_PARAM)
    if not signing.verify_stream_token(auth_token, start.call_sid, given):
        reason = "bad-stream-token"
        detail = (f"{'a wrong' if given else 'no'} {signing.STREAM_TOKEN_PARAM} parameter for this CallSid: "
                  "not a stream our TwiML started")
    else:
        session = await bridge.store.get_session(start.call_sid)
        if session is None or session.state.terminal:
            reason, detail = "no-session", "no live session for this call"
        elif session.stream_sid:
            reason, detail = "stream-already-open", f"the call already has a media stream ({session.stream_sid})"
        else:
            return None
    bridge.recorder.count("media.start_refused")
    log.warning("media %s: start refused (1008): %s", start.call_sid[:40], detail)
    await bridge.recorder.record(EventType.MEDIA_REFUSED, start.call_sid, reason=detail)
    return reason
