"""Signing and verification for both sides, in constant time.

Twilio (reference/twilio.md §1): HMAC-SHA1 over the full public URL followed by every POST parameter
sorted by name (name then value, decoded, blanks kept), base64. JSON bodies: the URL carries
``bodySHA256`` (hex SHA-256 of the raw bytes) and only the URL is signed. The HMAC itself is computed
by the twilio SDK's ``RequestValidator.compute_signature`` (the oracle everyone trusts); we add the
parts it gets wrong for a server: ``hmac.compare_digest``, hashing raw bytes rather than str, and a
diagnosis of *which* URL Twilio signed when validation fails behind a proxy or tunnel.

Vapi (reference/vapi.md §3): the plain secret in ``X-Vapi-Secret`` (or, as older setups send it,
in ``X-Vapi-Signature``), ``Authorization: Bearer``, or an HMAC credential as Vapi's
``HMACAuthenticationPlan`` configures it (``HmacPlan``: sha256/sha512/sha1, hex or base64, any
signature / timestamp / message-id header names, a prefix, a payload format, with or without a
timestamp, a base64 secret; default hex SHA-256 in ``X-Signature`` over ``"{timestamp}.{body}"``
with ``X-Timestamp``), or ``X-Vapi-Signature`` as hex SHA-256 over the raw body. All are accepted;
which one matched is reported so logs can say so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


def header_bytes(value: str) -> bytes:
    """A header value as the bytes a client sent: ASGI servers hand them over latin-1-decoded
    (Starlette's headers do), so latin-1 gives them back exactly; a str that never came off the wire
    (a character above U+00FF) is taken as UTF-8. Never raises, so a comparison never does."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _same(received: str, expected: str) -> bool:
    """Constant-time comparison of a received header value with what we computed, as bytes:
    ``hmac.compare_digest`` raises TypeError on a str that is not ASCII (any client can send one)."""
    return hmac.compare_digest(header_bytes(received), expected.encode("utf-8", "surrogatepass"))


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


def _port_variants(url: str) -> Iterator[str]:
    """The URL as given, then without its port or with the default port (the SDK tries both too);
    lazily: the second is built only if the first did not match."""
    yield url
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme, 443)
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None:
        yield urlunsplit(parts._replace(netloc=host))
    else:
        yield urlunsplit(parts._replace(netloc=f"{host}:{default}"))


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
        if expected_hash is None or not _same(expected_hash, body_sha256(body)):   # from the query: any text
            return False
    validator = RequestValidator(token)
    signed_params = _as_params(params)
    # the URL as given first: a match there spares the second HMAC (which variant matched is no secret)
    return any(_same(signature, validator.compute_signature(candidate, signed_params))
               for candidate in _port_variants(url))


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
                try:
                    variants = list(_port_variants(f"{s}://{h}{p}" + (f"?{query}" if query else "")))
                except ValueError:   # a Host / X-Forwarded-* value that is no host ("[", "a:b", "h:99999")
                    continue
                for url in variants:
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


# --- the media stream's token --------------------------------------------------------------------
# Whether (and over which URL) Twilio signs the Media Streams upgrade, sources disagree. What only
# Twilio can have is the TwiML we answered to a signed voice webhook: it carries this token as a
# <Parameter>, and Twilio hands it back in the stream's start message (Start.custom_parameters).

STREAM_TOKEN_PARAM = "twivapiToken"


def stream_token(auth_token: str, call_sid: str) -> str:
    """The per-call stream token: hex HMAC-SHA256 of the CallSid, keyed by the Auth Token (64
    characters: well within a <Parameter>'s 500)."""
    return hmac.new(auth_token.encode(), call_sid.encode(), hashlib.sha256).hexdigest()


def verify_stream_token(auth_token: str, call_sid: str, token: str | None) -> bool:
    """Whether ``token`` (from the start message's parameters) is this call's, in constant time."""
    return token is not None and _same(token, stream_token(auth_token, call_sid))


# --- Vapi -----------------------------------------------------------------------------------------

def vapi_hmac(secret: str, body: bytes, timestamp: str | None) -> str:
    message = f"{timestamp}.".encode() + body if timestamp is not None else body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


HMAC_ALGORITHMS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512, "sha1": hashlib.sha1}
HMAC_ENCODINGS = ("hex", "base64")


@dataclass(frozen=True)
class HmacPlan:
    """Vapi's ``HMACAuthenticationPlan`` (a custom credential's ``authenticationPlan``), field for
    field with the spec's defaults; the secret (``secretKey``) is passed separately."""

    algorithm: str = "sha256"                 # sha256 | sha512 | sha1
    signature_header: str = "x-signature"
    timestamp_header: str = "x-timestamp"
    signature_prefix: str = ""                # e.g. "sha256=" (GitHub style)
    include_timestamp: bool = True
    payload_format: str = ""                  # "" = "{timestamp}.{body}", or "{body}" without a timestamp
    message_id_header: str = ""               # {svix-id} in the payload format (Svix style)
    signature_encoding: str = "hex"           # hex | base64
    secret_is_base64: bool = False

    def __post_init__(self) -> None:
        if self.algorithm not in HMAC_ALGORITHMS:
            raise ValueError(f"HMAC algorithm must be one of {', '.join(HMAC_ALGORITHMS)}")
        if self.signature_encoding not in HMAC_ENCODINGS:
            raise ValueError(f"HMAC signature encoding must be one of {', '.join(HMAC_ENCODINGS)}")

    @property
    def format(self) -> str:
        return self.payload_format or ("{timestamp}.{body}" if self.include_timestamp else "{body}")

    def key(self, secret: str) -> bytes:
        """The HMAC key: the secret's UTF-8 bytes, or its base64 decoding (``secretIsBase64``)."""
        if self.secret_is_base64:
            try:
                return base64.b64decode(secret.strip(), validate=True)
            except ValueError:
                raise ValueError("the webhook secret is not valid base64 (secretIsBase64 is set)") from None
        return secret.encode()

    def payload(self, body: bytes, *, timestamp: str = "", method: str = "POST", url: str = "",
                message_id: str = "") -> bytes:
        """The signed bytes: the payload format with its placeholders filled, ``{body}`` as the raw body."""
        parts = []
        for piece in self.format.split("{body}"):
            for name, value in (("{timestamp}", timestamp), ("{method}", method), ("{url}", url),
                                ("{svix-id}", message_id)):
                piece = piece.replace(name, value)
            parts.append(piece.encode())
        return body.join(parts)

    def signature(self, secret: str, payload: bytes) -> str:
        """The header value: prefix + the digest in the plan's encoding."""
        digest = hmac.new(self.key(secret), payload, HMAC_ALGORITHMS[self.algorithm]).digest()
        encoded = digest.hex() if self.signature_encoding == "hex" else base64.b64encode(digest).decode()
        return self.signature_prefix + encoded

    @property
    def signs_timestamp(self) -> bool:
        return "{timestamp}" in self.format


DEFAULT_HMAC_PLAN = HmacPlan()


def sign_vapi(secret: str, body: bytes, mode: str = "secret", *, timestamp: float | None = None,
              plan: HmacPlan | None = None, url: str = "", message_id: str = "") -> dict[str, str]:
    """Headers Vapi sends for a server message under each credential type: ``secret``
    (``X-Vapi-Secret``), ``signature`` (the plain token in ``X-Vapi-Signature``, as older setups
    send it), ``bearer``, ``hmac`` (as ``plan`` says; default ``X-Signature`` over
    ``"{timestamp}.{body}"``), ``hmac-body`` (``X-Vapi-Signature`` over the raw body), ``none``."""
    if mode == "secret":
        return {"X-Vapi-Secret": secret}
    if mode == "signature":
        return {"X-Vapi-Signature": secret}
    if mode == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if mode == "hmac":
        plan = plan or DEFAULT_HMAC_PLAN
        ts = str(int((timestamp or time.time()) * 1000))
        headers: dict[str, str] = {}
        if plan.include_timestamp or plan.signs_timestamp:
            headers[plan.timestamp_header] = ts
        if plan.message_id_header:
            headers[plan.message_id_header] = message_id
        payload = plan.payload(body, timestamp=ts if plan.signs_timestamp else "", url=url, message_id=message_id)
        headers[plan.signature_header] = plan.signature(secret, payload)
        return headers
    if mode == "hmac-body":
        return {"X-Vapi-Signature": vapi_hmac(secret, body, None)}
    if mode == "none":
        return {}
    raise ValueError(f"unknown Vapi auth mode {mode!r} (secret, signature, bearer, hmac, hmac-body, none)")


def _fresh(timestamp: str, now: float) -> bool:
    try:
        value = float(timestamp)
    except ValueError:
        return False
    seconds = value / 1000 if value > 1e11 else value  # ms or s
    return abs(now - seconds) <= HMAC_TOLERANCE_SECONDS


def verify_vapi(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None,
                plan: HmacPlan | None = None, *, method: str = "POST", url: str = "") -> tuple[bool, str]:
    """(accepted, how-or-why). ``headers`` must be case-insensitive (Starlette's are).

    In order: ``X-Vapi-Secret`` (the plain token), ``Authorization`` (bearer), the HMAC ``plan``'s
    signature header (default ``X-Signature``; ``method`` and ``url`` fill its payload format's
    ``{method}`` and ``{url}``), ``X-Vapi-Signature`` (the plain token, as older setups send it, or
    hex SHA-256 over the raw body).

    Header values are compared as the bytes the client sent (``header_bytes``): the secrets
    against ``VAPI_WEBHOOK_SECRET``'s UTF-8 bytes; a signature or timestamp that is not ASCII (hex,
    base64 and digits are) is refused with that reason. Reasons never quote a value.
    """
    plan = plan or DEFAULT_HMAC_PLAN
    plain = headers.get("x-vapi-secret")
    if plain is not None:
        ok = _same(plain, secret)
        return ok, "x-vapi-secret" if ok else "X-Vapi-Secret does not match VAPI_WEBHOOK_SECRET"
    auth = headers.get("authorization")
    if auth is not None:
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        ok = _same(token, secret)
        return ok, "bearer" if ok else "Authorization bearer token does not match VAPI_WEBHOOK_SECRET"
    signature = headers.get(plan.signature_header)
    if signature is not None:
        ok, why = _verify_plan(secret, plan, headers, signature, body, now, method, url)
        if not ok and plan.signature_header.lower() == "x-vapi-signature" and _same(signature, secret):
            return True, "x-vapi-signature"
        return ok, why
    signature = headers.get("x-vapi-signature")
    if signature is not None:
        if _same(signature, secret):   # the legacy plain token (older docs: "sent as X-Vapi-Signature")
            return True, "x-vapi-signature"
        if not signature.isascii():
            return False, "X-Vapi-Signature is not ASCII (expected the token or hex)"
        ok = _same(signature.removeprefix("sha256="), vapi_hmac(secret, body, None))
        return ok, "hmac-body" if ok else "X-Vapi-Signature is neither VAPI_WEBHOOK_SECRET nor its HMAC of the body"
    return False, f"no X-Vapi-Secret, Authorization, {plan.signature_header} or X-Vapi-Signature header"


def _verify_plan(secret: str, plan: HmacPlan, headers: Mapping[str, str], signature: str, body: bytes,
                 now: float | None, method: str, url: str) -> tuple[bool, str]:
    """An HMAC signature as ``plan`` says it is made."""
    name = plan.signature_header
    timestamp = ""
    if plan.signs_timestamp or plan.include_timestamp:
        found = headers.get(plan.timestamp_header)
        if found is not None and not found.isascii():
            return False, f"{plan.timestamp_header} is not ASCII (expected a number)"
        if found is None or not _fresh(found, now or time.time()):
            return False, f"{plan.timestamp_header} missing or outside the 5 minute tolerance"
        timestamp = found
    if not signature.isascii():
        return False, f"{name} is not ASCII (expected {plan.signature_encoding})"
    message_id = headers.get(plan.message_id_header, "") if plan.message_id_header else ""
    try:
        payload = plan.payload(body, timestamp=timestamp if plan.signs_timestamp else "", method=method, url=url,
                               message_id=message_id)
        expected = plan.signature(secret, payload)
    except ValueError as exc:   # a base64 secret that is not base64: a configuration error, said once per request
        return False, str(exc)
    received = signature.strip()
    if not plan.signature_prefix:   # no prefix configured: "sha256=<hex>" (GitHub style) is taken too
        received = received.removeprefix(f"{plan.algorithm}=")
    if plan.signature_encoding == "hex":
        received, expected = received.lower(), expected.lower()
    ok = _same(received, expected)
    return ok, "hmac" if ok else f"{name} HMAC does not match (wrong secret, wrong plan settings or altered body)"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
