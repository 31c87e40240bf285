"""Call control in stream mode, end to end: the simulated assistant's transferCall / endCall tools
produce Vapi's phone-call-control, the bridge carries it out on the Twilio call through the twilio SDK
(Calls update: Twiml <Dial>, Status=completed) against the Twilio simulator, whose caller follows the
update: the stream ends, the <Dial> leg reaches the simulated person, who speaks."""

from __future__ import annotations

import asyncio

import pytest

from twivapi_cli import audio
from twivapi_cli.bridge.call_control import forward_twiml, transfer_destination
from twivapi_cli.config import load_settings
from twivapi_cli.errors import ConfigError
from twivapi_cli.models import Session
from twivapi_cli.sim.twilio_caller import CallerPlan, SimulatedCaller
from twivapi_cli.sim.twilio_dial import PERSON_HZ, Person
from twivapi_cli.sim.vapi_assistant import GOODBYE_HZ, TRANSFER_HZ
from twivapi_cli.store.memory import MemoryStore

from .polling import wait_for
from .support import TOKEN, VAPI_SECRET, bridge_settings, running_bridge

GREETING_MS = 300
CALLER = "+15550100009"
SUPPORT = "+14155550199"
MESSAGES = ["status-update", "speech-update", "end-of-call-report", "phone-call-control",
            "transfer-destination-request"]


def said(hz: float) -> bytes:
    """The caller, after the greeting, "saying" the word ``hz`` stands for (the simulator's tones)."""
    return audio.silence_mulaw(GREETING_MS + 200) + audio.pcm16_to_ulaw(audio.tone(hz, 400, rate=8000, amplitude=0.5))


@pytest.fixture(scope="module")
def line(sims):
    """A bridge in stream mode whose assistant can transfer (to SUPPORT) and end calls, a number
    pointed at it, and what makes a call to it."""
    tools = [{"type": "transferCall", "destinations": [{"type": "number", "number": SUPPORT,
                                                         "message": "Transferring you now"}]}, {"type": "endCall"}]
    made = sims.vapi("POST", "/assistant", json={
        "name": "call-control", "model": {"provider": "openai", "model": "gpt-4o", "tools": tools},
        "serverMessages": MESSAGES, "metadata": {"simulator": {"greeting_ms": GREETING_MS, "reply_ms": 300}}})
    assert made.status_code == 201, made.text
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=made.json()["id"],
                               TWILIO_ACCOUNT_SID=sims.state.credentials.account_sid,
                               TWILIO_API_BASE_URL=sims.twilio_url,
                               TWIVAPI_TRANSFER_DESTINATIONS="sales=+14155550142,default=sip:support@example.test")
    with running_bridge(settings, MemoryStore(), public_from_server=True) as bridge:
        server = {"url": bridge.url + "/vapi/webhook", "headers": {"X-Vapi-Secret": VAPI_SECRET}}
        assert sims.vapi("PATCH", f"/assistant/{made.json()['id']}", json={"server": server}).status_code == 200
        client = sims.running.twilio_client()
        offered = client.available_phone_numbers("US").local.list(area_code=415, limit=1)
        number = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number,
                                                      voice_url=bridge.url + "/twilio/voice",
                                                      status_callback=bridge.url + "/twilio/status")

        def call(plan: CallerPlan):
            async def run():
                sim_call = sims.state.twilio.start_inbound_call(to=number.phone_number, from_=CALLER)
                caller = SimulatedCaller(TOKEN, sims.state.credentials.account_sid, state=sims.state.twilio,
                                         person=Person(speech_ms=600))
                try:
                    return await caller.call(sim_call.url, from_=CALLER, to=number.phone_number, plan=plan,
                                             sim_call=sim_call, status_callback=sim_call.status_callback)
                finally:
                    await caller.aclose()
            return asyncio.run(run())

        yield bridge, call, made.json()["id"]


def ended_cleanly(sims, bridge, call_sid: str, reason: str, vapi_reason: str) -> list:
    wait_for(lambda: bridge.session(call_sid).state.value == "ended", timeout=10)
    vapi_calls = sims.calls_for(call_sid)
    assert len(vapi_calls) == 1
    wait_for(lambda: sims.ended(vapi_calls[0]["id"]), timeout=10)
    events = bridge.events(call_sid)
    wait_for(lambda: any(e.type == "media.stop" for e in bridge.events(call_sid)), timeout=10)
    assert bridge.session(call_sid).ended_reason == reason
    assert sims.state.vapi.calls[vapi_calls[0]["id"]].record["endedReason"] == vapi_reason
    assert not bridge.deps.signals.interested(call_sid)   # the media socket is gone
    return events


def test_a_transfer_puts_the_caller_through_to_the_person_and_ends_both_legs(sims, line):
    bridge, call, _ = line
    result = call(CallerPlan(audio=said(TRANSFER_HZ), hangup_after_s=15))
    assert result.errors == [] and result.status == "completed"
    assert [u.kind for u in result.rest_updates] == ["redirect"]          # Calls update Twiml=<Dial>
    twiml = result.rest_updates[0].twiml
    assert f'<Dial callerId="{CALLER}"><Number>{SUPPORT}</Number></Dial>' in twiml
    leg = result.dialed[0]
    assert (leg.to, leg.kind, leg.status, leg.caller_id) == (SUPPORT, "number", "completed", CALLER)
    after = audio.ulaw_to_pcm16(bytes(result.heard[result.dial_positions[0]:]))
    assert audio.tone_level_db(after, PERSON_HZ, 8000) > audio.tone_level_db(after, 440.0, 8000) + 20   # the person
    assert len(after) >= 2 * 8 * 500
    child = sims.state.twilio.calls[leg.call_sid]
    assert child.parent_call_sid == result.call_sid and child.direction == "outbound-dial"
    events = ended_cleanly(sims, bridge, result.call_sid, "forwarded", "assistant-forwarded-call")
    forwarded = [e for e in events if e.type == "call.forwarded"]
    assert len(forwarded) == 1 and forwarded[0].data["to"] == SUPPORT
    # the stream ended because Twilio left <Connect>: no after-stream request, so no <Hangup/> raced the <Dial>
    assert not any(e.type == "twilio.after-stream" for e in bridge.events(result.call_sid))


def test_an_end_call_hangs_the_twilio_call_up(sims, line):
    bridge, call, _ = line
    result = call(CallerPlan(audio=said(GOODBYE_HZ), hangup_after_s=15))
    assert result.errors == [] and result.status == "completed" and not result.hung_up
    assert [u.kind for u in result.rest_updates] == ["status"] and result.dialed == []
    assert sims.state.twilio.calls[result.call_sid].status == "completed"
    events = ended_cleanly(sims, bridge, result.call_sid, "assistant-hung-up", "assistant-ended-call")
    assert any(e.type == "call.hung-up" for e in events)


def test_a_transfer_without_a_tool_destination_is_answered_from_the_settings(sims, line):
    bridge, call, assistant_id = line
    tools = [{"type": "transferCall"}, {"type": "endCall"}]   # no destinations: Vapi asks the server
    model = {"provider": "openai", "model": "gpt-4o", "tools": tools}
    assert sims.vapi("PATCH", f"/assistant/{assistant_id}", json={"model": model}).status_code == 200
    result = call(CallerPlan(audio=said(TRANSFER_HZ), hangup_after_s=15))
    assert result.errors == []
    assert "<Dial><Sip>sip:support@example.test</Sip></Dial>" in result.rest_updates[0].twiml
    assert (result.dialed[0].kind, result.dialed[0].status) == ("sip", "completed")
    ended_cleanly(sims, bridge, result.call_sid, "forwarded", "assistant-forwarded-call")


def test_the_transfer_fixture_replays_and_redirects_the_twilio_call():
    from pathlib import Path

    from twivapi_cli import fixtures
    from twivapi_cli.replay import InProcess, Runner

    env = InProcess()
    try:
        fixture = fixtures.load(Path(__file__).parent.parent / "fixtures" / "transfer.json")
        server, url = env.bridge(fixture)

        async def run():
            runner = Runner(url, env.creds, on_call=env.register_call)
            try:
                return await runner.run(fixture)
            finally:
                await runner.aclose()
        try:
            result = asyncio.run(run())
        finally:
            server.stop()
        assert result.ok, [(s.label, s.problems) for s in result.steps if not s.ok]
        redirected = [c for c in env.state.twilio.calls.values() if c.twiml]
        assert len(redirected) == 1   # the Calls update the bridge made through the twilio SDK
        assert '<Dial callerId="+15551230001"><Number>+14155550199</Number></Dial>' in redirected[0].twiml
        assert [u.kind for u in redirected[0].hub.history] == ["redirect"]
        assert all(c.status == "ended" for c in env.state.vapi.calls.values())   # the Vapi side too
    finally:
        env.close()


# --- bad input -------------------------------------------------------------------------------------

def test_a_bad_destination_is_refused_and_the_call_goes_on(sims, line):
    bridge, _, _ = line
    call_sid = "CA" + "b" * 32
    voice = {"CallSid": call_sid, "From": CALLER, "To": "+14155550100", "CallStatus": "ringing"}
    assert bridge.twilio("/twilio/voice", voice, signed_url=bridge.url + "/twilio/voice").status_code == 200
    for destination in ({"type": "number", "number": "12ab"}, {"type": "sip", "sipUri": "support"},
                        {"type": "assistant"}, "not an object"):
        message = {"type": "phone-call-control", "request": "forward", "destination": destination,
                   "call": {"id": "v-bad", "phoneCallProviderId": call_sid}}
        assert bridge.vapi(message).status_code == 200
    odd = {"type": "phone-call-control", "request": "mute", "call": {"phoneCallProviderId": call_sid}}
    assert bridge.vapi(odd).status_code == 200
    wait_for(lambda: sum(e.type == "call.control-refused" for e in bridge.events(call_sid)) == 5, timeout=10)
    reasons = [e.data["reason"] for e in bridge.events(call_sid) if e.type == "call.control-refused"]
    assert "'12ab' is not an E.164 number" in reasons[0] and "'support' is not a SIP URI" in reasons[1]
    assert "'mute' is not forward or hang-up" in reasons[-1]
    assert not bridge.session(call_sid).state.terminal   # nothing was changed


def test_transfer_destination_request_answers_and_errors():
    table = load_settings({}, environ={"TWIVAPI_TRANSFER_DESTINATIONS": "sales=+14155550142, support=sip:a@b.test"},
                          env_file=None)
    assert transfer_destination(table) == {"destination": {"type": "number", "number": "+14155550142"}}   # the first
    assert transfer_destination(table, "support") == {"destination": {"type": "sip", "sipUri": "sip:a@b.test"}}
    unknown = transfer_destination(table, "billing")
    assert unknown["error"].startswith("Unknown transfer destination 'billing'") and "sales, support" in unknown["error"]
    assert "TWIVAPI_TRANSFER_DESTINATIONS" in transfer_destination(load_settings({}, environ={}, env_file=None))["error"]
    for bad, why in (("sales", "not name=destination"), ("sales=5551234", "neither an E.164"),
                     ("a=+14155550142,a=+14155550143", "listed twice")):
        with pytest.raises(ConfigError, match="TWIVAPI_TRANSFER_DESTINATIONS") as info:
            load_settings({}, environ={"TWIVAPI_TRANSFER_DESTINATIONS": bad}, env_file=None)
        assert why in str(info.value)


def test_forward_twiml_caller_id_and_extension():
    session = Session(call_sid="CA" + "1" * 32, mode="stream", from_number=CALLER, to_number="+14155550100")
    assert forward_twiml({"type": "number", "number": SUPPORT, "callerId": "{{phoneNumber.number}}",
                          "extension": "42"}, session) == (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial callerId="+14155550100">'
        f'<Number sendDigits="w42">{SUPPORT}</Number></Dial></Response>')
    with pytest.raises(ValueError, match="not number or sip"):
        forward_twiml({"type": "assistant"}, session)
