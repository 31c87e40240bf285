"""`twivapi demo`: the whole loop on this machine, no accounts.

Starts the Twilio and Vapi simulators, provisions through the real clients (the twilio SDK buys a
number and points it at the bridge; httpx creates the assistant), starts the bridge (stream mode,
SQLite), places five simulated calls and checks what happened on each:

    normal        the caller listens to the greeting and hangs up
    barge-in      the caller talks over the greeting: clear, no stale audio, a reply
    hangup-early  the caller hangs up while Vapi is still creating the call (the seed's race)
    tool-call     the caller asks something; the assistant calls a tool through the bridge
    transfer      the caller asks for a person; the assistant's transferCall becomes phone-call-control,
                  the bridge redirects the Twilio call to <Dial> (twilio SDK), the person answers

Library only: returns a ``DemoReport``; the command renders it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import audio
from .config import Secret, Settings
from .models import Mode

GREETING_MS = 2000
REPLY_MS = 600
GREETING_HZ, REPLY_HZ = 440.0, 660.0   # the simulated assistant's voices (sim.vapi_assistant.Script)
SUPPORT_NUMBER = "+14155550199"   # where the demo's transfer goes: the simulated person's number


@dataclass
class CallReport:
    name: str
    call_sid: str
    ok: bool
    checks: list[tuple[str, bool]] = field(default_factory=list)
    figures: dict[str, float | None] = field(default_factory=dict)
    timeline: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class DemoReport:
    calls: list[CallReport]
    seconds: float
    number: str
    urls: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(call.ok for call in self.calls)


def report_document(report: DemoReport) -> dict[str, Any]:
    """The report as JSON (``twivapi demo --json``): the same figures, checks and timeline as the table."""
    return {"ok": report.ok, "seconds": round(report.seconds, 3), "number": report.number,
            "calls": [{"name": call.name, "call_sid": call.call_sid, "ok": call.ok, "figures": call.figures,
                       "checks": [{"name": name, "ok": ok} for name, ok in call.checks],
                       "timeline": [{"t": round(t, 3), "event": kind} for t, kind in call.timeline]}
                      for call in report.calls]}


def _speech(silence_ms: int, voice_ms: int, hz: float = 300.0) -> bytes:
    """The simulated caller speaking after ``silence_ms``; the tone stands for what is said (300 Hz:
    anything, ``vapi_assistant.TRANSFER_HZ``: "transfer me")."""
    voice = audio.pcm16_to_ulaw(audio.tone(hz, voice_ms, rate=8000, amplitude=0.5))
    return audio.silence_mulaw(silence_ms) + voice


def _provision(sims, public: str) -> tuple[str, str]:
    """Buy a number and point it at the bridge, through the real twilio SDK (runs in a thread)."""
    client = sims.twilio_client()
    offered = client.available_phone_numbers("US").local.list(area_code=415, voice_enabled=True, limit=1)
    number = client.incoming_phone_numbers.create(
        phone_number=offered[0].phone_number, voice_url=f"{public}/twilio/voice", voice_method="POST",
        status_callback=f"{public}/twilio/status", status_callback_method="POST")
    return number.phone_number, number.sid


ASSISTANT = {
    "name": "twivapi-demo",
    "firstMessage": "Hi, this is the twivapi demo assistant.",
    "model": {"provider": "openai", "model": "gpt-4o",
              "messages": [{"role": "system", "content": "You are a helpful assistant."}],
              "tools": [{"type": "function", "function": {
                  "name": "lookup_order", "description": "Look up an order",
                  "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}},
                  {"type": "transferCall", "destinations": [
                      {"type": "number", "number": SUPPORT_NUMBER, "message": "Transferring you to support."}]}]},
    "voice": {"provider": "11labs", "voiceId": "cgSgspJ2msm6clMCkdW9"},
    "transcriber": {"provider": "deepgram", "model": "nova-2", "language": "en"},
    "serverMessages": ["status-update", "speech-update", "transcript", "conversation-update", "tool-calls",
                       "end-of-call-report", "hang", "user-interrupted", "phone-call-control"],
    "metadata": {"simulator": {"greeting_ms": GREETING_MS, "reply_ms": REPLY_MS, "model_latency_ms": 120}},
}


async def run_demo(workdir: Path | None = None, progress: Callable[[str], None] = lambda _: None) -> DemoReport:
    from .bridge.app import create_app
    from .bridge.server import bind, start_in_thread
    from .cluster import open_state
    from .sim.server import start_sims
    from .sim.state import SimState
    from .vapi_api import VapiClient

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="twivapi-demo-") as tmp:
        workdir = workdir or Path(tmp)
        state = SimState()
        sims = start_sims(state)
        sock = bind()
        public = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            progress(f"simulators: Twilio {sims.twilio_url}, Vapi {sims.vapi_url}")
            number, _ = await asyncio.to_thread(_provision, sims, public)
            creds = state.credentials
            admin = VapiClient(sims.vapi_url, creds.vapi_api_key)
            secret = state.vapi.webhook_secret or creds.vapi_webhook_secret
            # as provision does: Vapi authenticates server messages only as the server's headers say
            assistant = await admin.create_assistant({**ASSISTANT, "server": {
                "url": f"{public}/vapi/webhook", "headers": {"X-Vapi-Secret": secret}}})
            await admin.aclose()
            progress(f"bought {number} (simulated), assistant {assistant['id']}, bridge on {public}")
            settings = Settings(
                twilio_account_sid=creds.account_sid, twilio_auth_token=Secret(creds.auth_token),
                twilio_api_base_url=sims.twilio_url, vapi_api_key=Secret(creds.vapi_api_key),
                vapi_base_url=sims.vapi_url, vapi_webhook_secret=Secret(secret),
                vapi_assistant_id=assistant["id"], public_url=public, mode=Mode.STREAM,
                store=f"sqlite:///{workdir / 'demo.db'}", state_dir=workdir)
            app = create_app(settings, *open_state(settings.store_url), VapiClient(sims.vapi_url, creds.vapi_api_key))
            bridge = start_in_thread(app, sock=sock)
            try:
                calls = await _place_calls(state, sims, bridge, app, number, progress)
            finally:
                bridge.stop()
        finally:
            sims.stop()
    return DemoReport(calls, time.monotonic() - started, number,
                      {"twilio": sims.twilio_url, "vapi": sims.vapi_url, "bridge": public})


async def _place_calls(state, sims, bridge, app, number: str, progress) -> list[CallReport]:
    from .sim.twilio_caller import CallerPlan, SimulatedCaller
    from .sim.twilio_dial import Person
    from .sim.vapi_assistant import TRANSFER_HZ

    caller = SimulatedCaller(state.credentials.auth_token, state.credentials.account_sid, state=state.twilio,
                             person=Person(speech_ms=1000))

    async def dial(name: str, plan: CallerPlan, from_: str):
        call = state.twilio.start_inbound_call(to=number, from_=from_)
        progress(f"calling: {name} ({call.sid})")
        result = await caller.call(call.url, from_=from_, to=number, plan=plan, call_sid=call.sid,
                                   status_callback=call.status_callback,
                                   status_callback_events=call.status_callback_events, sim_call=call)
        return name, result

    try:
        # The race first, alone: Vapi is made slow for exactly one POST /call.
        sims.vapi_faults.add("latency", "/call", method="POST", delay=1.5, count=1)
        race = await dial("hangup-early", CallerPlan(hangup_after_s=0.3), "+15550100004")
        await asyncio.sleep(1.6)  # let the late Vapi call arrive and be closed
        results = [race] + list(await asyncio.gather(
            # listens well past the greeting: on a loaded machine its first audio can come a second late
            dial("normal", CallerPlan(hangup_after_s=GREETING_MS / 1000 + 1.8), "+15550100001"),
            dial("barge-in", CallerPlan(audio=_speech(700, 500), hangup_after_s=GREETING_MS / 1000 + 1.5),
                 "+15550100002"),
            # hangs up well after the reply: the tool's round trip and a loaded machine both take time
            dial("tool-call", CallerPlan(audio=_speech(GREETING_MS + 300, 500),
                                         hangup_after_s=GREETING_MS / 1000 + 3.5), "+15550100003")))
        # the transfer after them, alone: the barge-in call's timing checks stay as they were
        results.append(await dial("transfer", CallerPlan(audio=_speech(GREETING_MS + 300, 500, TRANSFER_HZ),
                                                         hangup_after_s=GREETING_MS / 1000 + 6), "+15550100005"))
        await asyncio.sleep(0.5)  # end-of-call reports land
    finally:
        await caller.aclose()
    order = ["normal", "barge-in", "hangup-early", "tool-call", "transfer"]
    results.sort(key=lambda r: order.index(r[0]))
    return [_judge(name, result, state, bridge, app) for name, result in results]


def _events(bridge, app, call_sid: str) -> list:
    return bridge.run(lambda: app.state.deps.store.events(0, call_sid=call_sid, limit=10_000))


def _judge(name: str, result, state, bridge, app) -> CallReport:
    events = _events(bridge, app, result.call_sid)
    by_type: dict[str, list] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    session = bridge.run(lambda: app.state.deps.store.get_session(result.call_sid))
    voice = (by_type.get("twilio.voice") or [None])[0]
    created = (by_type.get("vapi.call-created") or [None])[0]
    clear = (by_type.get("media.clear") or [None])[0]
    first_audio = result.first("first-audio")
    figures: dict[str, Any] = {
        "webhook_ack_ms": round((voice.acked_at - voice.received_at) * 1000, 2) if voice and voice.acked_at else None,
        "vapi_setup_ms": round(created.data.get("setup_ms") or 0, 1) if created else None,
        "first_audio_ms": round(first_audio * 1000) if first_audio is not None else None,
        "barge_in_to_clear_ms": clear.data.get("ms") if clear else None,
    }
    ended = session is not None and session.state.value == "ended"
    checks = [("answered with TwiML", bool(result.twiml) and "<Connect" in result.twiml[0]),
              ("session ended once", ended and sum(1 for e in by_type.get("state", [])
                                                   if e.data.get("state") == "ended") == 1)]
    if name == "normal":
        checks += [("greeting heard", len(result.heard) >= 8 * GREETING_MS * 0.8),
                   ("no clear", not result.clears)]
    elif name == "barge-in":
        stale = _stale_after_clear(result)
        checks += [("one clear", len(result.clears) == 1), ("no stale audio after clear", stale is False),
                   ("clear within 50 ms", clear is not None and clear.data.get("ms", 1e9) < 50)]
    elif name == "hangup-early":
        vapi_ids = [e.data.get("vapi_call_id") for e in by_type.get("race.hangup-before-ready", [])]
        vapi_ended = bool(vapi_ids) and all(
            state.vapi.calls[v].status == "ended" for v in vapi_ids if v in state.vapi.calls)
        checks += [("race detected", bool(vapi_ids)), ("late Vapi call closed", vapi_ended)]
    elif name == "tool-call":
        results: list[Any] = []
        for call in state.vapi.calls.values():
            overrides = call.record.get("assistantOverrides") or {}
            if (overrides.get("metadata") or {}).get("twilioCallSid") == result.call_sid:
                results = call.record.get("toolResults") or []
        answer = results[0][0] if results and results[0] else {}
        checks += [("tool answered", answer.get("result") == "order A1 is shipped"),
                   ("reply heard", _tone_ms(result.heard, REPLY_HZ, GREETING_HZ) >= 0.8 * REPLY_MS)]
    elif name == "transfer":
        checks += _transfer_checks(result, state, by_type, session)
    timeline = [(t, kind) for t, kind, _ in result.timeline]
    return CallReport(name, result.call_sid, all(ok for _, ok in checks), checks, figures, timeline)


def _tone_ms(heard: bytes | bytearray, hz: float, other_hz: float) -> int:
    """How much of what the caller heard was this tone (20 ms frames where it stands well above the
    other tone): the reply counted by what it sounds like, not by when it came, so a slow setup that
    shifts the greeting does not hide it."""
    frame = 160   # 20 ms of mu-law at 8 kHz
    ms = 0
    for start in range(0, len(heard) - frame + 1, frame):
        pcm = audio.ulaw_to_pcm16(bytes(heard[start:start + frame]))
        level = audio.tone_level_db(pcm, hz, 8000)
        if level > -40 and level > audio.tone_level_db(pcm, other_hz, 8000) + 10:
            ms += 20
    return ms


def _stale_after_clear(result) -> bool | None:
    """True if the interrupted greeting (440 Hz) is heard after the clear; None without a clear."""
    if not result.clear_positions:
        return None
    after = bytes(result.heard[result.clear_positions[0]:])
    if not after:
        return False
    pcm = audio.ulaw_to_pcm16(after)
    return audio.tone_level_db(pcm, 440.0, 8000) > audio.tone_level_db(pcm, 660.0, 8000) - 20


def _transfer_checks(result, state, by_type: dict, session) -> list[tuple[str, bool]]:
    """The caller ends up talking to the person; the Vapi side and the media stream ended cleanly."""
    from .sim.twilio_dial import PERSON_HZ
    redirected = [u for u in result.rest_updates if u.kind == "redirect" and "<Dial" in (u.twiml or "")]
    leg = result.dialed[0] if result.dialed else None
    heard = bytes(result.heard[result.dial_positions[0]:]) if result.dial_positions else b""
    pcm = audio.ulaw_to_pcm16(heard)
    person = len(heard) >= 8 * 500 and audio.tone_level_db(pcm, PERSON_HZ, 8000) > audio.tone_level_db(pcm, 440.0, 8000) + 20
    vapi_ids = [e.data.get("vapi_call_id") for e in by_type.get("vapi.call-created", [])]
    vapi_ended = bool(vapi_ids) and all(state.vapi.calls[v].status == "ended" for v in vapi_ids if v in state.vapi.calls)
    return [("redirected to <Dial> (twilio SDK)", len(redirected) == 1),
            ("person answered and was heard", leg is not None and leg.status == "completed" and person),
            ("session ended as forwarded", session is not None and session.ended_reason == "forwarded"),
            ("Vapi side and media stream ended", vapi_ended and bool(by_type.get("media.stop")))]
