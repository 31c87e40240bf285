"""The call inspector (``twivapi inspect``): a page and its data, served by the admin app.

    GET  /inspect                       the page (static files from ``twivapi_cli/data/inspector``)
    GET  /inspect/static/{name}         its script and style
    GET  /calls                         the calls, live and recent, newest first (callers masked)
    GET  /calls/{sid}                   one call: session, events, per-turn latency, recording, webhooks
    GET  /calls/{sid}/recording.wav     its two-leg recording (``serve --record``)
    GET  /calls/{sid}/fixture           its webhooks as a replay fixture (as ``fixtures record`` writes)
    POST /calls/{sid}/resend            re-send one of its webhooks (``{"index": N}``) to the bridge, signed

Every request needs the admin token, in ``Authorization: Bearer`` or (for what a browser loads by
URL: the page, its files, the event stream, the audio) a ``token`` query parameter; the admin app
listens on loopback only. The page updates itself from ``/events``.
"""

from __future__ import annotations

import collections
import json
import re
import time
from html import escape
from importlib import resources
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .. import signing
from ..config import revealed
from ..models import Event, EventType
from ..tail import mask, turn_budget
from .deps import Deps
from .http import error_response
from .webhook_log import summary

CALLS_KEPT = 2000
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


class CallIndex:
    """What the call list shows, kept up to date from every event the bridge records."""

    def __init__(self) -> None:
        self.calls: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def observe(self, event: Event) -> None:
        if not event.call_sid:
            return
        call = self.calls.get(event.call_sid)
        if call is None:
            call = self.calls[event.call_sid] = {"call_sid": event.call_sid, "state": "ringing", "mode": None,
                                                 "caller": None, "started_at": event.received_at, "events": 0}
            if len(self.calls) > CALLS_KEPT:
                self.calls.popitem(last=False)
        call["events"] += 1
        call["last_at"], call["last_event"] = event.received_at, event.type
        if event.type == EventType.STATE:
            call["state"] = event.data.get("state", call["state"])
        elif event.type == EventType.TWILIO_VOICE:
            call["mode"] = event.data.get("mode") or call["mode"]
            call["caller"] = mask(event.data.get("from"), "from") if event.data.get("from") else call["caller"]
        elif event.type == EventType.MEDIA_CLEAR:
            call["barge_ins"] = call.get("barge_ins", 0) + 1

    def listing(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for call in reversed(self.calls.values()):
            rows.append({**call, "age_s": round(now - call["started_at"], 1),
                         "live": call["state"] not in ("ended", "failed")})
        return rows


def _bridge(request: Request) -> Deps:
    found: Deps = request.app.state.bridge
    return found


def _call_sid(request: Request) -> str | None:
    sid = request.path_params.get("sid", "")
    return sid if CALL_SID.fullmatch(sid) else None


async def page(request: Request) -> Response:
    html = resources.files("twivapi_cli").joinpath("data", "inspector", "index.html").read_text()
    # the (valid: checked before) token goes into the page's own script and style URLs, nowhere else
    html = html.replace("{{token}}", escape(request.query_params.get("token", ""), quote=True))
    return Response(html, media_type="text/html", headers={"Cache-Control": "no-store",
                                                           "Content-Security-Policy": CSP,
                                                           "Referrer-Policy": "no-referrer"})


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; media-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return error_response(404, "not_found", "no such file")
    text = resources.files("twivapi_cli").joinpath("data", "inspector", name).read_text()
    return Response(text, media_type=STATIC[name], headers={"Cache-Control": "no-store"})


async def calls(request: Request) -> JSONResponse:
    index: CallIndex = request.app.state.call_index
    return JSONResponse({"calls": index.listing(time.time())})


async def call_detail(request: Request) -> Response:
    bridge, sid = _bridge(request), _call_sid(request)
    if sid is None:
        return error_response(400, "bad_request", "not a CallSid (CA + 32 hex digits)")
    events = [mask(e.to_dict()) for e in await bridge.store.events(0, call_sid=sid, limit=10_000)]
    session = await bridge.store.get_session(sid)
    if not events and session is None:
        return error_response(404, "not_found", "no such call")
    recording = _recording_meta(bridge, sid)
    webhooks = [summary(w, mask(step)) for w, step in bridge.webhooks.of_call(sid)]
    return JSONResponse({"call_sid": sid, "session": mask(session.to_dict()) if session else None,
                         "events": events, "turns": turn_budget(events), "recording": recording,
                         "webhooks": webhooks}, headers={"Cache-Control": "no-store"})


def _recording_meta(bridge: Deps, sid: str) -> dict[str, Any] | None:
    directory = bridge.settings.record_dir
    if directory is None or not (directory / f"{sid}.wav").is_file():
        return None
    try:
        meta = json.loads((directory / f"{sid}.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return {"heard": meta.get("heard", []), "cleared": meta.get("cleared", []),
            "duration_ms": meta.get("duration_ms"), "started_at": meta.get("started_at"),
            "complete": meta.get("complete", False)}


async def recording(request: Request) -> Response:
    bridge, sid = _bridge(request), _call_sid(request)
    directory = bridge.settings.record_dir
    if sid is None or directory is None or not (directory / f"{sid}.wav").is_file():
        return error_response(404, "not_found", "no recording of this call (serve --record DIR)")
    return FileResponse(directory / f"{sid}.wav", media_type="audio/wav", filename=f"{sid}.wav",
                        content_disposition_type="inline", headers={"Cache-Control": "no-store"})


async def fixture(request: Request) -> Response:
    bridge, sid = _bridge(request), _call_sid(request)
    if sid is None:
        return error_response(400, "bad_request", "not a CallSid (CA + 32 hex digits)")
    found = bridge.webhooks.fixture(sid)
    if not found["steps"]:
        return error_response(404, "not_found", "no webhooks of this call are kept (the newest 5,000 are)")
    return JSONResponse(found, headers={"Content-Disposition": f'attachment; filename="{sid}.json"'})


async def resend(request: Request) -> Response:
    """Re-send one of a call's recorded webhooks to the bridge, signed as Twilio or Vapi would."""
    bridge, sid = _bridge(request), _call_sid(request)
    try:
        index = int((await request.json())["index"])
    except (ValueError, KeyError, TypeError):
        return error_response(400, "bad_request", 'send {"index": N}: which of the call\'s webhooks')
    kept = bridge.webhooks.of_call(sid) if sid else []
    if not 0 <= index < len(kept):
        return error_response(404, "not_found", "no such webhook of this call")
    webhook = kept[index][0]
    public = (bridge.settings.public_url or "http://127.0.0.1").rstrip("/")
    if webhook.path == "/vapi/webhook":
        headers = {"content-type": "application/json",
                   **signing.sign_vapi(revealed(bridge.settings.vapi_webhook_secret), webhook.body, "secret")}
    else:
        params = signing.parse_form(webhook.body)
        headers = {"content-type": "application/x-www-form-urlencoded",
                   "X-Twilio-Signature": signing.twilio_signature(revealed(bridge.settings.twilio_auth_token),
                                                                  public + webhook.path, params)}
    transport = httpx.ASGITransport(app=request.app.state.bridge_app)
    async with httpx.AsyncClient(transport=transport, base_url=public) as client:
        answer = await client.post(webhook.path, content=webhook.body, headers=headers)
    return JSONResponse({"path": webhook.path, "status": answer.status_code, "body": answer.text[:2000]})


def inspector_routes() -> list[BaseRoute]:
    return [Route("/inspect", page), Route("/inspect/static/{name}", static), Route("/calls", calls),
            Route("/calls/{sid}", call_detail), Route("/calls/{sid}/recording.wav", recording),
            Route("/calls/{sid}/fixture", fixture), Route("/calls/{sid}/resend", resend, methods=["POST"])]
