"""What the simulated assistant emits, checked against Vapi's official schemas: every server-URL
message (ServerMessage*) and every control message on the transport socket (ClientMessage*)."""

from __future__ import annotations

import asyncio

import pytest

from twivapi_cli import audio
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore

from .sims import running_sims
from .support import VAPI_SECRET, bridge_settings, place_call, running_bridge
from .test_sim_vapi import conforms, spec_or_skip

SERVER_SCHEMAS = {"status-update": "ServerMessageStatusUpdate", "speech-update": "ServerMessageSpeechUpdate",
                  "transcript": "ServerMessageTranscript", "user-interrupted": "ServerMessageUserInterrupted",
                  "end-of-call-report": "ServerMessageEndOfCallReport", "tool-calls": "ServerMessageToolCalls",
                  "model-output": "ServerMessageModelOutput", "conversation-update": "ServerMessageConversationUpdate"}
# status-update has no ClientMessage schema in the spec (reference/vapi.md §4): checked as a server message
SOCKET_SCHEMAS = {"speech-update": "ClientMessageSpeechUpdate", "transcript": "ClientMessageTranscript",
                  "user-interrupted": "ClientMessageUserInterrupted", "model-output": "ClientMessageModelOutput"}


@pytest.fixture(scope="module")
def emitted():
    spec_or_skip()
    with running_sims() as sims:
        tools = {"model": {"provider": "openai", "model": "gpt-4o", "tools": [
            {"type": "function", "function": {"name": "lookup_order"}}]}}
        response = sims.vapi("POST", "/assistant", json={
            "name": "schema-check", **tools, "metadata": {"simulator": {"greeting_ms": 1500, "reply_ms": 400}},
            "serverMessages": list(SERVER_SCHEMAS)})
        assistant_id = response.json()["id"]
        settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant_id)
        with running_bridge(settings, MemoryStore(), public_from_server=True) as bridge:
            sims.vapi("PATCH", f"/assistant/{assistant_id}", json={"server": {"url": bridge.url + "/vapi/webhook",
                                                                                 "headers": {"X-Vapi-Secret": VAPI_SECRET}}})
            speech = audio.silence_mulaw(500) + audio.pcm16_to_ulaw(audio.tone(300, 500, 8000, 0.5))
            result = place_call(bridge.url, CallerPlan(audio=speech, hangup_after_s=2.5), status_callback=False)
            driver = sims.driver(bridge.session(result.call_sid).vapi_call_id)
            asyncio.run(asyncio.sleep(0.3))
            yield driver


def test_every_server_message_matches_its_schema(emitted):
    sent = emitted.post.sent
    kinds = {m["type"] for m in sent}
    assert set(SERVER_SCHEMAS) == kinds   # every type the assistant lists, conversation-update included
    for message in sent:
        conforms({"message": message}, "ServerMessage")
        conforms(message, SERVER_SCHEMAS[message["type"]])


def test_every_socket_control_message_matches_its_schema(emitted):
    checked = 0
    for message in emitted.socket_messages:
        if message["type"] in SOCKET_SCHEMAS:
            conforms(message, SOCKET_SCHEMAS[message["type"]])
            checked += 1
    assert checked >= 4


def test_the_bridge_answered_every_message(emitted):
    statuses = {status for _, status, _ in emitted.post.replies}
    assert statuses == {200}
    tool_reply = next(reply for kind, _, reply in emitted.post.replies if kind == "tool-calls")
    assert tool_reply["results"][0]["result"] == "order A1 is shipped"
