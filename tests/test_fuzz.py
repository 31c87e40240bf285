"""Bad input, generated: every HTTP route gets thousands of random and mutated requests.

Header values are drawn from any bytes a client can send (0x20-0xFF and tabs: latin-1, which the
server hands over as is), on every header we read a secret or a signature from, and Host; JSON bodies
are of any depth (from flat to hundreds of thousands of brackets); every route and method, the media
socket's upgrade included.

The outcome asserted for each: never a 5xx, never a hang, every rejection a 4xx in the one JSON
error shape, and the bridge keeps serving a real call afterwards.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twivapi_cli import signing
from twivapi_cli.models import CallState
from twivapi_cli.store.memory import MemoryStore

from .sims import running_sims
from .support import PUBLIC, TOKEN, VAPI_SECRET, bridge_settings, new_call_sid, running_bridge

ROUTES = ["/twilio/voice", "/twilio/status", "/twilio/after-stream", "/vapi/webhook"]
EXAMPLES = 120          # cases per property in the normal run
SLOW_EXAMPLES = 500     # and in the slow part (./scripts/test-slow), as <name>_many


@pytest.fixture(scope="module")
def bridge():
    with running_sims() as sims:
        # the media upgrade's signature required, so that a mis-signed upgrade is refused before it opens
        settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(), TWIVAPI_MEDIA_SIGNATURE="required")
        with running_bridge(settings, MemoryStore()) as b:
            b.client = httpx.Client(base_url=b.url, timeout=5)
            yield b
            b.client.close()


def refused_by_the_http_parser(response: httpx.Response) -> bool:
    """uvicorn's own 400 for bytes HTTP does not allow (DEL in a header value): the app never saw it."""
    return response.status_code == 400 and response.text == "Invalid HTTP request received."


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:200])
    if response.status_code >= 400 and not refused_by_the_http_parser(response):
        error = response.json()["error"]
        assert set(error) == {"code", "message"} and error["message"]


text = st.text(max_size=40)
# header values: any bytes a client can send, 0x20-0xFF and tabs (latin-1: the server hands them to the
# app as they came); a value's leading and trailing blanks are not part of it (HTTP strips them)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF) | st.just("\t"), max_size=40).map(
    lambda value: value.encode("latin-1").strip(b" \t"))
CREDENTIAL_HEADERS = ["X-Twilio-Signature", "X-Vapi-Secret", "Authorization", "X-Vapi-Signature", "X-Signature",
                      "X-Timestamp"]


def _now_ms() -> bytes:
    return str(int(time.time() * 1000)).encode()


# what a credential header carries: anything, or something close to valid with any byte around it
# (X-Signature is compared only under a fresh X-Timestamp)
credential_values = header_text | st.builds(lambda head, tail: (head + tail).strip(b" \t"), st.builds(_now_ms) | st.sampled_from(
    [VAPI_SECRET.encode(), b"Bearer " + VAPI_SECRET.encode(), b"sha256=", b"Bearer "]), header_text)
credentials = st.dictionaries(st.sampled_from(CREDENTIAL_HEADERS), credential_values, max_size=3)
form_values = st.dictionaries(st.sampled_from(["CallSid", "CallStatus", "From", "To", "SequenceNumber",
                                                "Digits", "x", ""]) | text, text, max_size=8)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(text, children, max_size=4), max_leaves=12)
# JSON of any depth, as text (json.dumps itself could not write the deepest): shallow, around json's own
# recursion limit (~1,000 levels) and far past it; arrays, objects, both, and never closed
NESTINGS = [("[", "]"), ('{"a":', "}"), ('[{"k":', "}]"), ("[", "")]
deep_json = st.builds(lambda depth, nesting, core: nesting[0] * depth + core + nesting[1] * depth,
                      st.integers(0, 80) | st.integers(900, 1_100) | st.integers(1_100, 100_000),
                      st.sampled_from(NESTINGS), st.sampled_from(["0", "{}", "[]", '"x"', "1e999", "null"]))
json_documents = json_values.map(json.dumps) | deep_json


def fuzzed(**strategies):
    """The property at EXAMPLES cases, and a slow-marked copy ``<name>_many`` at SLOW_EXAMPLES."""
    def both(body):
        options = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        globals()[body.__name__ + "_many"] = pytest.mark.slow(
            settings(max_examples=SLOW_EXAMPLES, **options)(given(**strategies)(body)))
        return settings(max_examples=EXAMPLES, **options)(given(**strategies)(body))
    return both


@fuzzed(route=st.sampled_from(ROUTES), body=st.binary(max_size=600) | deep_json.map(str.encode),
       content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain", "",
                                     "multipart/form-data; boundary=x"]),
       headers=credentials)
def test_random_bytes_never_5xx(bridge, route, body, content_type, headers):
    check(bridge.client.post(route, content=body, headers={"content-type": content_type, **headers}))


@fuzzed(route=st.sampled_from(ROUTES[:3]), params=form_values, document=st.none() | json_documents)
def test_correctly_signed_random_forms_never_5xx(bridge, route, params, document):
    if document is None:
        sig = signing.twilio_signature(TOKEN, PUBLIC + route, params)
        check(bridge.client.post(route, data=params, headers={"X-Twilio-Signature": sig}))
    else:   # a JSON body, signed through bodySHA256 in the URL
        url, sig = signing.sign_twilio_json(TOKEN, PUBLIC + route, document.encode())
        check(bridge.client.post(url.removeprefix(PUBLIC), content=document.encode(), headers={
            "X-Twilio-Signature": sig, "content-type": "application/json"}))


MESSAGE_TYPES = st.sampled_from(["status-update", "speech-update", "tool-calls", "end-of-call-report",
                                 "assistant-request", "user-interrupted", "transcript", "function-call"])
vapi_messages = (json_values | st.fixed_dictionaries({"message": json_values}) |
                 st.fixed_dictionaries({"message": st.fixed_dictionaries(
                     {"type": MESSAGE_TYPES},
                     optional={"call": json_values, "status": json_values, "toolCallList": json_values,
                               "role": json_values, "artifact": json_values})})).map(json.dumps)
# a message carrying JSON of any depth: as a value, or as the JSON string Vapi may send tool arguments in
deep_messages = (st.builds(lambda kind, field, value: f'{{"message": {{"type": "{kind}", "{field}": {value}}}}}',
                           MESSAGE_TYPES, st.sampled_from(["call", "toolCallList", "artifact", "functionCall", "x"]),
                           deep_json)
                 | st.builds(lambda args: json.dumps({"message": {"type": "tool-calls", "toolCallList": [
                     {"id": "t", "function": {"name": "echo", "arguments": args}}]}}), deep_json)
                 | deep_json)


@fuzzed(body=vapi_messages | deep_messages, mode=st.sampled_from(["secret", "bearer", "hmac"]))
def test_authenticated_random_vapi_messages_never_5xx(bridge, body, mode):
    body = body.encode()
    check(bridge.client.post("/vapi/webhook", content=body, headers=signing.sign_vapi(VAPI_SECRET, body, mode)))


@fuzzed(body=st.binary(min_size=1, max_size=300))
def test_invalid_utf8_and_json_from_an_authenticated_sender(bridge, body):
    check(bridge.client.post("/vapi/webhook", content=body, headers=signing.sign_vapi(VAPI_SECRET, body)))


@fuzzed(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(ROUTES + ["/health", "/twilio/media", "/", "/admin", "/events", "/metrics"])
       | st.text(alphabet="abcdefghijklmnopqrstuvwxyz/%.-_~0123456789", max_size=30).map(lambda p: "/" + p),
       headers=st.dictionaries(st.sampled_from(["content-type", "x-twilio-signature", "x-vapi-secret",
                                                "authorization", "x-vapi-signature", "x-signature", "x-timestamp",
                                                "i-twilio-idempotency-token", "content-encoding", "x-forwarded-proto",
                                                "x-forwarded-host", "host"]),
                               header_text, max_size=5),
       body=st.binary(max_size=200) | deep_json.map(str.encode))
def test_any_method_path_and_headers_never_5xx(bridge, method, path, headers, body):
    response = bridge.client.request(method, path, headers=headers, content=body if method != "GET" else None)
    assert response.status_code < 500 or (path == "/health" and response.status_code == 503 and
                                          response.json()["store"]["ok"] is False), response.text[:200]
    if response.status_code >= 400 and method != "HEAD" and response.content:
        check(response)


def _upgrade(bridge, headers: dict[str, bytes], host: bytes | None) -> int:
    """A WebSocket upgrade of /twilio/media over a raw socket (any header bytes): the status answered."""
    lines = [b"GET /twilio/media HTTP/1.1", b"Host: " + (b"127.0.0.1" if host is None else host),
             b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
             b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef")]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", bridge.server.port), timeout=5) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the upgrade without an answer"
            head += chunk
    return int(head.split(b"\r\n")[0].split()[1])


@fuzzed(headers=st.dictionaries(st.sampled_from(["X-Twilio-Signature", "X-Forwarded-Host", "X-Forwarded-Proto"]),
                                header_text, max_size=3), host=st.none() | header_text)
def test_media_upgrade_with_any_header_bytes_is_refused_cleanly(bridge, headers, host):
    # unsigned or mis-signed: refused before the socket opens (closed 1008: HTTP 403), or a 400 from the
    # server for a request it could not parse; never a 5xx
    assert _upgrade(bridge, headers, host) in (400, 403)


def _signed_voice_body() -> tuple[bytes, str]:
    params = {"CallSid": "CA" + "0" * 32, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
    body = httpx.QueryParams(params).__str__().encode()
    return body, signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params)


@fuzzed(data=st.data())
def test_mutated_signed_webhooks_are_refused_cleanly(bridge, data):
    body, signature = _signed_voice_body()
    position = data.draw(st.integers(0, len(body) - 1))
    action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    if action == "flip":
        mutated = body[:position] + bytes([body[position] ^ data.draw(st.integers(1, 255))]) + body[position + 1:]
    elif action == "insert":
        mutated = body[:position] + data.draw(st.binary(min_size=1, max_size=4)) + body[position:]
    elif action == "delete":
        mutated = body[:position] + body[position + 1:]
    else:
        mutated = body[:position]
    response = bridge.client.post("/twilio/voice", content=mutated, headers={
        "X-Twilio-Signature": signature, "content-type": "application/x-www-form-urlencoded"})
    check(response)
    if response.status_code == 200:
        # accepted only if the mutation is signed by the same signature: Twilio's scheme concatenates
        # key+value, so "From=+1555" -> "From+1555=" signs alike (an ambiguity of the scheme itself)
        params = dict(httpx.QueryParams(mutated.decode("utf-8", "replace")).multi_items())
        assert signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params) == signature


def test_huge_and_empty_bodies(bridge):
    for route in ROUTES:
        check(bridge.client.post(route, content=b""))
        check(bridge.client.post(route, content=b"x" * (2 * 1024 * 1024)))


def test_bridge_still_serves_calls_after_the_fuzzing(bridge):
    sid = new_call_sid()
    assert bridge.voice(sid).status_code == 200
    deadline = time.monotonic() + 5
    while bridge.session(sid).state != CallState.READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bridge.session(sid).state == CallState.READY


@pytest.mark.slow
def test_bridge_still_serves_calls_after_the_long_fuzzing(bridge):
    test_bridge_still_serves_calls_after_the_fuzzing(bridge)
