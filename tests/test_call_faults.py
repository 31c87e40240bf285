"""Faults injected through the simulators during real calls: sockets dropped, webhooks duplicated,
reordered, delayed or dropped. Each with the outcome the bridge must reach."""

from __future__ import annotations

import time

import pytest

from twivapi_cli import audio
from twivapi_cli.models import CallState
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore

from .support import VAPI_SECRET, bridge_settings, place_call, running_bridge


@pytest.fixture
def bridge(sims):
    sims.clear_faults()
    assistant = sims.assistant(greeting_ms=800, reply_ms=300)
    with running_bridge(bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant), MemoryStore(),
                        public_from_server=True) as b:
        sims.vapi("PATCH", f"/assistant/{assistant}", json={"server": {"url": b.url + "/vapi/webhook",
                                                                              "headers": {"X-Vapi-Secret": VAPI_SECRET}}})
        yield b
    sims.clear_faults()


def call(bridge, sims, plan: CallerPlan):
    return place_call(bridge.url, plan, faults=sims.running.twilio_faults)


def types(bridge, call_sid):
    return [e.type for e in bridge.events(call_sid)]


def settle(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_vapi_socket_dropped_mid_call_ends_both_sides(bridge, sims):
    sims.running.vapi_faults.add("drop_ws", "/call/*/transport", method="WS", frames=25, count=1)
    result = call(bridge, sims, CallerPlan(hangup_after_s=3.0))
    session = bridge.session(result.call_sid)
    # whichever reaches the bridge first: the socket closing, or Vapi's own status-update saying why
    assert session.state == CallState.ENDED
    assert session.ended_reason in ("vapi-socket-closed", "call.in-progress.error-vapifault-worker-died")
    assert result.timeline[-1][1] == "ended" and any(k == "stream-closed" for _, k, _ in result.timeline)
    assert any(t < 2.0 for t, k, _ in result.timeline if k == "stream-closed"), "Twilio's socket was not closed"


def test_twilio_socket_dropped_ends_the_vapi_call(bridge, sims):
    result = call(bridge, sims, CallerPlan(hangup_after_s=3.0, drop_after_frames=20))
    # 400 ms in: POST /call (300-600 ms) may still be in flight; the Vapi call is ended once it exists
    settle(lambda: sims.ended(bridge.session(result.call_sid).vapi_call_id or ""))
    session = bridge.session(result.call_sid)
    # the dropped socket, Twilio's completed callback, or Vapi reporting the end: whichever is first
    # ends the call, once
    assert session.state == CallState.ENDED
    assert session.ended_reason in ("twilio-socket-closed", "twilio-completed", "customer-ended-call")
    assert [e.data["state"] for e in bridge.events(result.call_sid) if e.type == "state"].count("ended") == 1


def test_duplicated_status_callback_is_processed_once(bridge, sims):
    sims.running.twilio_faults.add("webhook", "/twilio/status", action="duplicate", count=1)
    result = call(bridge, sims, CallerPlan(hangup_after_s=0.5))
    settle(lambda: "twilio.status.duplicate" in types(bridge, result.call_sid))
    assert types(bridge, result.call_sid).count("twilio.status") == 1


def test_reordered_status_callbacks_never_move_a_call_backwards(bridge, sims):
    # ringing is held back and arrives after in-progress: stale, ignored
    sims.running.twilio_faults.add("webhook", "/twilio/status", action="reorder", match_type="ringing", count=1)
    result = call(bridge, sims, CallerPlan(hangup_after_s=0.6, progress_events=("ringing", "in-progress")))
    sent = [d["status"] for _, k, d in result.timeline if k == "status-callback"]
    assert sent[:2] == ["in-progress", "ringing"]
    assert "twilio.status.stale" in types(bridge, result.call_sid)
    assert bridge.session(result.call_sid).state == CallState.ENDED


def test_duplicated_and_delayed_vapi_messages_end_the_call_once(bridge, sims):
    sims.running.vapi_faults.add("webhook", "/vapi/webhook", action="duplicate", match_type="status-update")
    sims.running.vapi_faults.add("webhook", "/vapi/webhook", action="delay", delay=0.3, match_type="speech-update")
    result = call(bridge, sims, CallerPlan(hangup_after_s=1.0))
    settle(lambda: "vapi.end-of-call-report" in types(bridge, result.call_sid))
    states = [e.data["state"] for e in bridge.events(result.call_sid) if e.type == "state"]
    assert states.count("ended") == 1
    assert types(bridge, result.call_sid).count("vapi.status-update") >= 2


def test_dropped_vapi_webhooks_do_not_leave_a_session_behind(bridge, sims):
    sims.running.vapi_faults.add("webhook", "/vapi/webhook", action="drop")   # Vapi's webhooks all lost
    result = call(bridge, sims, CallerPlan(hangup_after_s=0.8))
    assert bridge.session(result.call_sid).state == CallState.ENDED   # Twilio's side still ends it
    assert not [t for t in types(bridge, result.call_sid) if t.startswith("vapi.") and t != "vapi.call-created"]


def test_caller_heard_the_greeting_despite_slow_webhooks(bridge, sims):
    sims.running.vapi_faults.add("webhook", "/vapi/webhook", action="delay", delay=0.5)
    result = call(bridge, sims, CallerPlan(hangup_after_s=2.5))
    assert len(result.heard) >= 8 * 600   # audio never waits on webhooks
    assert audio.tone_level_db(audio.ulaw_to_pcm16(bytes(result.heard)), 440.0, 8000) > -30
