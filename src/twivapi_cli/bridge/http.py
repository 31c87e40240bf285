"""HTTP edge helpers: bounded body reads, the one JSON error shape, Twilio signature checks with a
diagnosis of URL mismatches (the most common failure behind tunnels and proxies)."""

from __future__ import annotations

import logging

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import signing
from ..config import Settings, revealed
from ..twilio_media import ws_url

log = logging.getLogger("twivapi.bridge")

MAX_BODY = 1024 * 1024  # 1 MiB: no legitimate webhook comes close


class HttpError(Exception):
    """Raised inside a handler, turned into the JSON error shape by the app."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The one error shape every route answers with: {"error": {"code", "message"}}."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise HttpError(413, "body_too_large", f"body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "body_too_large", f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def public_url_for(settings: Settings, url: URL, *, websocket: bool = False) -> str:
    """The URL Twilio requested: the configured public base URL + path + query, never the Host header.
    For the Media Streams handshake the scheme is wss:// (ws:// for a plain-http public URL)."""
    base = (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    if websocket:
        base = ws_url(base)
    return base + url.path + (f"?{url.query}" if url.query else "")


def parse_twilio_form(body: bytes, content_type: str) -> signing.Params | None:
    """Form parameters, or None for a JSON body (signed via bodySHA256)."""
    if content_type.startswith("application/json"):
        return None
    if content_type and not content_type.startswith("application/x-www-form-urlencoded"):
        raise HttpError(415, "unsupported_media_type", "expected application/x-www-form-urlencoded or JSON")
    try:
        return signing.parse_form(body)
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed_form", "body is not valid UTF-8 form data") from None


def check_twilio_signature(settings: Settings, request: Request, params: signing.Params | None,
                           body: bytes, url: str | None = None) -> None:
    """Raise a 403 HttpError unless X-Twilio-Signature is valid for our public URL.

    On failure, try the URLs Twilio may have signed instead and log which one matched and what to
    change; the request is refused either way. The expected signature is never logged.
    """
    token = revealed(settings.twilio_auth_token)
    url = url or public_url_for(settings, request.url)
    signature = request.headers.get(signing.TWILIO_SIGNATURE_HEADER)
    json_body = body if params is None else None
    if signing.verify_twilio(token, url, params, signature, json_body):
        return
    if not signature:
        reason = "missing X-Twilio-Signature header"
    else:
        path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        candidates = signing.candidate_urls(settings.public_url, path_qs, request.headers, request.url.scheme)
        matched = signing.diagnose_twilio_url(token, signature, params, json_body, candidates, url)
        if matched:
            reason = (f"signature is valid for {matched} but this bridge validates against {url}; "
                      f"set TWIVAPI_PUBLIC_URL (or --public-url) to the base URL Twilio calls")
        elif params is None and "bodySHA256" not in url:
            reason = "JSON body without bodySHA256 in the URL"
        else:
            reason = f"signature does not match {url} (wrong TWILIO_AUTH_TOKEN, or the body was altered)"
    log.warning("403 %s: %s", request.url.path, reason)
    raise HttpError(403, "bad_signature", "X-Twilio-Signature is missing or invalid")


def twiml(xml: str) -> Response:
    return Response(xml, media_type="text/xml")
