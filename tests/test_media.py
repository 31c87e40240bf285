"""WS /twilio/media end to end: simulated caller -> bridge -> simulated Vapi assistant, for real."""

from __future__ import annotations

import asyncio
import time

import pytest

from twivapi_cli import audio
from twivapi_cli.models import CallState
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore

from .support import TOKEN, bridge_settings, place_call, running_bridge


@pytest.fixture(scope="module")
def vapi(sims):
    return sims


def public_bridge(bridge) -> str:
    """The bridge's local URL stands in for the public one (the caller signs what it requests)."""
    return bridge.url


def run_call(bridge, plan: CallerPlan, **kwargs):
    return place_call(bridge.url, plan, **kwargs)


def local_settings(vapi, assistant_id: str, **extra):
    return bridge_settings(vapi.url, VAPI_ASSISTANT_ID=assistant_id, **extra)


@pytest.fixture
def bridge_factory(vapi):
    def make(behavior="answer", audio_format="mulaw-8k", barge_in="interrupted", media_signature="optional", **script):
        assistant_id = vapi.assistant(behavior=behavior, **script)
        settings = local_settings(vapi, assistant_id, TWIVAPI_AUDIO_FORMAT=audio_format, TWIVAPI_BARGE_IN=barge_in,
                                  TWIVAPI_MEDIA_SIGNATURE=media_signature)
        # the bridge's loopback URL is its public URL: the caller follows the TwiML's stream URL
        return running_bridge(settings, MemoryStore(), public_from_server=True)
    return make


def assistant_of(vapi, bridge, call_sid):
    return vapi.driver(bridge.session(call_sid).vapi_call_id)


def speech(ms_silence_before: int, ms_voice: int, hz: float = 300.0, ms_after: int = 0) -> bytes:
    pcm = audio.tone(hz, ms_voice, rate=8000, amplitude=0.5)
    return audio.silence_mulaw(ms_silence_before) + audio.pcm16_to_ulaw(pcm) + audio.silence_mulaw(ms_after)


def test_echo_is_bit_exact_in_mulaw(bridge_factory, vapi):
    with bridge_factory(behavior="echo") as bridge:
        sent = speech(200, 800, hz=437.0, ms_after=400)
        result = run_call(bridge, CallerPlan(audio=sent, hangup_after_s=2.0))
    assert not result.errors, result.errors
    heard = bytes(result.heard)
    start = heard.find(sent[1600:1600 + 320])  # the echo arrives after the round trip; find where it starts
    assert start >= 0, "the caller's own audio did not come back"
    segment = sent[1600:1600 + 8 * 400]
    assert heard[start:start + len(segment)] == segment


def test_greeting_is_heard_and_session_ends_once(bridge_factory, vapi):
    with bridge_factory(greeting_ms=600) as bridge:
        result = run_call(bridge, CallerPlan(hangup_after_s=2.5))
        session = bridge.session(result.call_sid)
        events = [e.type for e in bridge.events(result.call_sid)]
    assert not result.errors, result.errors
    assert len(result.heard) >= 8 * 500  # most of the 600 ms greeting
    assert session.state == CallState.ENDED
    assert events.count("media.stop") == 1
    assert [e for e in events if e == "state"]


def test_barge_in_sends_clear_and_no_stale_audio(bridge_factory, vapi):
    # the caller talks over a 5 s greeting at 2 s: the greeting starts once POST /call answered (up to
    # ~0.7 s in, later on a loaded machine), so it is playing then whatever the machine
    with bridge_factory(greeting_ms=5000) as bridge:
        sent = speech(2000, 600, ms_after=1500)
        result = run_call(bridge, CallerPlan(audio=sent, hangup_after_s=4.5))
        clears = [e for e in bridge.events(result.call_sid) if e.type == "media.clear"]
    assert not result.errors, result.errors
    assert len(result.clears) == 1, result.timeline
    assert len(clears) == 1 and clears[0].data["ms"] < 50
    # What the caller heard after the clear is the reply (660 Hz), none of the greeting (440 Hz).
    after = audio.ulaw_to_pcm16(bytes(result.heard[result.clear_positions[0]:]))
    assert len(after) > 2 * 8000 * 0.3, "the reply after the interruption was not heard"
    assert audio.tone_level_db(after, 440.0, 8000) < audio.tone_level_db(after, 660.0, 8000) - 20
    assert len(result.heard) < 8 * 5000 * 0.8  # the 5 s greeting was cut short


@pytest.mark.parametrize("barge_in", ["interrupted", "speech"])
def test_a_backchannel_leaves_every_frame_of_the_turn_audible(bridge_factory, vapi, barge_in):
    """The caller's "uh-huh" over the greeting, shorter than the assistant's stopSpeakingPlan
    (numWords 2): Vapi reports the speech (speech-update started) but no user-interrupted, and talks on.
    The bridge clears only on user-interrupted, so every frame of the greeting reaches the caller;
    clearing on the caller's speech-update too is the opt-in TWIVAPI_BARGE_IN=speech."""
    # the "uh-huh" at 2 s, over a 3 s greeting that starts once POST /call answered (up to ~0.7 s in,
    # later on a loaded machine): playing then, so the speech arm has something to clear; the hang-up
    # at 5 s leaves the whole greeting time to be heard in the other
    with bridge_factory(greeting_ms=3000, num_words=2, barge_in=barge_in) as bridge:
        sent = speech(2000, 250, ms_after=2000)
        result = run_call(bridge, CallerPlan(audio=sent, hangup_after_s=5.0))
        assistant = assistant_of(vapi, bridge, result.call_sid)
        clears = [e for e in bridge.events(result.call_sid) if e.type == "media.clear"]
    assert not result.errors, result.errors
    kinds = [(m["type"], m.get("role"), m.get("status")) for m in assistant.socket_messages]
    assert ("speech-update", "user", "started") in kinds and ("user-interrupted", None, None) not in kinds
    assert assistant.interruptions == 0 and len(assistant.sent) == 8 * 3000   # the greeting went out whole
    if barge_in == "interrupted":
        assert not result.clears and not clears, result.timeline
        assert bytes(result.heard) == bytes(assistant.sent)                   # every frame, in order
    else:
        assert len(result.clears) == 1 and clears[0].data["source"] == "transport"
        assert len(result.heard) < len(assistant.sent)                        # cut, the rest muted


def test_early_caller_audio_is_buffered_not_lost(vapi):
    settings = local_settings(vapi, vapi.assistant(behavior="echo"))
    vapi.slow_calls(0.5, count=1)  # POST /call answers late: the caller's first frames arrive before Vapi
    try:
        with running_bridge(settings, MemoryStore(), public_from_server=True) as bridge:
            sent = speech(0, 400, hz=523.0, ms_after=200)
            result = run_call(bridge, CallerPlan(audio=sent, hangup_after_s=2.0))
            opened = [e for e in bridge.events(result.call_sid) if e.type == "media.vapi-open"]
            assistant = assistant_of(vapi, bridge, result.call_sid)
    finally:
        vapi.clear_faults()
    assert opened and opened[0].data["early_frames"] >= 10
    assert bytes(assistant.heard[:len(sent)]) == sent  # every early frame, in order


def test_pcm16_mode_transcodes_both_ways(bridge_factory, vapi):
    with bridge_factory(behavior="echo", audio_format="pcm16-16k") as bridge:
        sent = speech(100, 1000, hz=1000.0, ms_after=300)
        result = run_call(bridge, CallerPlan(audio=sent, hangup_after_s=2.0))
        assistant = assistant_of(vapi, bridge, result.call_sid)
    # Vapi got PCM16 at 16 kHz: 640 bytes for every 160-byte frame the caller sent in its 2 s
    assert len(assistant.heard) % 640 == 0 and len(assistant.heard) >= 640 * 90
    heard_pcm = audio.ulaw_to_pcm16(bytes(result.heard))
    tone_part = heard_pcm[2 * 8000 // 5: 2 * 8000 // 5 + 2 * 4000]   # 500 ms inside the echoed tone
    assert audio.sinad_db(tone_part, 1000.0, 8000) >= 30


def test_dtmf_is_forwarded_to_vapi(bridge_factory, vapi):
    """"5" pressed while POST /call is still in flight (made slower here, so it surely is) waits for
    Vapi's socket, as the audio does; "7" goes straight through."""
    vapi.slow_calls(0.5, count=1)
    try:
        with bridge_factory(behavior="echo") as bridge:
            result = run_call(bridge, CallerPlan(hangup_after_s=2.5, dtmf=[(0.2, "5"), (2.0, "7")]))
            dtmf = [e for e in bridge.events(result.call_sid) if e.type == "media.dtmf"]
            assistant = assistant_of(vapi, bridge, result.call_sid)
    finally:
        vapi.clear_faults()
    assert [e.data["digit"] for e in dtmf] == ["5", "7"]
    pressed = [t["message"] for t in assistant.transcript if "pressed" in t["message"]]
    assert pressed == ["The caller pressed 5.", "The caller pressed 7."], assistant.transcript


def _call_in_a_thread(bridge, plan: CallerPlan):
    import threading
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", run_call(bridge, plan)), daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("how", ["webhook", "transport"])
def test_when_vapi_ends_the_call_what_it_queued_is_still_played(bridge_factory, vapi, how):
    """Vapi sends its last words (here the whole 1 s greeting, 8x faster than it plays) and ends the
    call at once: by its server message (webhook) or by closing the transport. The bridge plays what
    is queued out (paced) and closes only when Twilio echoed the last mark: every frame is heard."""
    from .polling import wait_for
    with bridge_factory(greeting_ms=1000, speed=8) as bridge:
        thread, box = _call_in_a_thread(bridge, CallerPlan(hangup_after_s=None))   # waits for the bridge to close
        session = wait_for(lambda: next((s for s in bridge.server.run(bridge.deps.store.active_sessions)
                                         if s.vapi_call_id), None), "a call with its Vapi side")
        assistant = assistant_of(vapi, bridge, session.call_sid)
        wait_for(lambda: len(assistant.sent) == 8 * 1000, "the assistant said everything")
        ended_at = time.monotonic()
        if how == "webhook":
            reply = bridge.vapi({"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call",
                                 "call": {"id": session.vapi_call_id}})
            assert reply.status_code == 200
        else:
            vapi.running.vapi.run(lambda: assistant.hang_up("assistant-ended-call"))
        thread.join(10)
        closed_after = time.monotonic() - ended_at
        result = box["result"]
        stops = [e for e in bridge.events(result.call_sid) if e.type == "media.stop"]
    assert not result.errors, result.errors
    assert bytes(result.heard) == bytes(assistant.sent)   # the end of the goodbye too
    assert closed_after < 0.5 + 1.5, closed_after          # what was left to play, within the bound
    assert len(stops) == 1


def test_the_play_out_at_the_end_is_bounded_and_skipped_when_twilio_ended_it():
    from twivapi_cli.audio import transcoders
    from twivapi_cli.bridge.outbound import Outbound

    async def go():
        sent: list[str] = []

        async def send(text: str) -> None:
            sent.append(text)
        outbound = Outbound(transcoders("mulaw-8k")[1], send)
        outbound.stream_sid = "MZ" + "0" * 32
        pacer = asyncio.create_task(outbound.pace())
        outbound.push(b"\xff" * 8000 * 3)          # 3 s queued; Twilio never echoes a mark
        started = time.monotonic()
        assert await outbound.play_out("assistant-ended-call", lambda: False, timeout=0.3) is False
        waited = time.monotonic() - started
        assert not await outbound.play_out("twilio-completed", lambda: False)   # the caller is gone: at once
        pacer.cancel()
        return waited, len(sent)
    waited, sent = asyncio.run(go())
    # bounded by the timeout, not by the 3 s queued: a wide margin for a slow machine, still under 3 s
    assert 0.3 <= waited < 2.0 and sent > 10


def test_unsigned_handshake_is_refused_when_a_signature_is_required(bridge_factory):
    import websockets
    with bridge_factory(media_signature="required") as bridge:
        async def go():
            with pytest.raises(websockets.InvalidStatus):
                await websockets.connect(bridge.url.replace("http", "ws") + "/twilio/media")
        asyncio.run(go())


class _StoreThatCanFail(MemoryStore):
    down = False

    async def get_session(self, call_sid):
        if self.down:
            from twivapi_cli.errors import StoreError
            raise StoreError("store unavailable (test)")
        return await super().get_session(call_sid)


def test_store_down_when_the_stream_starts_closes_it_with_1011(vapi):
    import json

    import websockets

    from twivapi_cli import signing
    store = _StoreThatCanFail()
    with running_bridge(local_settings(vapi, vapi.assistant()), store, public_from_server=True) as bridge:
        sid = "CA" + "d" * 32
        params = {"CallSid": sid, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
        assert bridge.twilio("/twilio/voice", params, signed_url=bridge.url + "/twilio/voice").status_code == 200
        deadline = time.monotonic() + 5
        while bridge.session(sid).state != CallState.READY:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        store.down = True
        url = bridge.url.replace("http", "ws", 1) + "/twilio/media"

        async def stream():
            headers = {"X-Twilio-Signature": signing.twilio_signature(TOKEN, url, {})}
            async with websockets.connect(url, additional_headers=headers) as ws:
                await ws.send(json.dumps({"event": "start", "streamSid": "MZ" + "d" * 32, "start": {
                    "callSid": sid, "streamSid": "MZ" + "d" * 32,
                    "customParameters": {signing.STREAM_TOKEN_PARAM: signing.stream_token(TOKEN, sid)},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                return ws.close_code
        assert asyncio.run(stream()) == 1011                      # closed, saying why, not hung
        store.down = False
        counters = bridge.deps.recorder.counters
        assert counters.get("media.store_error") == 1 and counters.get("media.bad_message", 0) == 0
        again = run_call(bridge, CallerPlan(hangup_after_s=1.0))  # the bridge carries on
        assert again.heard and not again.errors


@pytest.mark.parametrize("message, event", [
    ({"type": "user-interrupted", "turnId": "t1"}, "interrupt"),
    ({"type": "speech-update", "role": "user", "status": "started", "turn": 0}, "caller-started"),
    ({"type": "speech-update", "role": "user", "status": "stopped", "turn": 0}, "caller-stopped"),
    ({"type": "speech-update", "role": "assistant", "status": "started", "turn": 1}, "assistant-started"),
    ({"type": "status-update", "status": "ended", "endedReason": "customer-ended-call"}, "ended"),
])
def test_only_user_interrupted_on_the_transport_is_an_interruption(message, event):
    import json

    from twivapi_cli.bridge.vapi_leg import control_event
    assert (control_event(json.dumps(message)) or ("", None))[0] == event
