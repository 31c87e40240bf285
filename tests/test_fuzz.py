"""Bad input, generated: every HTTP route gets thousands of random and mutated requests.

The outcome asserted for each: never a 5xx, never a hang, every rejection a 4xx in the one JSON
error shape, and the bridge keeps serving a real call afterwards.
"""

from __future__ import annotations

import json
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
SLOW_EXAMPLES = 1_000   # and in the slow part (./scripts/test-slow), as <name>_many


@pytest.fixture(scope="module")
def bridge():
    with running_sims() as sims:
        settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant())
        with running_bridge(settings, MemoryStore()) as b:
            b.client = httpx.Client(base_url=b.url, timeout=5)
            yield b
            b.client.close()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:200])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message"} and error["message"]


text = st.text(max_size=40)
# header values: what HTTP can carry (invalid bytes never reach the app: uvicorn answers 400 itself)
header_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40)
form_values = st.dictionaries(st.sampled_from(["CallSid", "CallStatus", "From", "To", "SequenceNumber",
                                                "Digits", "x", ""]) | text, text, max_size=8)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(text, children, max_size=4), max_leaves=12)


def fuzzed(**strategies):
    """The property at EXAMPLES cases, and a slow-marked copy ``<name>_many`` at SLOW_EXAMPLES."""
    def both(body):
        options = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        globals()[body.__name__ + "_many"] = pytest.mark.slow(
            settings(max_examples=SLOW_EXAMPLES, **options)(given(**strategies)(body)))
        return settings(max_examples=EXAMPLES, **options)(given(**strategies)(body))
    return both


@fuzzed(route=st.sampled_from(ROUTES), body=st.binary(max_size=600),
       content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain", "",
                                     "multipart/form-data; boundary=x"]),
       signature=st.none() | header_text)
def test_random_bytes_never_5xx(bridge, route, body, content_type, signature):
    headers = {"content-type": content_type}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    check(bridge.client.post(route, content=body, headers=headers))


@fuzzed(route=st.sampled_from(ROUTES[:3]), params=form_values)
def test_correctly_signed_random_forms_never_5xx(bridge, route, params):
    sig = signing.twilio_signature(TOKEN, PUBLIC + route, params)
    check(bridge.client.post(route, data=params, headers={"X-Twilio-Signature": sig}))


@fuzzed(payload=json_values | st.fixed_dictionaries({"message": json_values}) |
       st.fixed_dictionaries({"message": st.fixed_dictionaries(
           {"type": st.sampled_from(["status-update", "speech-update", "tool-calls", "end-of-call-report",
                                     "assistant-request", "user-interrupted", "transcript"])},
           optional={"call": json_values, "status": json_values, "toolCallList": json_values,
                     "role": json_values, "artifact": json_values})}))
def test_authenticated_random_vapi_messages_never_5xx(bridge, payload):
    body = json.dumps(payload).encode()
    check(bridge.client.post("/vapi/webhook", content=body, headers=signing.sign_vapi(VAPI_SECRET, body)))


@fuzzed(body=st.binary(min_size=1, max_size=300))
def test_invalid_utf8_and_json_from_an_authenticated_sender(bridge, body):
    check(bridge.client.post("/vapi/webhook", content=body, headers=signing.sign_vapi(VAPI_SECRET, body)))


@fuzzed(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(ROUTES + ["/health", "/twilio/media", "/", "/admin", "/events", "/metrics"])
       | st.text(alphabet="abcdefghijklmnopqrstuvwxyz/%.-_~0123456789", max_size=30).map(lambda p: "/" + p),
       headers=st.dictionaries(st.sampled_from(["content-type", "x-twilio-signature", "x-vapi-secret",
                                                "authorization", "x-vapi-signature", "i-twilio-idempotency-token",
                                                "content-encoding", "x-forwarded-proto", "x-forwarded-host"]),
                               header_text, max_size=5),
       body=st.binary(max_size=200))
def test_any_method_path_and_headers_never_5xx(bridge, method, path, headers, body):
    response = bridge.client.request(method, path, headers=headers, content=body if method != "GET" else None)
    assert response.status_code < 500 or (path == "/health" and response.status_code == 503 and
                                          response.json()["store"]["ok"] is False), response.text[:200]
    if response.status_code >= 400 and method != "HEAD" and response.content:
        check(response)


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
