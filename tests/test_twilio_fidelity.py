"""Where our bridge and our Twilio simulator used to agree with each other but not with real Twilio.

- Media stream authentication: Twilio may not sign the upgrade (sources disagree), so the stream is
  authenticated by a per-call token in the TwiML's <Parameter>s, handed back in the start message;
  the signature is checked when present (required only with TWIVAPI_MEDIA_SIGNATURE=required); one
  stream per call.
- ``wss://`` only: Twilio opens media streams only to wss:// on port 443 (errors 31910, 31922), so
  `serve` in stream mode refuses a public URL that is not https:// (loopback hosts aside), warns of
  another port, `doctor` says both, and the simulated caller refuses a ws:// stream URL to a host
  that is not loopback, as Twilio would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl

import pytest
import websockets
from typer.testing import CliRunner

from twivapi_cli import signing
from twivapi_cli.cli import app
from twivapi_cli.models import CallState
from twivapi_cli.sim.twilio_caller import CallerPlan, CallResult, SimulatedCaller
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.twilio_media import stream_url_problems

from .polling import wait_for
from .support import TOKEN, VAPI_SECRET, bridge_settings, new_call_sid, place_call, running_bridge

runner = CliRunner()


# --- 1. how a media stream is authenticated ----------------------------------------------------------

@pytest.fixture(scope="module")
def assistant(sims):
    return sims.assistant(greeting_ms=400)


@pytest.fixture
def bridge(sims, assistant, request):
    """A bridge whose loopback URL is its public URL; ``@pytest.mark.parametrize("bridge",
    ["required"], indirect=True)`` for TWIVAPI_MEDIA_SIGNATURE=required."""
    extra = {"TWIVAPI_MEDIA_SIGNATURE": request.param} if hasattr(request, "param") else {}
    with running_bridge(bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant, **extra), MemoryStore(),
                        public_from_server=True) as b:
        b.ws_url = b.url.replace("http://", "ws://") + "/twilio/media"
        yield b


def answered(bridge, sid: str) -> ET.Element:
    """The voice webhook for a new call ``sid``: the <Stream> element of the TwiML answered."""
    response = bridge.twilio("/twilio/voice", {"CallSid": sid, "From": "+15551112222", "To": "+15553334444",
                                               "CallStatus": "ringing"}, signed_url=bridge.url + "/twilio/voice")
    assert response.status_code == 200, response.text
    return ET.fromstring(response.text).find("Connect/Stream")


def start_message(sid: str, parameters: dict) -> str:
    stream = "MZ" + sid[2:]
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream, "start": {
        "accountSid": "AC" + "0" * 32, "streamSid": stream, "callSid": sid, "tracks": ["inbound"],
        "customParameters": parameters, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                        "channels": 1}}})


async def open_stream(bridge, sid: str, parameters: dict, *, signed: bool = True, sign_url: str | None = None,
                      keep: bool = False):
    """(close code, or None when still open after a moment; the socket, closed unless ``keep``): a
    stream started by hand."""
    url = bridge.ws_url
    headers = {"X-Twilio-Signature": signing.twilio_signature(TOKEN, sign_url or url, {})} if signed else {}
    ws = await websockets.connect(url, additional_headers=headers)
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    await ws.send(start_message(sid, parameters))
    try:
        await asyncio.wait_for(ws.recv(), 1.0)   # the greeting, if the stream was accepted
    except websockets.ConnectionClosed:
        return ws.close_code, ws
    if not keep:
        await ws.close()
    return None, ws


def test_the_twiml_carries_the_calls_stream_token_beside_its_callsid(bridge):
    sid = new_call_sid()
    stream = answered(bridge, sid)
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert parameters == {"callSid": sid, "twivapiToken": signing.stream_token(TOKEN, sid)}
    assert len(parameters["twivapiToken"]) == 64 and signing.verify_stream_token(TOKEN, sid, parameters["twivapiToken"])
    assert not signing.verify_stream_token(TOKEN, new_call_sid(), parameters["twivapiToken"])
    assert not signing.verify_stream_token(TOKEN + "x", sid, parameters["twivapiToken"])


@pytest.mark.parametrize("parameters", [
    lambda sid: {},                                                       # no token at all
    lambda sid: {"callSid": sid},                                         # what we used to answer
    lambda sid: {"callSid": sid, "twivapiToken": "0" * 64},               # a forged one
    lambda sid: {"callSid": sid, "twivapiToken": signing.stream_token(TOKEN, "CA" + "1" * 32)},   # another call's
    lambda sid: {"callSid": sid, "twivapiToken": signing.stream_token("not-the-auth-token", sid)},
], ids=["none", "callSid-only", "forged", "another-calls", "other-key"])
def test_a_start_without_its_calls_token_is_refused_even_when_the_upgrade_is_signed(bridge, parameters, caplog):
    sid = new_call_sid()
    answered(bridge, sid)
    wait_for(lambda: bridge.session(sid).state == CallState.READY, "the call set up")
    with caplog.at_level(logging.WARNING, logger="twivapi.bridge"):
        code, ws = asyncio.run(open_stream(bridge, sid, parameters(sid), signed=True))
    assert code == 1008
    refused = [e for e in bridge.events(sid) if e.type == "media.refused"]
    assert refused and "twivapiToken" in refused[0].data["reason"]
    assert bridge.deps.recorder.counters.get("media.start_refused") == 1
    assert any("start refused" in r.getMessage() for r in caplog.records)
    session = bridge.session(sid)
    assert session.stream_sid is None and not session.state.terminal   # the real stream may still come
    assert not [e for e in bridge.events(sid) if e.type == "media.start"]


def test_an_unsigned_upgrade_with_the_token_is_a_working_stream(bridge):
    """What the simulated caller does now by default, as real Twilio may: no signature, the TwiML's
    <Parameter>s in the start message."""
    result = place_call(bridge.url, CallerPlan(hangup_after_s=2.0))
    assert not result.errors, result.errors
    assert len(result.heard) > 8 * 300
    counters = bridge.deps.recorder.counters
    assert not counters.get("media.handshake_refused") and not counters.get("media.signature_invalid")


def test_a_signature_for_another_url_is_logged_with_the_diagnosis_but_the_token_decides(bridge, caplog):
    sid = new_call_sid()
    stream = answered(bridge, sid)
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    other = bridge.ws_url.replace("ws://", "wss://")   # signed for another scheme than our public URL's
    with caplog.at_level(logging.WARNING, logger="twivapi.bridge"):
        code, ws = asyncio.run(open_stream(bridge, sid, parameters, sign_url=other))
    assert code is None   # the stream works: it had the token
    lines = [r.getMessage() for r in caplog.records if "X-Twilio-Signature" in r.getMessage()]
    assert lines and f"valid for {other}" in lines[0] and "TWIVAPI_PUBLIC_URL" in lines[0], lines
    assert bridge.deps.recorder.counters.get("media.signature_invalid") == 1
    assert TOKEN not in " ".join(lines)


@pytest.mark.parametrize("bridge", ["required"], indirect=True)
def test_with_media_signature_required_a_valid_signature_is_needed_as_well(bridge):
    unsigned = place_call(bridge.url, CallerPlan(hangup_after_s=0.5))
    assert any("stream connect failed" in e for e in unsigned.errors), unsigned.errors   # 403 before it opens
    assert bridge.deps.recorder.counters.get("media.handshake_refused") == 1
    signed = place_call(bridge.url, CallerPlan(hangup_after_s=2.0, sign_upgrade=True))
    assert not signed.errors and len(signed.heard) > 8 * 300, signed.errors
    sid = new_call_sid()   # and the token still decides: a signed upgrade without it is refused
    answered(bridge, sid)
    code, _ = asyncio.run(open_stream(bridge, sid, {"callSid": sid}))
    assert code == 1008


def test_one_stream_per_call_a_second_start_from_another_socket_is_refused(bridge):
    sid = new_call_sid()
    stream = answered(bridge, sid)
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}

    async def go():
        first_code, first = await open_stream(bridge, sid, parameters, keep=True)
        assert first_code is None
        second_code, _ = await open_stream(bridge, sid, parameters, signed=False)
        assert first.close_code is None   # the first stream is untouched
        await first.close()
        return second_code
    assert asyncio.run(go()) == 1008
    refused = [e for e in bridge.events(sid) if e.type == "media.refused"]
    assert refused and "already has a media stream" in refused[0].data["reason"]
    starts = [e for e in bridge.events(sid) if e.type == "media.start"]
    assert len(starts) == 1


def test_replay_sends_the_parameters_of_the_voice_twiml():
    import httpx

    from twivapi_cli.replay import STREAM_PARAMETERS, remember_stream_parameters
    variables: dict = {}
    twiml = ('<Response><Connect action="https://x/after"><Stream url="wss://x/twilio/media">'
             '<Parameter name="callSid" value="CA1" /><Parameter name="twivapiToken" value="abc" />'
             '</Stream></Connect></Response>')
    remember_stream_parameters(httpx.Response(200, text=twiml), variables)
    assert json.loads(variables[STREAM_PARAMETERS]) == {"callSid": "CA1", "twivapiToken": "abc"}
    remember_stream_parameters(httpx.Response(403, text='{"error": {}}'), variables)   # not TwiML: kept
    assert json.loads(variables[STREAM_PARAMETERS])["twivapiToken"] == "abc"


# --- 2. wss:// only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base, error, warning", [
    ("https://bridge.example.com", False, False),
    ("https://bridge.example.com:443", False, False),
    ("https://bridge.example.com:8443", False, True),
    ("http://bridge.example.com", True, False),
    ("http://bridge.example.com:443", True, False),
    ("http://10.0.0.5:8080", True, False),
    ("http://127.0.0.1:8080", False, False),      # local work with the simulators
    ("http://localhost:8080", False, False),
    ("http://[::1]:8080", False, False),
])
def test_what_twilio_can_open_a_stream_to(base, error, warning):
    found_error, found_warning = stream_url_problems(base)
    assert bool(found_error) is error and bool(found_warning) is warning, (found_error, found_warning)
    if error:
        assert "wss://" in found_error and "ws://" in found_error and "443" in found_error


@pytest.fixture
def served(monkeypatch, tmp_path):
    """`serve` up to the bridge: what it would have served, the bridge itself returns at once."""
    monkeypatch.chdir(tmp_path)
    seen: list[str | None] = []
    monkeypatch.setattr("twivapi_cli.bridge.server.serve_forever",
                        lambda settings, **kwargs: seen.append(settings.public_url))
    return seen


SERVE_ENV = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "VAPI_API_KEY": "k"}


def test_serve_in_stream_mode_stops_at_once_on_a_public_url_that_is_not_https(served):
    result = runner.invoke(app, ["serve", "--public-url", "http://bridge.example.com"], env=SERVE_ENV)
    assert result.exit_code == 2, result.output
    assert "TWIVAPI_PUBLIC_URL" in result.output and "ws://bridge.example.com" in result.output
    assert "wss://" in result.output and "--allow-ws" in result.output
    assert served == []


def test_serve_without_a_public_url_on_a_non_loopback_host_stops_too(served):
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"], env=SERVE_ENV)
    assert result.exit_code == 2 and "TWIVAPI_PUBLIC_URL is not set" in result.output, result.output
    assert served == []


@pytest.mark.parametrize("args, warned", [
    (["--public-url", "http://127.0.0.1:8080"], False),                 # loopback: the simulators
    (["--public-url", "http://bridge.example.com", "--allow-ws"], True),  # said so explicitly
    (["--public-url", "https://bridge.example.com:8443"], True),         # only a warning: port 443
    (["--public-url", "http://bridge.example.com", "--mode", "bypass"], False),   # no stream of ours
    (["--public-url", "https://bridge.example.com"], False),
])
def test_serve_starts_when_twilio_can_open_the_stream_or_when_told(served, args, warned):
    result = runner.invoke(app, ["serve", *args], env=SERVE_ENV)
    assert result.exit_code == 0, result.output
    assert served and served[0] == args[1]
    assert ("twivapi: warning: TWIVAPI_PUBLIC_URL" in result.output) is warned, result.output


def test_doctor_checks_the_stream_url(tmp_path, monkeypatch):
    import json
    monkeypatch.chdir(tmp_path)

    def doctor(public: str) -> dict:
        result = runner.invoke(app, ["doctor", "--json"], env={"TWIVAPI_PUBLIC_URL": public})
        checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
        return checks["media stream URL (stream mode)"]
    plain = doctor("http://bridge.example.com")
    assert not plain["ok"] and "wss://" in plain["found"] and "https://" in plain["fix"]
    port = doctor("https://bridge.example.com:8443")
    assert not port["ok"] and port["found"].startswith("warning") and "443" in port["fix"]
    good = doctor("https://bridge.example.com")
    assert good["ok"] and good["found"] == "wss://bridge.example.com/twilio/media"


@pytest.mark.parametrize("url, refused", [
    ("ws://bridge.example.com/twilio/media", True),
    ("ws://127.0.0.1:9/twilio/media", False),     # loopback: tried (nothing listens there)
])
def test_the_simulated_caller_refuses_a_ws_stream_url_to_a_host_that_is_not_loopback(url, refused):
    async def go() -> CallResult:
        caller = SimulatedCaller(TOKEN)
        result = CallResult("CA" + "0" * 32)
        try:
            await caller.obey(f'<Response><Connect><Stream url="{url}"/></Connect></Response>', result,
                              CallerPlan(hangup_after_s=0.1))
        finally:
            await caller.aclose()
        return result
    result = asyncio.run(go())
    assert any(e.startswith("31922") for e in result.errors) is refused, result.errors
    assert (not refused) == any(e.startswith("stream connect failed") for e in result.errors)


# --- 4. messages as Twilio sends them (the simulated caller, replay) ----------------------------------

class TwilioSide:
    """A server in Twilio's customer's place: answers <Connect action><Stream>, keeps every media
    message, status callback and action request it gets; ``close_after`` media frames it closes the
    stream itself (else it waits for the caller's stop)."""

    def __init__(self, close_after: int | None = None):
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route, WebSocketRoute

        from twivapi_cli.bridge.server import bind, start_in_thread

        self.close_after = close_after
        self.messages: list[dict] = []
        self.status: list[dict] = []
        self.after: list[dict] = []
        sock = bind()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

        async def voice(request):
            twiml = (f'<Response><Connect action="{self.url}/after"><Stream url="{self.url.replace("http", "ws")}'
                     '/media"><Parameter name="callSid" value="x" /><Parameter name="twivapiToken" value="t" />'
                     '</Stream></Connect></Response>')
            return Response(twiml, media_type="text/xml")

        async def status(request):
            self.status.append(dict(parse_qsl((await request.body()).decode(), keep_blank_values=True)))
            return Response(status_code=204)

        async def after(request):
            self.after.append(dict(parse_qsl((await request.body()).decode(), keep_blank_values=True)))
            return Response("<Response><Hangup/></Response>", media_type="text/xml")

        async def media(ws):
            await ws.accept()
            frames = 0
            try:
                while True:
                    message = json.loads(await ws.receive_text())
                    self.messages.append(message)
                    frames += message["event"] == "media"
                    if message["event"] == "stop" or (self.close_after and frames >= self.close_after):
                        break
            except Exception:   # the caller went away
                return
            await ws.close()

        app = Starlette(routes=[Route("/voice", voice, methods=["POST"]), Route("/status", status, methods=["POST"]),
                                Route("/after", after, methods=["POST"]), WebSocketRoute("/media", media)])
        self.server = start_in_thread(app, sock=sock)

    def of(self, event: str) -> list[dict]:
        return [m for m in self.messages if m["event"] == event]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def twilio_side(request):
    side = TwilioSide(**getattr(request, "param", {}))
    yield side
    side.stop()


def _call(side: TwilioSide, plan: CallerPlan, **options) -> CallResult:
    async def go():
        caller = SimulatedCaller(TOKEN)
        try:
            return await caller.call(side.url + "/voice", plan=plan, status_callback=side.url + "/status", **options)
        finally:
            await caller.aclose()
    return asyncio.run(go())


def test_the_simulated_callers_media_messages_are_numbered_and_timed_like_twilios(twilio_side):
    result = _call(twilio_side, CallerPlan(hangup_after_s=0.2))
    assert not result.errors, result.errors
    connected, start = twilio_side.messages[:2]
    assert connected["event"] == "connected" and "sequenceNumber" not in connected
    assert start["event"] == "start" and start["sequenceNumber"] == "1"       # from 1, at start
    assert start["start"]["customParameters"] == {"callSid": "x", "twivapiToken": "t"}   # the TwiML's
    numbers = [int(m["sequenceNumber"]) for m in twilio_side.messages[1:]]
    assert numbers == list(range(1, len(numbers) + 1))
    media = twilio_side.of("media")
    assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, len(media) + 1)]
    assert [int(m["media"]["timestamp"]) for m in media] == [20 * n for n in range(len(media))]   # from 0


def test_a_numbers_call_gets_only_the_completed_callback_with_what_twilio_puts_in_it(twilio_side, sims):
    import email.utils
    client = sims.running.twilio_client()
    offered = client.available_phone_numbers("US").local.list(area_code=415, limit=1)
    number = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number,
                                                  voice_url=twilio_side.url + "/voice",
                                                  status_callback=twilio_side.url + "/status")
    call = sims.state.twilio.start_inbound_call(to=number.phone_number, from_="+15551230009")
    assert call.status_callback_events == ["completed"]
    result = _call(twilio_side, CallerPlan(hangup_after_s=0.2), call_sid=call.sid,
                   status_callback_events=call.status_callback_events)
    assert not result.errors, result.errors
    assert [s["CallStatus"] for s in twilio_side.status] == ["completed"]
    final = twilio_side.status[0]
    assert final["SequenceNumber"] == "0" and final["CallbackSource"] == "call-progress-events"
    assert email.utils.parsedate_to_datetime(final["Timestamp"]).utcoffset().total_seconds() == 0
    assert final["Timestamp"].endswith("+0000")
    assert final["CallDuration"].isdigit() and final["Duration"].isdigit()


def test_status_callback_events_asked_for_come_numbered_from_0(twilio_side):
    _call(twilio_side, CallerPlan(hangup_after_s=0.2),
          status_callback_events=["initiated", "ringing", "answered", "completed"])
    assert [(s["CallStatus"], s["SequenceNumber"]) for s in twilio_side.status] == [
        ("initiated", "0"), ("ringing", "1"), ("in-progress", "2"), ("completed", "3")]
    assert "CallDuration" not in twilio_side.status[1] and "Duration" in twilio_side.status[3]


def test_the_connect_action_after_a_hang_up_carries_the_final_call_status(twilio_side):
    result = _call(twilio_side, CallerPlan(hangup_after_s=0.2))
    assert result.hung_up and [a["CallStatus"] for a in twilio_side.after] == ["completed"]


@pytest.mark.parametrize("twilio_side", [{"close_after": 5}], indirect=True)
def test_the_connect_action_after_the_server_closed_the_stream_is_in_progress(twilio_side):
    result = _call(twilio_side, CallerPlan(hangup_after_s=None))
    assert not result.hung_up and [a["CallStatus"] for a in twilio_side.after] == ["in-progress"]
    assert [s["CallStatus"] for s in twilio_side.status] == ["completed"]


def test_replays_media_messages_are_numbered_and_timed_like_twilios(twilio_side, tmp_path):
    fixture = {"name": "timing", "steps": [
        {"twilio": "voice", "path": "/voice", "capture": {"stream_url": "twiml:Connect/Stream/@url"}},
        {"media": "open"}, {"media": "audio", "ms": 100}, {"media": "wait", "ms": 300},
        {"media": "audio", "ms": 40}, {"media": "stop"}]}
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(fixture))
    result = runner.invoke(app, ["replay", str(path), "--target", twilio_side.url, "--json"],
                           env={"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET})
    assert result.exit_code == 0, result.output
    connected, start = twilio_side.messages[:2]
    assert "sequenceNumber" not in connected and start["sequenceNumber"] == "1"
    assert start["start"]["customParameters"] == {"callSid": "x", "twivapiToken": "t"}   # the voice TwiML's
    stamps = [int(m["media"]["timestamp"]) for m in twilio_side.of("media")]
    assert len(stamps) == 7 and stamps[0] < 20 and stamps == sorted(stamps)
    assert stamps[5] - stamps[4] >= 300   # the wait: time went on, as it does on a real stream
