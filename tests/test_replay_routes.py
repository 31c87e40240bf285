"""`twivapi replay --route/--profile`: the bundled fixtures against a foreign server that serves the
Twilio and Vapi webhooks under its own paths and validates Twilio's signature for ITS URL (with the
twilio SDK's validator); the 404 hint for an unmapped route; the project file and its precedence;
malformed mappings exit 2."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator
from typer.testing import CliRunner

from twivapi_cli import audio
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.cli import app
from twivapi_cli.twilio_media import ws_url

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TOKEN = "acme-twilio-token"
SECRET = "acme-vapi-secret"
ENDED = {"completed", "canceled", "failed", "busy", "no-answer"}
ACME_ROUTES = {"twilio.voice": "/voice/incoming", "twilio.status": "/voice/status-callback",
               "twilio.after-stream": "/voice/stream-done", "vapi": "/hooks/vapi", "media": "/streams/twilio"}
ROUTE_FLAGS = [arg for name, path in ACME_ROUTES.items() for arg in ("--route", f"{name}={path}")]
FRAME = 160   # 20 ms of 8 kHz mu-law


class Acme:
    """Someone else's voice server: its own paths, Twilio signatures checked for its own URL (the
    request's, or ``public`` + path behind a proxy), X-Vapi-Secret checked, a Media Streams socket
    that greets, stops talking when the caller talks (clear) and answers when they stop; a call ended
    by a status callback or by Vapi gets its socket closed."""

    def __init__(self, public: str | None = None) -> None:
        self.public = public
        self.validator = RequestValidator(TOKEN)
        self.hits: list[tuple[str, int]] = []
        self.ended: set[str] = set()
        self.sockets: dict[str, WebSocket] = {}
        self.server = start_in_thread(Starlette(routes=[
            Route(ACME_ROUTES["twilio.voice"], self.voice, methods=["POST"]),
            Route(ACME_ROUTES["twilio.status"], self.status, methods=["POST"]),
            Route(ACME_ROUTES["twilio.after-stream"], self.after_stream, methods=["POST"]),
            Route(ACME_ROUTES["vapi"], self.vapi, methods=["POST"]),
            WebSocketRoute(ACME_ROUTES["media"], self.media)]))
        self.url = self.server.url

    def own_url(self, url) -> str:
        if self.public is None:
            return str(url)
        return (ws_url(self.public) if url.scheme.startswith("ws") else self.public) + url.path + (
            f"?{url.query}" if url.query else "")

    async def signed(self, request: Request) -> dict | None:
        """The form (or JSON) parameters when the signature is Twilio's for our URL, else None."""
        signature = request.headers.get("x-twilio-signature", "")
        if request.headers.get("content-type", "").startswith("application/json"):
            body = (await request.body()).decode()
            return json.loads(body) if self.validator.validate(self.own_url(request.url), body, signature) else None
        params = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        return params if self.validator.validate(self.own_url(request.url), params, signature) else None

    def answer(self, request: Request, response: Response) -> Response:
        self.hits.append((request.url.path, response.status_code))
        return response

    async def voice(self, request: Request) -> Response:
        if await self.signed(request) is None:
            return self.answer(request, Response("bad signature", status_code=403))
        stream = ws_url(self.public or self.url) + ACME_ROUTES["media"]
        return self.answer(request, Response(f'<Response><Connect><Stream url="{stream}"/></Connect></Response>',
                                             media_type="text/xml"))

    async def status(self, request: Request) -> Response:
        params = await self.signed(request)
        if params is None:
            return self.answer(request, Response("bad signature", status_code=403))
        if params.get("CallStatus") in ENDED:
            await self.end(params.get("CallSid", ""))
        return self.answer(request, Response(status_code=204))

    async def after_stream(self, request: Request) -> Response:
        if await self.signed(request) is None:
            return self.answer(request, Response("bad signature", status_code=403))
        return self.answer(request, Response("<Response><Hangup/></Response>", media_type="text/xml"))

    async def vapi(self, request: Request) -> Response:
        if request.headers.get("x-vapi-secret") != SECRET:
            return self.answer(request, JSONResponse({"error": "unauthorized"}, status_code=403))
        message = json.loads(await request.body())["message"]
        kind, call_sid = message["type"], (message.get("call") or {}).get("phoneCallProviderId", "")
        if kind == "tool-calls":
            results = []
            for call in message["toolCallList"]:
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"] or "{}")
                results.append({"toolCallId": call["id"], "result": f"order {args['order_id']} is shipped"}
                               if name == "lookup_order" else {"toolCallId": call["id"], "error": f"no tool {name}"})
            return self.answer(request, JSONResponse({"results": results}))
        if kind == "assistant-request":
            return self.answer(request, JSONResponse({"assistantId": "asst-acme"}))
        if kind == "end-of-call-report" or (kind == "status-update" and message.get("status") == "ended"):
            await self.end(call_sid)
        return self.answer(request, JSONResponse({}))

    async def end(self, call_sid: str) -> None:
        self.ended.add(call_sid)
        socket = self.sockets.pop(call_sid, None)
        if socket is not None:
            try:
                await socket.close()
            except RuntimeError:
                pass

    async def media(self, ws: WebSocket) -> None:
        if not self.validator.validate(self.own_url(ws.url), {}, ws.headers.get("x-twilio-signature", "")):
            self.hits.append((ws.url.path, 403))
            await ws.close(code=1008)
            return
        await ws.accept()
        self.hits.append((ws.url.path, 101))
        stream_sid, call_sid, talking, quiet = None, "", False, 0
        try:
            async for text in ws.iter_text():
                event = json.loads(text)
                if event["event"] == "start":
                    stream_sid, call_sid = event["start"]["streamSid"], event["start"]["callSid"]
                    if call_sid in self.ended:
                        await ws.close()
                        return
                    self.sockets[call_sid] = ws
                    await self.say(ws, stream_sid, 2000, "greeting")
                elif event["event"] == "media":
                    loud = audio.rms_dbfs(audio.ulaw_to_pcm16(base64.b64decode(event["media"]["payload"]))) > -40
                    if loud and not talking:    # the caller talks over us: stop our audio at once
                        talking, quiet = True, 0
                        await ws.send_text(json.dumps({"event": "clear", "streamSid": stream_sid}))
                    elif talking and not loud:
                        quiet += 1
                        if quiet == 10:           # 200 ms of quiet: they are done, answer
                            talking = False
                            await self.say(ws, stream_sid, 1500, "reply")
                elif event["event"] == "stop":
                    self.sockets.pop(call_sid, None)
                    await ws.close()
                    return
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.sockets.get(call_sid) is ws:
                del self.sockets[call_sid]

    @staticmethod
    async def say(ws: WebSocket, stream_sid: str | None, ms: int, mark: str) -> None:
        speech = audio.pcm16_to_ulaw(audio.tone(440, ms, 8000, 0.3))
        for i in range(0, len(speech), FRAME):
            payload = base64.b64encode(speech[i:i + FRAME]).decode()
            await ws.send_text(json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}))
        await ws.send_text(json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": mark}}))


@pytest.fixture(scope="module")
def acme():
    server = Acme()
    yield server
    server.server.stop()


def replay(*args, env=None):
    return runner.invoke(app, ["replay", *map(str, args)], env={"TWILIO_AUTH_TOKEN": TOKEN,
                                                               "VAPI_WEBHOOK_SECRET": SECRET, **(env or {})})


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def write(tmp_path: Path, steps: list, name: str = "case") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "steps": steps}))
    return path


def test_every_bundled_fixture_passes_against_a_foreign_server_once_its_routes_are_mapped(acme):
    before = len(acme.hits)
    # all but backchannel: Acme clears on any caller audio (its own barge-in), not only when Vapi interrupts;
    # and transfer: Acme has no call control (no transfer destinations, no Twilio account to redirect calls in)
    bundled = [p for p in sorted((ROOT / "fixtures").glob("*.json"))
               if p.stem not in ("schema", "backchannel", "transfer")]
    result = replay(*bundled, "--target", acme.url, *ROUTE_FLAGS, "--json")
    steps = lines(result)
    assert result.exit_code == 0, [s for s in steps if not s["ok"]] or result.output
    assert {s["fixture"] for s in steps} == {
        "inbound_call", "barge_in", "rapid_interruptions", "hangup_before_ready", "status_callbacks_out_of_order",
        "duplicate_webhook_retry", "tool_call", "end_of_call_report", "bad_signature", "bypass_mode"}
    assert all(s["ok"] for s in steps) and not any(s["status"] == 404 for s in steps)
    hits = acme.hits[before:]
    assert {path for path, _ in hits} == set(ACME_ROUTES.values()) - {"/voice/stream-done"}
    assert not [h for h in hits if h[1] == 404]
    # the only refusals are bad_signature's six forged requests: every signed one was valid for Acme's URL
    assert sum(1 for _, status in hits if status == 403) == 6
    assert "routes (--route): twilio.voice=/voice/incoming" in result.stderr


def test_without_the_mapping_each_404_names_the_route_to_map(acme):
    result = replay(ROOT / "fixtures" / "tool_call.json", ROOT / "fixtures" / "bad_signature.json",
                    "--target", acme.url, "--json")
    assert result.exit_code == 1
    steps = lines(result)
    assert all(s["status"] == 404 and not s["ok"] for s in steps)
    by_label = {(s["fixture"], s["label"]): s["problems"] for s in steps}
    assert by_label["tool_call", "twilio status completed"] == [
        "status 404, expected 200 or 204",
        "the target has no route for twilio.status: map it with --route twilio.status=PATH"]
    assert by_label["tool_call", "vapi tool-calls"][-1] == "the target has no route for vapi: map it with --route vapi=PATH"
    assert by_label["bad_signature", "a correctly signed request still works"][-1] == (
        "the target has no route for twilio.voice: map it with --route twilio.voice=PATH")
    # the human report says it too
    text = replay(ROOT / "fixtures" / "tool_call.json", "--target", acme.url, env={"COLUMNS": "400"})
    assert text.exit_code == 1 and "map it with --route twilio.voice=PATH" in text.stdout


def test_the_hint_is_only_for_an_unmapped_default_path(acme, tmp_path):
    steps = [{"twilio": "voice", "path": "/nowhere", "expect": {"status": 200}},      # an explicit path: kept
             {"twilio": "status", "expect": {"status": 204}},                        # mapped, but wrongly
             {"twilio": "voice", "expect": {"status": 404}},                         # 404 expected: met
             {"vapi": {"type": "status-update", "status": "ended"}, "expect": {"status": 200}}]   # mapped: fine
    result = replay(write(tmp_path, steps), "--target", acme.url, "--route", "twilio.status=/gone",
                    "--route", "vapi=/hooks/vapi", "--json")
    assert result.exit_code == 1
    problems = [s["problems"] for s in lines(result)]
    assert problems == [["status 404, expected 200"], ["status 404, expected 204"], [], []]


def test_the_signature_is_for_the_mapped_url_behind_a_public_url(tmp_path):
    acme = Acme(public="https://acme.example.test")
    try:
        steps = [{"twilio": "voice", "json_body": True, "expect": {"status": 200}},
                 {"twilio": "status", "params": {"CallStatus": "in-progress"}, "expect": {"status": 204}},
                 {"media": "open", "name": "no TwiML captured: the socket URL is built from the media route"},
                 {"media": "wait", "ms": 300, "expect": {"media": {"min_audio_ms": 100}}},
                 {"media": "stop", "expect": {"media": {"closed": True}}}]
        result = replay(write(tmp_path, steps), ROOT / "fixtures" / "bad_signature.json", "--target", acme.url,
                        "--public-url", "https://acme.example.test", *ROUTE_FLAGS, "--json")
        assert result.exit_code == 0, lines(result)
        assert ("/streams/twilio", 101) in acme.hits and ("/voice/status-callback", 204) in acme.hits
        # the same run against the loopback URL (what Acme does not validate) is refused, not a 404
        wrong = replay(write(tmp_path, steps[:2]), "--target", acme.url, *ROUTE_FLAGS, "--json")
        assert [s["status"] for s in lines(wrong)] == [403, 403]
    finally:
        acme.server.stop()


def test_media_open_without_a_stream_url_suggests_the_media_route(acme, tmp_path):
    result = replay(write(tmp_path, [{"media": "open"}]), "--target", acme.url, "--json")
    assert result.exit_code == 1
    assert lines(result)[0]["problems"] == [
        "no stream URL: capture one from the voice TwiML or give url, or map --route media=PATH"]


def test_project_file_then_profile_then_route_flags(acme, tmp_path, monkeypatch):
    steps = [{"twilio": "voice", "expect": {"status": 200}}, {"twilio": "status", "expect": {"status": [200, 204]}},
             {"vapi": {"type": "assistant-request"}, "expect": {"status": 200}}]
    fixture = write(tmp_path, steps)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    (project / "twivapi.toml").write_text(
        '[tool.other]\nx = 1\n\n[replay.routes]\ntwilio.voice = "/voice/incoming"\n'
        '"twilio.status" = "/voice/status-callback"\nvapi = "/hooks/vapi"\n')
    result = replay(fixture, "--target", acme.url, "--json")   # no flags: the project file is read
    assert result.exit_code == 0, result.output
    assert "routes (twivapi.toml)" in result.stderr
    # --route overrides one entry of it
    result = replay(fixture, "--target", acme.url, "--route", "vapi=/elsewhere", "--json")
    assert [s["status"] for s in lines(result)] == [200, 204, 404] and result.exit_code == 1
    assert "routes (twivapi.toml, --route)" in result.stderr
    # --profile replaces the project file
    profile = tmp_path / "acme.toml"
    profile.write_text('[replay.routes]\n"twilio.voice" = "/voice/incoming"\n')
    result = replay(fixture, "--target", acme.url, "--profile", profile, "--json")
    assert [s["status"] for s in lines(result)] == [200, 404, 404]
    assert lines(result)[1]["problems"][-1].endswith("--route twilio.status=PATH")
    # --in-process ignores the project file (it describes the user's server, not our bridge)
    result = replay(fixture, "--in-process", "--json")
    assert result.exit_code == 0, result.output


def test_a_project_file_without_replay_routes_changes_nothing(acme, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twivapi.toml").write_text("[other]\nname = 'x'\n")
    result = replay(write(tmp_path, [{"twilio": "voice"}]), "--target", acme.url, "--json")
    assert result.exit_code == 0 and "routes" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--route", "twilio.status"], "--route 'twilio.status': use NAME=PATH"),
    (["--route", "twilio.stauts=/x"], "unknown route 'twilio.stauts' (known: twilio.voice, twilio.status"),
    (["--route", "vapi=webhook/vapi"], "--route 'vapi=webhook/vapi': the path for vapi must be a string "
                                       "starting with / (got 'webhook/vapi')"),
    (["--route", "=/x"], "use NAME=PATH"),
    (["--profile", "missing.toml"], "--profile missing.toml: cannot read"),
])
def test_malformed_mappings_exit_2_naming_the_flag(acme, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    before = len(acme.hits)
    result = replay(write(tmp_path, [{"twilio": "voice"}]), "--target", acme.url, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(acme.hits) == before   # nothing was sent


@pytest.mark.parametrize("content, message", [
    ("[replay.routes\n", "not valid TOML"),
    ("[replay]\ntarget = 'x'\n", "unknown key replay.target"),
    ("[replay.routes]\nvoice = '/v'\n", "[replay.routes]: unknown route 'voice'"),
    ("[replay.routes]\nvapi = 3\n", "[replay.routes]: the path for vapi must be a string starting with / (got 3)"),
    ("[replay]\nroutes = 'x'\n", "no [replay.routes] table"),
])
def test_a_bad_project_file_or_profile_exits_2_naming_it(acme, tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    fixture = write(tmp_path, [{"twilio": "voice"}])
    (tmp_path / "twivapi.toml").write_text(content)
    result = replay(fixture, "--target", acme.url)
    assert result.exit_code == 2 and "twivapi.toml: " in result.stderr and message in result.stderr, result.output
    profile = tmp_path / "p.toml"
    profile.write_text(content)
    result = replay(fixture, "--target", acme.url, "--profile", profile)
    assert result.exit_code == 2 and f"--profile {profile}: " in result.stderr and message in result.stderr


def test_a_profile_must_have_the_table(tmp_path, acme):
    profile = tmp_path / "empty.toml"
    profile.write_text("[other]\nx = 1\n")
    result = replay(write(tmp_path, [{"twilio": "voice"}]), "--target", acme.url, "--profile", profile)
    assert result.exit_code == 2 and "no [replay.routes] table" in result.stderr


def test_route_flags_are_for_a_target_not_in_process(tmp_path):
    result = replay(write(tmp_path, [{"twilio": "voice"}]), "--in-process", "--route", "vapi=/x")
    assert result.exit_code == 2 and "--in-process" in result.stderr
