"""POST /vapi/webhook: authentication, replies, in-order processing per call, the parking race."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from twivapi_cli.models import CallState
from twivapi_cli.store.memory import MemoryStore

from . import test_bridge_webhooks
from .support import bridge_settings, new_call_sid, running_bridge
from .test_bridge_webhooks import settings_for, wait_for

# the webhook tests' fixtures, shared: pytest finds a fixture by a module-level name
sims = test_bridge_webhooks.sims
vapi = test_bridge_webhooks.vapi


@pytest.fixture
def bridge(vapi):
    with running_bridge(settings_for(vapi), MemoryStore()) as b:
        yield b


def ready_call(bridge) -> tuple[str, str]:
    sid = new_call_sid()
    bridge.voice(sid)
    session = wait_for(lambda: (s := bridge.session(sid)) and s.vapi_call_id and s)
    return sid, session.vapi_call_id


@pytest.mark.parametrize("mode", ["secret", "signature", "bearer", "hmac", "hmac-body"])
def test_each_vapi_credential_kind_is_accepted(bridge, mode):
    """signature: the plain token in X-Vapi-Signature, as legacy setups send it."""
    response = bridge.vapi({"type": "hang", "call": {"id": "x"}}, mode=mode)
    assert response.status_code == 200 and response.json() == {}


def test_the_hmac_credential_is_checked_as_the_settings_configure_it(vapi):
    """An HMACAuthenticationPlan other than the default (sha512, base64, its own header, no
    timestamp, a base64 secret) through the VAPI_HMAC_* settings."""
    import base64

    from twivapi_cli import signing

    from .support import in_process_bridge
    secret = base64.b64encode(b"sixteen-raw-bytes\x00\xff").decode()
    settings = settings_for(vapi, VAPI_WEBHOOK_SECRET=secret, VAPI_HMAC_ALGORITHM="sha512", VAPI_HMAC_ENCODING="base64",
                            VAPI_HMAC_SIGNATURE_HEADER="X-Acme-Signature", VAPI_HMAC_INCLUDE_TIMESTAMP="0",
                            VAPI_HMAC_SECRET_IS_BASE64="1")
    plan = signing.HmacPlan(algorithm="sha512", signature_encoding="base64", signature_header="x-acme-signature",
                            include_timestamp=False, secret_is_base64=True)
    body = json.dumps({"message": {"type": "hang", "call": {"id": "x"}}}).encode()
    with in_process_bridge(settings, MemoryStore()) as b:
        def post(headers):
            return b.http.post(b.url + "/vapi/webhook", content=body, headers={"content-type": "application/json",
                                                                              **headers}).status_code
        assert post(signing.sign_vapi(secret, body, "hmac", plan=plan)) == 200
        assert post(signing.sign_vapi(secret, body, "hmac")) == 403            # the default plan's headers
        wrong = signing.HmacPlan(**{**plan.__dict__, "algorithm": "sha256"})
        assert post(signing.sign_vapi(secret, body, "hmac", plan=wrong)) == 403
        assert post({"X-Vapi-Secret": secret}) == 200                          # the plain token still works


@pytest.mark.parametrize("mode", ["secret", "signature", "bearer", "hmac", "none"])
def test_wrong_or_missing_vapi_credential_is_403(bridge, mode):
    response = bridge.vapi({"type": "hang"}, mode=mode, secret="not-the-secret")
    assert response.status_code == 403


def test_stale_hmac_timestamp_is_refused(bridge):
    from twivapi_cli import signing
    body = json.dumps({"message": {"type": "hang"}}).encode()
    headers = signing.sign_vapi("test-vapi-webhook-secret", body, "hmac", timestamp=time.time() - 3600)
    assert httpx.post(bridge.url + "/vapi/webhook", content=body, headers=headers).status_code == 403


@pytest.mark.parametrize("body, code", [
    (b"{not json", "malformed_json"),
    (b'{"type": "status-update"}', "invalid_envelope"),
    (b'{"message": {"type": "hang", "call": "CA1"}}', "invalid_field"),
    (b"[1, 2]", "invalid_envelope"),
])
def test_malformed_vapi_messages_are_400(bridge, body, code):
    from twivapi_cli import signing
    response = httpx.post(bridge.url + "/vapi/webhook", content=body,
                          headers=signing.sign_vapi("test-vapi-webhook-secret", body))
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_an_unknown_message_type_is_answered_200_counted_and_logged_once(bridge, caplog):
    """Vapi adds message types over time: a 400 would be logged by Vapi as an error and retried."""
    kind = f"assistant.thinking-{uuid.uuid4().hex[:8]}"   # a type no bridge knows (yet)
    sid = new_call_sid()
    with caplog.at_level("INFO", logger="twivapi.bridge"):
        replies = [bridge.vapi({"type": kind, "call": {"id": "v1", "phoneCallProviderId": sid}}) for _ in range(3)]
        other = bridge.vapi({"type": kind + "-2", "call": {"id": "v1"}})
    assert [r.status_code for r in replies + [other]] == [200] * 4
    assert all(r.json() == {} for r in replies + [other])
    assert bridge.deps.recorder.counters["vapi.unknown_type"] == 4
    logged = [r.getMessage() for r in caplog.records if "new to this bridge" in r.getMessage()]
    assert len(logged) == 2 and kind in logged[0] and kind + "-2" in logged[1]   # once per type
    recorded = [e for e in bridge.events(sid) if e.type == "vapi.unknown-type"]
    assert len(recorded) == 3 and recorded[0].data["type"] == kind
    assert bridge.session(sid) is None and bridge.deps.drainer.stats()["parked_calls"] == 0   # nothing applied


REQUESTS = {   # request type -> (the message's own fields, the spec's response schema)
    "assistant-request": ({}, "ServerMessageResponseAssistantRequest"),
    "tool-calls": ({"toolCallList": [{"id": "t1", "type": "function", "function": {
        "name": "lookup_order", "arguments": '{"order_id": "A1"}'}}], "toolWithToolCallList": []},
        "ServerMessageResponseToolCalls"),
    "transfer-destination-request": ({}, "ServerMessageResponseTransferDestinationRequest"),
    "handoff-destination-request": ({"parameters": {}}, "ServerMessageResponseHandoffDestinationRequest"),
    "knowledge-base-request": ({"messages": [], "messagesOpenAIFormatted": []},
                               "ServerMessageResponseKnowledgeBaseRequest"),
    "call.endpointing.request": ({"messages": [], "messagesOpenAIFormatted": []},
                                 "ServerMessageResponseCallEndpointingRequest"),
    "campaign.predial": ({"campaignId": "c1", "contact": {"number": "+15551112222"}},
                         "ServerMessageResponseCampaignPredial"),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_request_types_are_answered_as_the_spec_s_response_schemas_say(bridge, kind):
    from .test_sim_vapi import conforms, spec_or_skip
    spec_or_skip()
    fields, schema = REQUESTS[kind]
    response = bridge.vapi({"type": kind, "call": {"id": "c1"}, **fields})
    assert response.status_code == 200
    conforms(response.json(), schema)
    if kind == "handoff-destination-request":
        assert response.json()["error"]          # no destination configured: the error says so
    if kind == "call.endpointing.request":
        assert 0 <= response.json()["timeoutSeconds"] <= 15


def test_endpointing_follows_the_assistant_s_wait_seconds(bridge):
    reply = bridge.vapi({"type": "call.endpointing.request", "messages": [], "messagesOpenAIFormatted": [],
                         "assistant": {"startSpeakingPlan": {"waitSeconds": 1.2}}, "call": {"id": "c1"}})
    assert reply.json() == {"timeoutSeconds": 1.2}


def test_assistant_request_answers_the_configured_assistant(bridge, vapi):
    response = bridge.vapi({"type": "assistant-request", "call": {"id": "c1", "phoneCallProviderId": new_call_sid()}})
    assert response.json() == {"assistantId": vapi.assistant_id}


def test_tool_calls_are_dispatched_with_error_for_unknown_tools(bridge):
    message = {"type": "tool-calls", "call": {"id": "c1"}, "toolCallList": [
        {"id": "t1", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "A1"}}},
        {"id": "t2", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "B2"}'}},
        {"id": "t3", "type": "function", "function": {"name": "launch_rocket", "arguments": {}}},
        {"id": "t4", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "ZZ"}}},
    ]}
    results = bridge.vapi(message).json()["results"]
    assert results[0] == {"toolCallId": "t1", "name": "lookup_order", "result": "order A1 is shipped"}
    assert results[1]["result"] == "order B2 is processing"
    assert results[2] == {"toolCallId": "t3", "name": "launch_rocket", "error": "unknown tool 'launch_rocket'"}
    assert "no order 'ZZ'" in results[3]["error"]


def test_status_update_ended_ends_the_session_once(bridge):
    sid, vapi_id = ready_call(bridge)
    for _ in range(2):
        bridge.vapi({"type": "status-update", "status": "ended", "endedReason": "customer-ended-call",
                     "call": {"id": vapi_id}})
    wait_for(lambda: bridge.session(sid).state == CallState.ENDED)
    assert bridge.session(sid).ended_reason == "customer-ended-call"
    states = [e.data["state"] for e in bridge.events(sid) if e.type == "state"]
    assert states.count("ended") == 1


def test_messages_for_one_call_are_processed_in_arrival_order(bridge):
    sid, vapi_id = ready_call(bridge)
    seen: list[str] = []

    async def listener(kind, data):
        seen.append(data["status"])
        await asyncio.sleep(0.01)  # slow processing must not reorder

    bridge.server.run(lambda: _listen(bridge, sid, listener))
    statuses = [f"s{i}" for i in range(30)]
    for status in statuses:
        bridge.vapi({"type": "speech-update", "role": "assistant", "status": status, "call": {"id": vapi_id}})
    wait_for(lambda: len(seen) == 30)
    assert seen == statuses


async def _listen(bridge, sid, listener):
    bridge.deps.signals.listen(sid, listener)


def test_message_before_session_exists_is_parked_then_applied(bridge):
    sid = new_call_sid()
    response = bridge.vapi({"type": "status-update", "status": "ended", "endedReason": "early",
                            "call": {"id": uuid.uuid4().hex, "phoneCallProviderId": sid}})
    assert response.status_code == 200
    assert bridge.session(sid) is None
    bridge.voice(sid)
    wait_for(lambda: (s := bridge.session(sid)) and s.state == CallState.ENDED)
    assert bridge.session(sid).ended_reason == "early"


def test_the_call_sid_is_read_from_the_twilio_transport_first():
    """call.transport.callSid (TwilioTransport: where Vapi puts it now), then the deprecated
    call.phoneCallProviderId, then our metadata."""
    from twivapi_cli.bridge.vapi_hooks import call_ids
    metadata = {"assistantOverrides": {"metadata": {"twilioCallSid": "CAmeta"}}}
    transport = {"provider": "twilio", "accountSid": "AC1", "callSid": "CAtransport"}
    assert call_ids({"call": {"id": "v1", "transport": transport, "phoneCallProviderId": "CAold", **metadata}}) \
        == ("CAtransport", "v1")
    assert call_ids({"call": {"id": "v1", "phoneCallProviderId": "CAold", **metadata}}) == ("CAold", "v1")
    assert call_ids({"call": {"id": "v1", **metadata}}) == ("CAmeta", "v1")
    # not a Twilio transport, or no usable value: the next source
    websocket = {"provider": "vapi.websocket", "callSid": "CAnot"}
    assert call_ids({"call": {"transport": websocket, "phoneCallProviderId": "CAold"}}) == ("CAold", None)
    assert call_ids({"call": {"transport": {"provider": "twilio", "callSid": ""}, **metadata}}) == ("CAmeta", None)
    assert call_ids({"call": {"transport": "twilio", "phoneCallProviderId": 7}}) == (None, None)


def test_a_message_naming_the_call_only_by_its_twilio_transport_reaches_the_session(bridge):
    sid = new_call_sid()
    response = bridge.vapi({"type": "status-update", "status": "ended", "endedReason": "customer-ended-call",
                            "call": {"id": uuid.uuid4().hex, "phoneCallProviderId": new_call_sid(),
                                     "transport": {"provider": "twilio", "callSid": sid}}})
    assert response.status_code == 200
    bridge.voice(sid)
    wait_for(lambda: (s := bridge.session(sid)) and s.state == CallState.ENDED)
    assert bridge.session(sid).ended_reason == "customer-ended-call"


def test_message_with_unknown_vapi_id_waits_for_the_call_to_be_linked(vapi):
    vapi.slow_calls(0.4)
    with running_bridge(settings_for(vapi), MemoryStore()) as b:
        sid = new_call_sid()
        b.voice(sid)
        # Vapi's first message can beat POST /call's answer; here it names the call by metadata only.
        b.vapi({"type": "status-update", "status": "in-progress",
                "call": {"id": "unknown-yet", "assistantOverrides": {"metadata": {"twilioCallSid": sid}}}})
        wait_for(lambda: b.session(sid).state == CallState.ACTIVE, timeout=5)


def test_interruption_on_the_webhook_reaches_the_media_listener(bridge):
    """user-interrupted interrupts; the caller's speech-update is only speech (Vapi decides what
    interrupts: a backchannel is a speech-update without user-interrupted)."""
    sid, vapi_id = ready_call(bridge)
    got: list[tuple[str, dict]] = []

    async def listener(kind, data):
        got.append((kind, data))

    bridge.server.run(lambda: _listen(bridge, sid, listener))
    bridge.vapi({"type": "user-interrupted", "turnId": "t1", "call": {"id": vapi_id}})
    bridge.vapi({"type": "speech-update", "role": "user", "status": "started", "turn": 0, "call": {"id": vapi_id}})
    wait_for(lambda: len(got) == 2)
    time.sleep(0.1)
    assert [k for k, _ in got] == ["interrupt", "speech"]
    assert got[1][1]["role"] == "user" and got[1][1]["status"] == "started"


def test_barge_in_on_speech_is_an_opt_in(vapi):
    """TWIVAPI_BARGE_IN=speech: the caller's speech-update started interrupts too, at once (before
    the call's queue), and is then applied as speech like any other."""
    with running_bridge(settings_for(vapi, TWIVAPI_BARGE_IN="speech"), MemoryStore()) as b:
        sid, vapi_id = ready_call(b)
        got: list[str] = []

        async def listener(kind, data):
            got.append(kind)

        b.server.run(lambda: _listen(b, sid, listener))
        b.vapi({"type": "speech-update", "role": "user", "status": "started", "turn": 0, "call": {"id": vapi_id}})
        wait_for(lambda: len(got) == 2)
        assert got == ["interrupt", "speech"]


def test_parked_messages_expire(bridge):
    sid = new_call_sid()
    bridge.vapi({"type": "hang", "call": {"phoneCallProviderId": sid}})
    drainer = bridge.deps.drainer
    wait_for(lambda: drainer.stats()["parked_calls"] == 1)   # its drain found no session and paused
    import twivapi_cli.bridge.drain as sessions
    original = sessions.PARK_TTL, sessions.STALE_QUEUE_S
    sessions.PARK_TTL = sessions.STALE_QUEUE_S = 0.0
    try:
        bridge.server.run(lambda: bridge.deps.sweeper.sweep())
        wait_for(lambda: drainer.stats()["parked_calls"] == 0)
    finally:
        sessions.PARK_TTL, sessions.STALE_QUEUE_S = original
    assert drainer.stats()["queued_calls"] == 0
    assert [e for e in bridge.events() if e.type == "parked.expired"][0].data["messages"] == 1


def test_sessions_that_never_end_expire_by_ttl(bridge):
    sid, _ = ready_call(bridge)
    sweeper = bridge.deps.sweeper
    expired = bridge.server.run(lambda: sweeper.sweep(now=time.time() + 5 * 3600))
    assert expired >= 1
    assert bridge.session(sid).state == CallState.ENDED and bridge.session(sid).ended_reason == "expired-ttl"


def test_a_redelivered_message_is_acknowledged_but_applied_once(bridge):
    sid, vapi_id = ready_call(bridge)
    got: list[str] = []

    async def listener(kind, data):
        got.append(kind)

    bridge.server.run(lambda: _listen(bridge, sid, listener))
    message = {"type": "user-interrupted", "turnId": "t1", "timestamp": 1724000001000, "call": {"id": vapi_id}}
    assert bridge.vapi(message).status_code == 200
    assert bridge.vapi(message).status_code == 200          # Vapi's backoffPlan retry: the same body
    assert bridge.vapi({**message, "turnId": "t2"}).status_code == 200   # a new message
    wait_for(lambda: len(got) == 2)
    time.sleep(0.1)
    assert got == ["interrupt", "interrupt"]
    duplicates = [e for e in bridge.events(sid) if e.type == "vapi.duplicate"]
    assert len(duplicates) == 1 and duplicates[0].data["type"] == "user-interrupted"


def test_a_vapi_call_that_goes_live_after_its_call_ended_is_ended(bridge, vapi):
    """POST /call answered after our deadline: we never learnt its id, but its first status-update
    (with its control URL) arrives for a session that already failed, and the bridge ends it."""
    vapi.failing_calls(500)
    sid = new_call_sid()
    bridge.voice(sid)
    wait_for(lambda: bridge.session(sid).state == CallState.FAILED)
    vapi.clear_faults()
    late = bridge.server.run(lambda: bridge.deps.vapi.create_websocket_call(
        vapi.assistant_id, "mulaw-8k", metadata={"twilioCallSid": sid}))
    assert not vapi.ended(late["id"])
    response = bridge.vapi({"type": "status-update", "status": "in-progress", "call": late})
    assert response.status_code == 200
    wait_for(lambda: vapi.ended(late["id"]))
    race = [e for e in bridge.events(sid) if e.type == "race.vapi-call-after-end"]
    assert race and race[0].data["vapi_call_id"] == late["id"]
    assert bridge.session(sid).state == CallState.FAILED   # nothing else changed


def test_a_ready_call_whose_stream_never_starts_is_ended_vapi_side_too(sims):
    """Twilio never opens the media stream (a wrong public URL, a blocked port): past
    TWIVAPI_STREAM_START_TIMEOUT the sweep ends the call and its Vapi call, and says what to check."""
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(), TWIVAPI_STREAM_START_TIMEOUT="0.3")
    with running_bridge(settings, MemoryStore()) as bridge:
        sid, waiting = new_call_sid(), new_call_sid()
        assert bridge.voice(sid).status_code == 200
        session = wait_for(lambda: (s := bridge.session(sid)) and s.state == CallState.READY and s)
        time.sleep(0.4)
        assert bridge.voice(waiting).status_code == 200          # ready, but not yet for long
        wait_for(lambda: (s := bridge.session(waiting)) and s.state == CallState.READY)
        bridge.server.run(lambda: bridge.deps.sweeper.sweep())
        ended = bridge.session(sid)
        assert ended.state == CallState.ENDED and ended.ended_reason == "stream-never-started"
        assert bridge.session(waiting).state == CallState.READY   # its stream may still come
        wait_for(lambda: sims.ended(session.vapi_call_id))
        hint = [e for e in bridge.events(sid) if e.type == "media.never-started"]
        assert len(hint) == 1 and "TWIVAPI_PUBLIC_URL" in hint[0].data["check"] and "doctor" in hint[0].data["check"]
