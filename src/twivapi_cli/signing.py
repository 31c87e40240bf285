"""Signing and verification for both sides, in constant time.

Twilio (reference/twilio.md §1): HMAC-SHA1 over the full public URL followed by every POST parameter
sorted by name (name then value, decoded, blanks kept), base64. JSON bodies: the URL carries
``bodySHA256`` (hex SHA-256 of the raw bytes) and only the URL is signed. The HMAC itself is computed
by the twilio SDK's ``RequestValidator.compute_signature`` (the oracle everyone trusts); we add the
parts it gets wrong for a server: ``hmac.compare_digest``, hashing raw bytes rather than str, and a
diagnosis of *which* URL Twilio signed when validation fails behind a proxy or tunnel.

Vapi (reference/vapi.md §3): the plain secret in ``X-Vapi-Secret``, ``Authorization: Bearer``, or
an HMAC credential (hex SHA-256 in ``X-Signature`` over ``"{timestamp}.{body}"`` with
``X-Timestamp``, or ``X-Vapi-Signature`` over the raw body). All are accepted; which one matched is
reported so logs can say so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
HMAC_TOLERANCE_SECONDS = 300


class Params(dict):
    """name -> list of values, with the ``getlist`` the SDK's validator looks for."""

    def getlist(self, name: str) -> list[str]:
        return self[name]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Params:
        params = cls()
        for name, value in pairs:
            params.setdefault(name, []).append(value)
        return params

    def first(self, name: str, default: str | None = None) -> str | None:
        values = self.get(name)
        return values[0] if values else default


def parse_form(body: bytes) -> Params:
    """Decode an x-www-form-urlencoded body, keeping blank values (they are signed too)."""
    text = body.decode("utf-8")  # UnicodeDecodeError -> caller answers 400
    return Params.from_pairs(parse_qsl(text, keep_blank_values=True, strict_parsing=False))


def _as_params(params: Mapping[str, str | Sequence[str]] | None) -> Params:
    if isinstance(params, Params):
        return params
    result = Params()
    for name, value in (params or {}).items():
        result[name] = [value] if isinstance(value, str) else list(value)
    return result


def twilio_signature(token: str, url: str, params: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """The X-Twilio-Signature Twilio would send for this URL and these form parameters."""
    return RequestValidator(token).compute_signature(url, _as_params(params))


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def url_with_body_hash(url: str, body: bytes) -> str:
    """The URL Twilio requests for a JSON body: the query gains ``bodySHA256``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + [("bodySHA256", body_sha256(body))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def sign_twilio_json(token: str, url: str, body: bytes) -> tuple[str, str]:
    """(URL to post to, signature) for a JSON body."""
    signed_url = url_with_body_hash(url, body)
    return signed_url, twilio_signature(token, signed_url, None)


def _port_variants(url: str) -> list[str]:
    """The URL as given, without its port and with the default port (the SDK tries both too)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme, 443)
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    variants = [url]
    if parts.port is not None:
        variants.append(urlunsplit(parts._replace(netloc=host)))
    else:
        variants.append(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
    return variants


def verify_twilio(token: str, url: str, params: Mapping | None, signature: str | None,
                  body: bytes | None = None) -> bool:
    """True when ``signature`` is Twilio's for this URL (with or without port) and parameters.

    For JSON requests pass ``params=None`` and the raw ``body``: the body must hash to the URL's
    ``bodySHA256``, and only the URL is signed.
    """
    if not signature:
        return False
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    if body is not None and params is None:
        expected_hash = query.get("bodySHA256")
        if expected_hash is None or not hmac.compare_digest(expected_hash, body_sha256(body)):
            return False
    validator = RequestValidator(token)
    signed_params = _as_params(params)
    ok = False
    for candidate in _port_variants(url):
        ok |= hmac.compare_digest(validator.compute_signature(candidate, signed_params), signature)
    return ok


def candidate_urls(public_url: str | None, path_qs: str, headers: Mapping[str, str],
                   scheme: str = "https") -> list[str]:
    """URLs Twilio may have signed instead of ours: other scheme, Host / X-Forwarded-* headers,
    with and without port, with and without a trailing slash. Used only to explain a failure."""
    hosts: list[str] = []
    for name in ("x-forwarded-host", "host"):
        value = headers.get(name)
        if value:
            hosts.append(value.split(",")[0].strip())
    if public_url:
        hosts.append(urlsplit(public_url).netloc)
    schemes = [s for s in (headers.get("x-forwarded-proto", "").split(",")[0].strip(), scheme,
                           "https", "http", "wss", "ws") if s]
    path, _, query = path_qs.partition("?")
    paths = [path, path.rstrip("/") if path.endswith("/") else path + "/"]
    prefix = urlsplit(public_url).path.rstrip("/") if public_url else ""
    if prefix and not path.startswith(prefix):
        paths += [prefix + p for p in paths]
    seen: list[str] = []
    for s in schemes:
        for h in hosts:
            for p in paths:
                for url in _port_variants(f"{s}://{h}{p}" + (f"?{query}" if query else "")):
                    if url not in seen:
                        seen.append(url)
    return seen


def diagnose_twilio_url(token: str, signature: str | None, params: Mapping | None, body: bytes | None,
                        candidates: Iterable[str], expected_url: str) -> str | None:
    """The candidate URL that the signature matches, if any (never the expected signature)."""
    if not signature:
        return None
    for url in candidates:
        if url == expected_url:
            continue
        check_url = url
        if body is not None and params is None:
            expected_query = dict(parse_qsl(urlsplit(expected_url).query))
            if "bodySHA256" in expected_query and "bodySHA256" not in url:
                check_url = url_with_body_hash(url, body)
        if verify_twilio(token, check_url, params, signature, body):
            return url
    return None


# --- Vapi -----------------------------------------------------------------------------------------

def vapi_hmac(secret: str, body: bytes, timestamp: str | None) -> str:
    message = f"{timestamp}.".encode() + body if timestamp is not None else body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_vapi(secret: str, body: bytes, mode: str = "secret", *, timestamp: float | None = None) -> dict[str, str]:
    """Headers Vapi sends for a server message under each credential type."""
    if mode == "secret":
        return {"X-Vapi-Secret": secret}
    if mode == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if mode == "hmac":
        ts = str(int((timestamp or time.time()) * 1000))
        return {"X-Timestamp": ts, "X-Signature": vapi_hmac(secret, body, ts)}
    if mode == "none":
        return {}
    raise ValueError(f"unknown Vapi auth mode {mode!r} (secret, bearer, hmac, none)")


def _fresh(timestamp: str, now: float) -> bool:
    try:
        value = float(timestamp)
    except ValueError:
        return False
    seconds = value / 1000 if value > 1e11 else value  # ms or s
    return abs(now - seconds) <= HMAC_TOLERANCE_SECONDS


def verify_vapi(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> tuple[bool, str]:
    """(accepted, how-or-why). ``headers`` must be case-insensitive (Starlette's are)."""
    plain = headers.get("x-vapi-secret")
    if plain is not None:
        ok = hmac.compare_digest(plain.encode(), secret.encode())
        return ok, "x-vapi-secret" if ok else "X-Vapi-Secret does not match VAPI_WEBHOOK_SECRET"
    auth = headers.get("authorization")
    if auth is not None:
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        ok = hmac.compare_digest(token.encode(), secret.encode())
        return ok, "bearer" if ok else "Authorization bearer token does not match VAPI_WEBHOOK_SECRET"
    signature = headers.get("x-signature")
    if signature is not None:
        timestamp = headers.get("x-timestamp")
        if timestamp is None or not _fresh(timestamp, now or time.time()):
            return False, "X-Timestamp missing or outside the 5 minute tolerance"
        signature = signature.removeprefix("sha256=")
        ok = hmac.compare_digest(signature, vapi_hmac(secret, body, timestamp))
        return ok, "hmac" if ok else "X-Signature HMAC does not match (wrong secret or altered body)"
    signature = headers.get("x-vapi-signature")
    if signature is not None:
        ok = hmac.compare_digest(signature.removeprefix("sha256="), vapi_hmac(secret, body, None))
        return ok, "hmac-body" if ok else "X-Vapi-Signature HMAC does not match"
    return False, "no X-Vapi-Secret, Authorization or HMAC signature header"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
