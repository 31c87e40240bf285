"""Bad input that used to crash a route with a 500, sent the way a client really sends it: raw
sockets to a bridge on real uvicorn, so header values carry any byte a client can put on the wire
(latin-1 included, which httpx refuses to send as str), and bodies can stall half-way.

- JSON that is valid but nested too deep (thousands of brackets), with numbers out of range, or not
  an object: a 400 in the one error shape, on /vapi/webhook and on Twilio's JSON-bodied webhooks.
- Signature and secret headers that are not ASCII (X-Twilio-Signature, X-Vapi-Secret,
  Authorization, X-Vapi-Signature, X-Signature, X-Timestamp), and Host / X-Forwarded-Host values
  that are not a host: a 403 with its reason logged, never the secret or the expected signature;
  on the media socket's upgrade, a refusal (1008 before accept: HTTP 403), counted.
- A body that never completes: a 408 after TWIVAPI_BODY_TIMEOUT, and the connection closed.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time

import httpx
import pytest

from twivapi_cli import signing
from twivapi_cli.store.memory import MemoryStore

from .polling import wait_for
from .support import PUBLIC, TOKEN, VAPI_SECRET, bridge_settings, new_call_sid, running_bridge

BODY_TIMEOUT = 1.0     # TWIVAPI_BODY_TIMEOUT for this module's bridge: the slow-client tests take ~1 s
TWILIO_ROUTES = ["/twilio/voice", "/twilio/status", "/twilio/after-stream"]
NON_ASCII = ["Ã©".encode("latin-1"), b"\xff\xfe\xfd", "caf\xe9".encode("latin-1"), b"\x80", b"sig\xa0=",
             "é".encode()]   # latin-1 bytes, and UTF-8 bytes (read as latin-1 by the server)


class Crashes(logging.Handler):
    """Every exception that escaped a route: the app's catch-all ("unexpected error on ...", its
    500) and uvicorn's ("Exception in ASGI application", e.g. a WebSocket handshake). A 500 from
    the catch-all never reaches the response counters (Starlette answers it outside the middleware)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture(scope="module")
def bridge(sims):
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(),
                               TWIVAPI_BODY_TIMEOUT=str(BODY_TIMEOUT),
                               TWIVAPI_MEDIA_SIGNATURE="required")   # a bad upgrade signature is refused, not logged
    with running_bridge(settings, MemoryStore()) as b:
        yield b
        five_xx = {key: n for key, n in b.deps.http_counts.items() if key[1] >= 500}
        assert not five_xx, f"5xx answered to bad input: {five_xx}"


@pytest.fixture(scope="module")
def crashes(bridge):
    # attached once the bridge runs: uvicorn's Config (re)configures its loggers' handlers
    handler = Crashes()
    loggers = [logging.getLogger("twivapi.bridge"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def no_crash(crashes):
    """Each test: nothing escaped a route while it ran (so no 500, whatever the client saw)."""
    before = len(crashes.seen)
    yield
    time.sleep(0.02)   # a handler still finishing on the bridge's thread
    assert crashes.seen[before:] == [], crashes.seen[before:]


# --- a raw HTTP/1.1 client -------------------------------------------------------------------------

class Reply:
    def __init__(self, raw: bytes):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        self.headers = {k.strip().lower().decode("latin-1"): v.strip().decode("latin-1")
                        for k, _, v in (line.partition(b":") for line in lines[1:])}

    def json(self):
        return json.loads(self.body)

    def error(self) -> dict:
        """The one error shape, checked: {"error": {"code", "message"}}."""
        error = self.json()["error"]
        assert set(error) == {"code", "message"} and error["code"] and error["message"], error
        return error


def request_bytes(method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b"", *,
                  host: bytes = b"127.0.0.1", length: int | None = None, close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host,
             b"Content-Length: %d" % (len(body) if length is None else length)]
    if close:
        lines.append(b"Connection: close")
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def read_to_close(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (a failure if it never does)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open past {timeout} s; got {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def raw(bridge, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b"", *,
        host: bytes = b"127.0.0.1") -> Reply:
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=10) as sock:
        sock.sendall(request_bytes(method, target, headers, body, host=host) + body)
        return Reply(read_to_close(sock, 10))


def vapi_post(bridge, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    auth = [(b"X-Vapi-Secret", VAPI_SECRET.encode())] if headers is None else headers
    return raw(bridge, "POST", "/vapi/webhook", [(b"Content-Type", b"application/json"), *auth], body)


def form_for(route: str) -> dict[str, str]:
    params = {"CallSid": new_call_sid(), "From": "+15551112222", "To": "+15553334444"}
    return {**params, "CallStatus": "completed"} if route == "/twilio/status" else params


def encoded(params: dict[str, str]) -> bytes:
    return str(httpx.QueryParams(params)).encode()


# --- 1. JSON: too deep, out of range, not an object ------------------------------------------------

def nested(depth: int, core: str = "0", opener: str = "[", closer: str = "]") -> str:
    return opener * depth + core + closer * depth


DEEP = {
    "brackets-5000": "[" * 5000 + "]" * 5000,            # the fuzz run's body
    "brackets-200000": nested(200_000),                  # ~400 KB, inside the 1 MiB bound
    "brackets-990": nested(990),                         # just under json's own recursion limit
    "objects-3000": nested(3000, "1", '{"a":', "}"),
    "unclosed-5000": "[" * 5000,
    "in-a-message": '{"message": {"type": "transcript", "transcript": ' + nested(3000) + "}}",
    "in-the-call": '{"message": {"type": "status-update", "status": "ringing", "call": {"id": "c", "x": '
                   + nested(950, "{}", '{"k":', "}") + "}}}",
    "tool-arguments-800": '{"message": {"type": "tool-calls", "toolCallList": [{"id": "t1", "function": '
                          '{"name": "echo", "arguments": ' + nested(800, "{}", '{"a":', "}") + "}}]}}",
    "past-the-bound": '{"message": {"type": "transcript", "x": ' + nested(200) + "}}",
}


@pytest.mark.parametrize("name", list(DEEP))
def test_json_nested_too_deep_is_a_400_on_the_vapi_webhook(bridge, name):
    reply = vapi_post(bridge, DEEP[name].encode())
    assert reply.status == 400, (reply.status, reply.body[:200])
    assert reply.error()["code"] in ("json_too_deep", "malformed_json")


OUT_OF_RANGE = {
    "float-overflow": '{"message": {"type": "transcript", "turn": 1e999}}',
    "nan": '{"message": {"type": "transcript", "turn": NaN}}',
    "infinity": '{"message": {"type": "transcript", "turn": -Infinity}}',
    "int-5000-digits": '{"message": {"type": "transcript", "turn": ' + "9" * 5000 + "}}",
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
def test_json_numbers_out_of_range_are_a_400(bridge, name):
    reply = vapi_post(bridge, OUT_OF_RANGE[name].encode())
    assert reply.status == 400, (reply.status, reply.body[:200])
    assert reply.error()["code"] in ("json_out_of_range", "malformed_json")


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b'"message"', b"1", b"null", b"true", b"  []  "])
def test_json_that_is_not_an_object_is_a_400(bridge, body):
    reply = vapi_post(bridge, body)
    assert reply.status == 400 and reply.error()["code"] == "invalid_envelope"


def test_shallow_nesting_is_still_accepted(bridge):
    body = '{"message": {"type": "transcript", "transcript": "hi", "x": ' + nested(30, '{"y": [1.5, "z"]}') + "}}"
    assert vapi_post(bridge, body.encode()).status == 200


@pytest.mark.parametrize("arguments", ["[" * 5000 + "]" * 5000, nested(900, "{}", '{"a":', "}")])
def test_tool_arguments_sent_as_a_deeply_nested_json_string_are_answered(bridge, arguments):
    message = {"message": {"type": "tool-calls", "toolCallList": [
        {"id": "t1", "function": {"name": "echo", "arguments": arguments}}]}}
    reply = vapi_post(bridge, json.dumps(message).encode())
    assert reply.status == 200, (reply.status, reply.body[:200])
    assert reply.json()["results"][0]["toolCallId"] == "t1"


@pytest.mark.parametrize("route", TWILIO_ROUTES)
@pytest.mark.parametrize("body", [DEEP["brackets-5000"], '{"CallSid": ' + nested(3000) + "}", "[]",
                                  '{"CallSid": 1e999}'])
def test_deep_or_non_object_json_on_a_correctly_signed_twilio_webhook_is_a_400(bridge, route, body):
    url, signature = signing.sign_twilio_json(TOKEN, PUBLIC + route, body.encode())
    target = url.removeprefix(PUBLIC)
    reply = raw(bridge, "POST", target, [(b"Content-Type", b"application/json"),
                                         (b"X-Twilio-Signature", signature.encode())], body.encode())
    assert reply.status == 400, (reply.status, reply.body[:200])
    reply.error()


# --- 2. header values that are not ASCII -----------------------------------------------------------

@pytest.mark.parametrize("route", TWILIO_ROUTES)
@pytest.mark.parametrize("value", NON_ASCII)
def test_a_non_ascii_twilio_signature_is_a_403_with_its_reason_logged(bridge, route, value, caplog):
    params = form_for(route)
    good = signing.twilio_signature(TOKEN, PUBLIC + route, params)
    with caplog.at_level(logging.WARNING, "twivapi.bridge"):
        reply = raw(bridge, "POST", route, [(b"Content-Type", b"application/x-www-form-urlencoded"),
                                            (b"X-Twilio-Signature", value)], encoded(params))
    assert reply.status == 403 and reply.error()["code"] == "bad_signature"
    lines = [r.getMessage() for r in caplog.records if r.name == "twivapi.bridge" and r.getMessage().startswith("403")]
    assert any(route in line and "not ASCII" in line for line in lines), lines
    assert good not in caplog.text and TOKEN not in caplog.text


def test_a_valid_signature_with_a_non_ascii_byte_appended_is_refused(bridge):
    params = form_for("/twilio/voice")
    good = signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params).encode()
    reply = raw(bridge, "POST", "/twilio/voice", [(b"Content-Type", b"application/x-www-form-urlencoded"),
                                                  (b"X-Twilio-Signature", good + b"\xe9")], encoded(params))
    assert reply.status == 403 and reply.error()["code"] == "bad_signature"


def _fresh_ts() -> bytes:
    return str(int(time.time() * 1000)).encode()


VAPI_HEADERS = {
    "x-vapi-secret": lambda v: [(b"X-Vapi-Secret", v)],
    "x-vapi-secret-plus": lambda v: [(b"X-Vapi-Secret", VAPI_SECRET.encode() + v)],
    "authorization": lambda v: [(b"Authorization", b"Bearer " + v)],
    "authorization-raw": lambda v: [(b"Authorization", v)],
    "x-vapi-signature": lambda v: [(b"X-Vapi-Signature", v)],
    "x-vapi-signature-sha256": lambda v: [(b"X-Vapi-Signature", b"sha256=" + v)],
    "x-signature": lambda v: [(b"X-Signature", v), (b"X-Timestamp", _fresh_ts())],
    "x-timestamp": lambda v: [(b"X-Signature", b"ab" * 32), (b"X-Timestamp", _fresh_ts() + v)],
    "x-timestamp-only": lambda v: [(b"X-Signature", b"ab" * 32), (b"X-Timestamp", v)],
}


@pytest.mark.parametrize("header", list(VAPI_HEADERS))
@pytest.mark.parametrize("value", NON_ASCII[:3])
def test_non_ascii_vapi_credentials_are_a_403_with_their_reason_logged(bridge, header, value, caplog):
    body = json.dumps({"message": {"type": "transcript", "transcript": "hi"}}).encode()
    with caplog.at_level(logging.WARNING, "twivapi.bridge"):
        reply = vapi_post(bridge, body, VAPI_HEADERS[header](value))
    assert reply.status == 403 and reply.error()["code"] == "bad_signature"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("403 /vapi/webhook")]
    assert lines, "the refusal was not logged with its reason"
    expected_hmac = signing.vapi_hmac(VAPI_SECRET, body, None)
    assert VAPI_SECRET not in caplog.text and expected_hmac not in caplog.text


def test_a_non_ascii_secret_sent_as_utf8_bytes_is_accepted():
    # Vapi sends the secret's UTF-8 bytes; Starlette hands the header over latin-1-decoded
    from starlette.datastructures import Headers
    secret = "sécret-wébhook-ключ"
    body = b'{"message": {"type": "hang"}}'
    assert signing.verify_vapi(secret, Headers(raw=[(b"x-vapi-secret", secret.encode())]), body) == (True, "x-vapi-secret")
    bearer = Headers(raw=[(b"authorization", b"Bearer " + secret.encode())])
    assert signing.verify_vapi(secret, bearer, body) == (True, "bearer")
    assert not signing.verify_vapi(secret, Headers(raw=[(b"x-vapi-secret", secret.encode("utf-16"))]), body)[0]
    # a str that never came off the wire (above U+00FF) is compared too, never raises
    assert signing.verify_vapi(secret, {"x-vapi-secret": secret}, body)[0]
    assert not signing.verify_vapi(secret, {"x-vapi-signature": "ключ"}, body)[0]
    assert not signing.verify_twilio(TOKEN, PUBLIC + "/twilio/voice", {}, "ключ\udc80")


@pytest.mark.parametrize("route", TWILIO_ROUTES)
@pytest.mark.parametrize("where", ["host", "x-forwarded-host"])
@pytest.mark.parametrize("value", [b"[", b"x]", b"[::1", b"a:b", b"a:99999", b"h:-1", "é:é".encode("latin-1"),
                                   b"", b"a b", b"\xff"])
def test_a_host_that_is_not_a_host_never_breaks_the_signature_check(bridge, route, where, value):
    params = form_for(route)
    headers = [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"X-Twilio-Signature", b"bad")]
    if where == "host":
        reply = raw(bridge, "POST", route, headers, encoded(params), host=value)
    else:
        reply = raw(bridge, "POST", route, [*headers, (b"X-Forwarded-Host", value),
                                            (b"X-Forwarded-Proto", "é[".encode("latin-1"))], encoded(params))
    assert reply.status in (400, 403), (reply.status, reply.body[:200])
    if reply.headers.get("content-type", "").startswith("application/json"):
        reply.error()   # else uvicorn's own 400 for a request line or Host it could not parse


@pytest.mark.parametrize("host", [b"127.0.0.1", b"[", b"a:b"])
def test_a_correctly_signed_webhook_still_passes_whatever_the_host_header(bridge, host):
    params = form_for("/twilio/voice")
    signature = signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params).encode()
    reply = raw(bridge, "POST", "/twilio/voice", [(b"Content-Type", b"application/x-www-form-urlencoded"),
                                                  (b"X-Twilio-Signature", signature)], encoded(params), host=host)
    assert reply.status == 200 and b"<Response>" in reply.body


def _upgrade(bridge, signature: bytes | None, host: bytes = b"127.0.0.1") -> Reply:
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
               (b"Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef")), (b"Sec-WebSocket-Version", b"13")]
    if signature is not None:
        headers.append((b"X-Twilio-Signature", signature))
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=10) as sock:
        lines = [b"GET /twilio/media HTTP/1.1", b"Host: " + host, *(k + b": " + v for k, v in headers)]
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        return Reply(read_to_close(sock, 10))


@pytest.mark.parametrize("value", NON_ASCII)
def test_a_non_ascii_signature_on_the_media_upgrade_is_refused_and_counted(bridge, value):
    before = bridge.deps.recorder.counters.get("media.handshake_refused", 0)
    reply = _upgrade(bridge, value)
    assert reply.status == 403, (reply.status, reply.body[:200])   # closed with 1008 before accept
    wait_for(lambda: bridge.deps.recorder.counters.get("media.handshake_refused", 0) == before + 1,
             "the refused handshake counted")


@pytest.mark.parametrize("host", [b"[", b"a:b", b"x:99999"])
def test_a_host_that_is_not_a_host_on_the_media_upgrade_is_refused_cleanly(bridge, host):
    reply = _upgrade(bridge, b"bad", host=host)
    assert reply.status in (400, 403), (reply.status, reply.body[:200])


# --- 3. a body that never completes ----------------------------------------------------------------

@pytest.mark.parametrize("route", ["/vapi/webhook", "/twilio/voice"])
def test_a_stalled_body_is_a_408_after_the_body_timeout_and_the_connection_is_closed(bridge, route):
    body = encoded(form_for(route)) if route != "/vapi/webhook" else b'{"message": {"type": "transcript"}}'
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=10) as sock:
        # keep-alive (no Connection: close): the server must close it by itself
        sock.sendall(request_bytes("POST", route, [(b"Content-Type", b"application/json"),
                                                   (b"X-Vapi-Secret", VAPI_SECRET.encode())],
                                   length=len(body) + 100, close=False) + body[:10])
        started = time.monotonic()
        data = read_to_close(sock, BODY_TIMEOUT + 5)
        elapsed = time.monotonic() - started
    reply = Reply(data)
    assert reply.status == 408, data[:300]
    assert reply.error()["code"] == "body_timeout"
    assert reply.headers.get("connection") == "close"
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + 2, elapsed


def test_a_slow_body_that_completes_in_time_is_served(bridge):
    body = json.dumps({"message": {"type": "transcript", "transcript": "slow"}}).encode()
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=10) as sock:
        sock.sendall(request_bytes("POST", "/vapi/webhook", [(b"Content-Type", b"application/json"),
                                                             (b"X-Vapi-Secret", VAPI_SECRET.encode())], body))
        for i in range(0, len(body), 10):   # ten bytes every 50 ms: well inside the timeout
            sock.sendall(body[i:i + 10])
            time.sleep(0.05)
        reply = Reply(read_to_close(sock, 10))
    assert reply.status == 200 and reply.json() == {}


@pytest.mark.parametrize("route", ["/vapi/webhook", "/twilio/status"])
def test_a_client_that_hangs_up_mid_body_is_no_500(bridge, route):
    before = sum(n for (path, _), n in bridge.deps.http_counts.items() if path == route)
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=10) as sock:
        sock.sendall(request_bytes("POST", route, [(b"X-Vapi-Secret", VAPI_SECRET.encode())],
                                   length=500, close=False) + b'{"mess')
        time.sleep(0.1)
    # the handler saw the disconnect and answered (to nobody) in the one error shape, not a crash
    wait_for(lambda: sum(n for (path, _), n in bridge.deps.http_counts.items() if path == route) == before + 1,
             "the abandoned request answered")


def test_the_bridge_still_serves_a_call_after_the_bad_input(bridge):
    sid = new_call_sid()
    assert bridge.voice(sid).status_code == 200
    wait_for(lambda: bridge.session(sid) is not None, "the session")
    assert bridge.vapi({"type": "transcript", "transcript": "hi", "call": {"phoneCallProviderId": sid}}).status_code == 200
