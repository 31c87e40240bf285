"""HTTP edge helpers: bounded body reads (size and time), one bounded JSON parse, the one JSON error
shape, Twilio signature checks with a diagnosis of URL mismatches (the most common failure behind
tunnels and proxies)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from starlette.datastructures import URL
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .. import signing
from ..config import Settings, revealed
from ..twilio_media import ws_url

log = logging.getLogger("twivapi.bridge")

MAX_BODY = 1024 * 1024  # 1 MiB: no legitimate webhook comes close
# Vapi's deepest messages (a call's assistant with tool schemas) nest about 15 levels; past this a body
# is refused before anything walks it (json.dumps in the event log, the tools, Redis queues).
MAX_JSON_DEPTH = 64


class HttpError(Exception):
    """Raised inside a handler, turned into the JSON error shape by the app."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The one error shape every route answers with: {"error": {"code", "message"}}. A 408 also
    closes the connection: what is left of that request's body may still be on its way."""
    headers = {"connection": "close"} if status == 408 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY, timeout: float | None = None) -> bytes:
    """The whole body, at most ``limit`` bytes (413), within ``timeout`` seconds (408; default:
    the bridge's ``TWIVAPI_BODY_TIMEOUT``), so a client that stalls mid-body holds nothing for long."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):   # "²".isdigit(), but int("²") raises
            raise HttpError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise HttpError(413, "body_too_large", f"body over {limit} bytes")
    if timeout is None:
        timeout = request.app.state.deps.settings.body_timeout
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, "body_too_large", f"body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        log.warning("408 %s: the body did not arrive within %g s (TWIVAPI_BODY_TIMEOUT)", request.url.path, timeout)
        raise HttpError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise HttpError(400, "incomplete_body", "the client closed the connection before the body was complete") from None
    return b"".join(chunks)


class _OutOfRange(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _OutOfRange(text)
    return value


def _no_constant(name: str) -> Any:   # NaN, Infinity, -Infinity: Python's extension, not JSON
    raise _OutOfRange(name)


def _deeper_than(value: dict | list, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` levels (itself is level 1): level by
    level, without recursion; json.loads gives exact dicts and lists."""
    level: list = [value]
    for _ in range(limit):
        below = []
        for node in level:
            for child in (node.values() if type(node) is dict else node):
                if type(child) is dict or type(child) is list:
                    below.append(child)
        if not below:
            return False
        level = below
    return True


def parse_json_object(body: bytes, *, not_object: tuple[str, str] = ("malformed_json", "JSON body must be an object"),
                      max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The one parse of a JSON request body: an object (else a 400 with ``not_object``'s code and
    message), nested at most ``max_depth`` levels, numbers within range; any other body is a 400
    in the one error shape, so nothing after it sees a structure it cannot handle."""
    try:
        data = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:   # deeper than json's own recursion allows
        raise HttpError(400, "json_too_deep", f"JSON nested deeper than {max_depth} levels") from None
    except _OutOfRange:
        raise HttpError(400, "json_out_of_range", "JSON number out of range (NaN, Infinity or beyond 1e308)") from None
    except json.JSONDecodeError:
        raise HttpError(400, "malformed_json", "body is not valid JSON") from None
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_json", "body is not valid UTF-8 JSON") from None
    except ValueError:   # an integer past Python's 4,300-digit conversion limit
        raise HttpError(400, "json_out_of_range", "JSON number too long") from None
    if not isinstance(data, dict):
        raise HttpError(400, *not_object)
    # a body can only nest as deep as it has brackets: most never need the walk
    if body.count(b"[") + body.count(b"{") > max_depth and _deeper_than(data, max_depth):
        raise HttpError(400, "json_too_deep", f"JSON nested deeper than {max_depth} levels")
    return data


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
    if signature and not signature.isascii():   # Twilio's is base64: refused before any comparison
        reason = "X-Twilio-Signature is not ASCII (Twilio sends base64)"
    elif signing.verify_twilio(token, url, params, signature, json_body):
        return
    elif not signature:
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
