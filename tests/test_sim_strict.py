"""The Vapi simulator as strict as Vapi: it posts only the types an assistant's ``serverMessages``
lists, authenticates them only as the call's ``server`` says (its headers, its credential: nothing
else), asks an imported number's server for an assistant (``assistant-request``), numbers turns from
0, ends calls only with the spec's ``endedReason`` values, emits ``conversation-update``, and gives
``monitor.controlUrl`` as ``monitorPlan`` says."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from twivapi_cli import audio, signing
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.sim import vapi_assistant
from twivapi_cli.sim.vapi_transport import DEFAULT_SERVER_MESSAGES

from .support import TOKEN, VAPI_KEY, VAPI_SECRET
from .test_sim_vapi import conforms, spec_or_skip, vapi_spec

MULAW = {"format": "mulaw", "container": "raw", "sampleRate": 8000}
SCRIPT = {"greeting_ms": 300, "reply_ms": 200, "model_latency_ms": 20}


class Receiver:
    """A server URL that records every message with its headers and answers as told."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, dict, bytes]] = []   # (headers, message, raw body)
        self.answers: dict[str, dict] = {}
        self.server = start_in_thread(Starlette(routes=[Route("/hook", self.handle, methods=["POST"])]))
        self.url = self.server.url + "/hook"

    async def handle(self, request: Request) -> JSONResponse:
        body = await request.body()
        message = json.loads(body)["message"]
        self.got.append((dict(request.headers), message, body))
        return JSONResponse(self.answers.get(message["type"], {}))

    def types(self) -> list[str]:
        return [m["type"] for _, m, _ in self.got]

    def wait_for(self, kind: str, timeout: float = 5.0) -> tuple[dict, dict, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = [g for g in self.got if g[1]["type"] == kind]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {kind} arrived; got {self.types()}"
            time.sleep(0.02)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.stop()


def assistant(sims, server: dict | None, **extra) -> dict:
    body = {"name": "strict", "model": {"provider": "openai", "model": "gpt-4o"},
            "metadata": {"simulator": SCRIPT}, **extra}
    if server is not None:
        body["server"] = server
    reply = sims.vapi("POST", "/assistant", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()


def talk(sims, assistant_id: str, receiver: Receiver | None = None) -> dict:
    """A vapi.websocket call: the caller listens, says something, hangs up; returns the call record
    once its end-of-call-report reached ``receiver`` (if any)."""
    call = sims.vapi("POST", "/call", json={"assistantId": assistant_id,
                                            "transport": {"provider": "vapi.websocket", "audioFormat": MULAW}}).json()

    async def go():
        # (close_timeout: the simulator's server end is slow to finish a close the client starts)
        async with websockets.connect(call["transport"]["websocketCallUrl"], close_timeout=0.2) as ws:
            speech = audio.silence_mulaw(400) + audio.pcm16_to_ulaw(audio.tone(300, 300, 8000, 0.5)) \
                + audio.silence_mulaw(700)
            for i in range(0, len(speech), 160):
                await ws.send(speech[i:i + 160])
                await asyncio.sleep(0.02)
    asyncio.run(go())
    if receiver is not None:
        receiver.wait_for("end-of-call-report")
    return sims.state.vapi.calls[call["id"]].record


# --- which messages -----------------------------------------------------------------------------------

def test_only_the_assistant_s_server_messages_are_posted(sims, receiver):
    listed = assistant(sims, {"url": receiver.url}, serverMessages=["status-update", "end-of-call-report"])
    talk(sims, listed["id"], receiver)
    assert set(receiver.types()) == {"status-update", "end-of-call-report"}
    driver = sims.driver(next(c.id for c in sims.state.vapi.calls.values() if c.record["assistantId"] == listed["id"]))
    assert {"speech-update", "transcript", "conversation-update"} <= set(driver.post.skipped)


def test_without_server_messages_vapi_s_default_list_applies(sims, receiver):
    default = assistant(sims, {"url": receiver.url})
    talk(sims, default["id"], receiver)
    kinds = set(receiver.types())
    assert kinds <= set(DEFAULT_SERVER_MESSAGES)
    assert {"status-update", "speech-update", "conversation-update", "end-of-call-report"} <= kinds
    assert "transcript" not in kinds and "model-output" not in kinds       # opt-in: must be listed


def test_final_transcripts_only(sims, receiver):
    final = assistant(sims, {"url": receiver.url}, serverMessages=['transcript[transcriptType="final"]',
                                                                   "end-of-call-report"])
    talk(sims, final["id"], receiver)
    transcripts = [m for _, m, _ in receiver.got if m["type"] == "transcript"]
    assert transcripts and all(m["transcriptType"] == "final" for m in transcripts)


# --- how they are authenticated ----------------------------------------------------------------------

AUTH_HEADERS = ("x-vapi-secret", "x-vapi-signature", "authorization", "x-signature", "x-timestamp")


def test_a_server_without_headers_or_credential_gets_unsigned_messages(sims, receiver):
    """As from Vapi: the org's secret is never added, so a provision that forgot the header fails."""
    bare = assistant(sims, {"url": receiver.url}, serverMessages=["status-update", "end-of-call-report"])
    talk(sims, bare["id"], receiver)
    for headers, _, body in receiver.got:
        assert not set(AUTH_HEADERS) & set(headers), headers
        assert not signing.verify_vapi(VAPI_SECRET, headers, body)[0]


def test_the_server_s_headers_are_sent_as_they_are(sims, receiver):
    server = {"url": receiver.url, "headers": {"X-Vapi-Secret": VAPI_SECRET, "X-Tenant": "acme"}}
    talk(sims, assistant(sims, server, serverMessages=["end-of-call-report"])["id"], receiver)
    headers, _, body = receiver.wait_for("end-of-call-report")
    assert headers["x-vapi-secret"] == VAPI_SECRET and headers["x-tenant"] == "acme"
    assert signing.verify_vapi(VAPI_SECRET, headers, body) == (True, "x-vapi-secret")


def credential(sims, plan: dict) -> dict:
    reply = sims.vapi("POST", "/credential", json={"provider": "custom-credential", "name": "hook",
                                                   "authenticationPlan": plan})
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_a_bearer_credential_signs_as_its_plan_says(sims, receiver):
    plain = credential(sims, {"type": "bearer", "token": "legacy-token", "headerName": "X-Vapi-Secret",
                              "bearerPrefixEnabled": False})
    assert "token" not in plain["authenticationPlan"]                       # not viewable after creation
    talk(sims, assistant(sims, {"url": receiver.url, "credentialId": plain["id"]},
                         serverMessages=["end-of-call-report"])["id"], receiver)
    assert receiver.wait_for("end-of-call-report")[0]["x-vapi-secret"] == "legacy-token"
    receiver.got.clear()
    bearer = credential(sims, {"type": "bearer", "token": "bearer-token"})
    # an Authorization header in server.headers overrides the credential's ("anti-pattern")
    server = {"url": receiver.url, "credentialId": bearer["id"], "headers": {"Authorization": "Bearer override"}}
    talk(sims, assistant(sims, server, serverMessages=["end-of-call-report"])["id"], receiver)
    assert receiver.wait_for("end-of-call-report")[0]["authorization"] == "Bearer override"


def test_an_hmac_credential_signs_as_its_plan_says(sims, receiver):
    secret = base64.b64encode(b"hmac-key-bytes").decode()
    hmac = credential(sims, {"type": "hmac", "secretKey": secret, "algorithm": "sha512", "signatureEncoding": "base64",
                             "signatureHeader": "x-acme-signature", "includeTimestamp": False, "secretIsBase64": True})
    talk(sims, assistant(sims, {"url": receiver.url, "credentialId": hmac["id"]},
                         serverMessages=["end-of-call-report"])["id"], receiver)
    headers, _, body = receiver.wait_for("end-of-call-report")
    plan = signing.HmacPlan(algorithm="sha512", signature_encoding="base64", signature_header="x-acme-signature",
                            include_timestamp=False, secret_is_base64=True)
    assert signing.verify_vapi(secret, headers, body, plan=plan) == (True, "hmac")
    assert "x-timestamp" not in headers


def test_credentials_are_validated(sims):
    for plan in ({"type": "oauth2"}, {"type": "hmac", "secretKey": "k", "algorithm": "md5"}, {"type": "bearer"}):
        reply = sims.vapi("POST", "/credential", json={"provider": "custom-credential", "authenticationPlan": plan})
        assert reply.status_code == 400, plan


def test_the_phone_number_s_then_the_org_s_server_are_used(sims, receiver):
    """Without a server on the assistant: the number's server (an inbound call), else the org's."""
    bare = assistant(sims, None, serverMessages=["end-of-call-report"])
    sims.state.vapi.server = {"url": receiver.url, "headers": {"X-Vapi-Secret": "org-level"}}
    try:
        talk(sims, bare["id"], receiver)
    finally:
        sims.state.vapi.server = None
    assert receiver.wait_for("end-of-call-report")[0]["x-vapi-secret"] == "org-level"


# --- assistant-request -------------------------------------------------------------------------------

def import_number(sims, server: dict | None, **extra) -> dict:
    client = sims.running.twilio_client()
    offered = client.available_phone_numbers("US").local.list(area_code=628, limit=1)
    bought = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number)
    body = {"provider": "twilio", "number": bought.phone_number, "twilioAccountSid": sims.state.credentials.account_sid,
            "twilioAuthToken": TOKEN, "smsEnabled": False, **extra}
    if server is not None:
        body["server"] = server
    reply = sims.vapi("POST", "/phone-number", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()


def ring(sims, number: dict, call_sid: str) -> httpx.Response:
    url = f"{sims.url}/twilio/inbound_call"
    params = {"CallSid": call_sid, "From": "+15551112222", "To": number["number"], "CallStatus": "ringing",
              "Direction": "inbound", "AccountSid": sims.state.credentials.account_sid}
    signature = RequestValidator(TOKEN).compute_signature(url, params)
    return httpx.post(url, data=params, headers={"X-Twilio-Signature": signature})


def inbound_call(sims, call_sid: str):
    return next(c for c in sims.state.vapi.calls.values() if c.record.get("phoneCallProviderId") == call_sid)


def test_an_imported_number_without_an_assistant_asks_its_server(sims, receiver):
    wanted = assistant(sims, None)
    receiver.answers["assistant-request"] = {"assistantId": wanted["id"],
                                             "assistantOverrides": {"variableValues": {"name": "Ada"}}}
    number = import_number(sims, {"url": receiver.url, "headers": {"X-Vapi-Secret": VAPI_SECRET}})
    sid = "CA" + "1" * 32
    reply = ring(sims, number, sid)
    assert reply.status_code == 200 and ET.fromstring(reply.text).find("./Connect/Stream") is not None
    headers, message, _ = receiver.wait_for("assistant-request")
    assert headers["x-vapi-secret"] == VAPI_SECRET
    assert message["call"]["transport"] == {"provider": "twilio", "conversationType": "voice",
                                            "accountSid": sims.state.credentials.account_sid, "callSid": sid}
    assert message["phoneNumber"]["number"] == number["number"] and "twilioAuthToken" not in message["phoneNumber"]
    if vapi_spec():
        conforms({"message": message}, "ServerMessage")
        conforms(message, "ServerMessageAssistantRequest")
    call = inbound_call(sims, sid)
    assert call.assistant["id"] == wanted["id"] and call.assistant["variableValues"] == {"name": "Ada"}
    assert call.record["assistantId"] == wanted["id"] and call.server_url == receiver.url   # the number's server


@pytest.mark.parametrize("answer, reason, said", [
    ({"error": "Sorry, we are closed."}, "assistant-request-returned-error", "Sorry, we are closed."),
    ({}, "assistant-request-returned-no-assistant", None),
    ({"assistantId": "no-such-assistant"}, "assistant-request-returned-invalid-assistant", None),
])
def test_an_assistant_request_that_gives_no_assistant_ends_the_call(sims, receiver, answer, reason, said):
    receiver.answers["assistant-request"] = answer
    number = import_number(sims, {"url": receiver.url})
    sid = "CA" + reason.encode().hex()[-32:]
    reply = ring(sims, number, sid)
    root = ET.fromstring(reply.text)
    assert root.find("./Hangup") is not None and root.find("./Connect") is None
    if said:
        assert root.find("./Say").text == said
    record = inbound_call(sims, sid).record
    assert record["status"] == "ended" and record["endedReason"] == reason


def test_a_number_with_neither_assistant_nor_server(sims):
    number = import_number(sims, None)
    sid = "CA" + "3" * 32
    assert ET.fromstring(ring(sims, number, sid).text).find("./Hangup") is not None
    assert inbound_call(sims, sid).record["endedReason"] == "call-start-error-neither-assistant-nor-server-set"


# --- what the messages say ----------------------------------------------------------------------------

def test_turns_are_zero_based_and_conversation_updates_are_emitted(sims, receiver):
    talk(sims, assistant(sims, {"url": receiver.url}, serverMessages=["speech-update", "conversation-update",
                                                                       "end-of-call-report"])["id"], receiver)
    speech = [m for _, m, _ in receiver.got if m["type"] == "speech-update"]
    assert speech[0]["role"] == "assistant" and speech[0]["turn"] == 0        # the greeting is turn 0
    assert sorted({m["turn"] for m in speech if m["role"] == "assistant"}) == [0, 1]
    updates = [m for _, m, _ in receiver.got if m["type"] == "conversation-update"]
    assert updates, receiver.types()
    last = updates[-1]
    assert [line["role"] for line in last["messages"]] == ["bot", "user", "bot"]
    assert [m["role"] for m in last["messagesOpenAIFormatted"]] == ["assistant", "user", "assistant"]
    if vapi_spec():
        for update in updates:
            conforms(update, "ServerMessageConversationUpdate")


def test_every_ended_reason_the_simulator_reports_is_in_the_spec():
    spec = spec_or_skip()
    allowed = set(spec["components"]["schemas"]["Call"]["properties"]["endedReason"]["enum"])
    reasons = {vapi_assistant.CUSTOMER_ENDED, vapi_assistant.WORKER_DIED, vapi_assistant.MANUALLY_CANCELED,
               "assistant-request-failed", "assistant-request-returned-error", "assistant-request-returned-no-assistant",
               "assistant-request-returned-invalid-assistant", "call-start-error-neither-assistant-nor-server-set"}
    assert reasons <= allowed, reasons - allowed
    # and what the simulator's own source says, wherever it sets one
    import inspect
    import re

    from twivapi_cli.sim import vapi_rest, vapi_transport
    source = "".join(inspect.getsource(m) for m in (vapi_assistant, vapi_rest, vapi_transport))
    quoted = set(re.findall(r'(?:ended_reason|endedReason|refuse\(|set_status\("ended",)\s*[=,(]?\s*"([a-z0-9.\-]+)"',
                            source))
    assert quoted and quoted <= allowed, quoted - allowed


# --- monitorPlan ----------------------------------------------------------------------------------------

def test_monitor_plan_decides_the_control_url_and_its_authentication(sims):
    def call_of(plan: dict | None) -> dict:
        body = {"assistant": {"name": "m", **({"monitorPlan": plan} if plan is not None else {})},
                "transport": {"provider": "vapi.websocket"}}
        return sims.vapi("POST", "/call", json=body).json()
    assert "controlUrl" in call_of(None)["monitor"]                         # the default: enabled
    assert "controlUrl" not in call_of({"controlEnabled": False})["monitor"]
    guarded = call_of({"controlEnabled": True, "controlAuthenticationEnabled": True})
    url = guarded["monitor"]["controlUrl"]
    assert httpx.post(url, json={"type": "say", "content": "hi"}).status_code == 401
    assert httpx.post(url, json={"type": "say", "content": "hi"},
                      headers={"Authorization": f"Bearer {VAPI_KEY}"}).status_code == 401    # the private key is not it
    public = sims.state.credentials.vapi_public_key
    assert httpx.post(url, json={"type": "say", "content": "hi"},
                      headers={"Authorization": f"Bearer {public}"}).status_code == 200
    open_call = call_of({"controlEnabled": True})
    assert httpx.post(open_call["monitor"]["controlUrl"], json={"type": "say", "content": "hi"}).status_code == 200
