"""`twivapi replay` and `twivapi fixtures`: bundled fixtures against the bridge, signatures checked
by twilio's own validator, every expectation kind failing with a message, exit codes 0/1/2/3."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from typer.testing import CliRunner

from twivapi_cli import fixtures as fx
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TOKEN = "replay-test-token"
SECRET = "replay-test-secret"


class Sink:
    """A trivial server that records what replay sends and answers like a bridge would."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.server = start_in_thread(Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])]))
        self.url = self.server.url

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append({"url": str(request.url), "headers": dict(request.headers), "body": body,
                              "path": request.url.path})
        if request.url.path == "/twilio/voice":
            return Response('<Response><Connect><Stream url="wss://sink/twilio/media"/></Connect></Response>',
                            media_type="text/xml")
        if request.url.path == "/vapi/webhook":
            return JSONResponse({"results": [{"toolCallId": "call_1", "result": "fine"}]})
        return Response(status_code=204)


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.server.stop()


def write(tmp_path: Path, steps: list, **extra) -> Path:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"name": "case", "steps": steps, **extra}))
    return path


def replay(*args, env=None):
    return runner.invoke(app, ["replay", *map(str, args)], env={"TWILIO_AUTH_TOKEN": TOKEN,
                                                               "VAPI_WEBHOOK_SECRET": SECRET, **(env or {})})


def test_every_bundled_fixture_passes_against_the_bridge_in_process():
    result = replay(ROOT / "fixtures", "--in-process", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]   # --json: nothing else on stdout
    names = {line["fixture"] for line in lines}
    assert names == {"inbound_call", "barge_in", "rapid_interruptions", "hangup_before_ready",
                     "status_callbacks_out_of_order", "duplicate_webhook_retry", "tool_call",
                     "end_of_call_report", "bad_signature", "bypass_mode", "backchannel", "transfer"}
    assert all(line["ok"] for line in lines)


def test_signatures_are_what_twilio_would_send(sink, tmp_path):
    steps = [{"twilio": "voice"}, {"twilio": "status", "params": {"CallStatus": "completed", "Blank": ""}},
             {"twilio": "voice", "json_body": True}]
    assert replay(write(tmp_path, steps), "--target", sink.url, "--public-url", "https://pub.example.com").exit_code == 0
    validator = RequestValidator(TOKEN)
    for request in sink.requests[-3:]:
        signed_url = "https://pub.example.com" + request["url"][len(sink.url):]
        signature = request["headers"]["x-twilio-signature"]
        assert request["headers"]["i-twilio-idempotency-token"]
        if request["headers"]["content-type"].startswith("application/json"):
            assert validator.validate(signed_url, request["body"].decode(), signature)
            continue
        from urllib.parse import parse_qsl
        params = dict(parse_qsl(request["body"].decode(), keep_blank_values=True))
        assert validator.validate(signed_url, params, signature)
        assert not validator.validate(signed_url + "x", params, signature)
        assert not RequestValidator(TOKEN + "x").validate(signed_url, params, signature)
        last = params["CallSid"][-1]
        changed = {**params, "CallSid": params["CallSid"][:-1] + ("1" if last == "0" else "0")}
        assert not validator.validate(signed_url, changed, signature)


def test_set_overrides_a_variable(sink, tmp_path):
    replay(write(tmp_path, [{"twilio": "voice"}]), "--target", sink.url, "--set", "call.from=+15550001111")
    assert b"From=%2B15550001111" in sink.requests[-1]["body"]


@pytest.mark.parametrize("expect, message", [
    ({"status": 500}, "status 200, expected 500"),
    ({"content_type": "application/json"}, "content type"),
    ({"twiml": {"Connect/Stream/@url": "wss://elsewhere"}}, "TwiML Connect/Stream/@url: 'wss://sink/twilio/media'"),
    ({"twiml": {"Say": True}}, "TwiML Say: missing"),
    ({"max_ms": 0.001}, "budget 0.001 ms"),
])
def test_each_http_expectation_fails_with_what_differed(sink, tmp_path, expect, message):
    result = replay(write(tmp_path, [{"twilio": "voice", "expect": expect}]), "--target", sink.url, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout.splitlines()[0])["problems"]
    assert any(message in problem for problem in problems), problems


def test_json_path_expectation_fails_with_what_differed(sink, tmp_path):
    step = {"vapi": {"type": "tool-calls", "toolCallList": []}, "expect": {"json": {"results.0.result": "other"}}}
    result = replay(write(tmp_path, [step]), "--target", sink.url, "--json")
    assert result.exit_code == 1
    line = json.loads(result.stdout.splitlines()[0])
    assert line["problems"] == ["JSON results.0.result: 'fine', expected 'other'"]


def test_media_expectations_fail_with_what_differed(tmp_path):
    steps = [{"twilio": "voice", "capture": {"stream_url": "twiml:Connect/Stream/@url"}}, {"media": "open"},
             {"media": "audio", "ms": 600},
             {"media": "audio", "tone_hz": 300, "ms": 400, "expect": {"media": {"no_clear": True}}},
             {"media": "wait", "ms": 100, "expect": {"media": {"min_audio_ms": 100000, "closed": True}}}]
    result = replay(write(tmp_path, steps), "--in-process", "--json")
    assert result.exit_code == 1
    problems = [p for line in result.stdout.splitlines() for p in json.loads(line)["problems"]]
    assert "1 clear(s), expected none" in problems
    assert any(p.startswith("heard") and "expected at least 100000 ms" in p for p in problems)
    assert "the server did not close the socket" in problems


@pytest.mark.parametrize("settle_ms, exit_code", [(None, 0), (0, 1)])
def test_a_wait_gives_audio_and_marks_still_expected_time_to_arrive(tmp_path, settle_ms, exit_code):
    # 300 ms is too short for a 1.5 s greeting: only the settle time lets the wait see all of it played
    wait = {"media": "wait", "ms": 300, "expect": {"media": {"min_audio_ms": 1500, "marks_echoed": True}}}
    if settle_ms is not None:
        wait["settle_ms"] = settle_ms
    steps = [{"twilio": "voice", "capture": {"stream_url": "twiml:Connect/Stream/@url"}}, {"media": "open"}, wait]
    result = replay(write(tmp_path, steps, assistant={"greeting_ms": 1500}), "--in-process", "--json")
    assert result.exit_code == exit_code, result.stdout


@pytest.mark.parametrize("content, where", [
    ('{"name": "x"}', "field 'steps'"),
    ('{"name": "x", "steps": [{"twilio": "voice"}, {"twilio": "ringing"}]}', "step 1, field 'twilio'"),
    ('{"name": "x", "steps": [{"twilio": "voice", "vapi": {"type": "hang"}}]}', "step 0"),
    ('{"name": "x", "steps": [{"media": "audio", "ms": 100, "tone_hz": 9000}]}', "step 0, field 'tone_hz'"),
    ('{"name": "x", "steps": [{"twilio": "voice", "expect": {"stauts": 200}}]}', "step 0, field 'expect.stauts'"),
    ("{not json", "not valid JSON"),
])
def test_malformed_fixtures_exit_2_naming_file_step_field(tmp_path, content, where, sink):
    path = tmp_path / "bad.json"
    path.write_text(content)
    sent_before = len(sink.requests)     # the sink is shared by the module: count only this run's requests
    result = replay(path, "--target", sink.url)
    assert result.exit_code == 2
    assert str(path) in result.output and where in result.output
    assert sink.requests[sent_before:] == []
    assert runner.invoke(app, ["fixtures", "validate", str(path)]).exit_code == 2


def test_a_bad_fixture_stops_the_run_before_anything_is_sent(tmp_path, sink):
    good = tmp_path / "a_good.json"
    good.write_text(json.dumps({"name": "good", "steps": [{"twilio": "voice"}]}))
    (tmp_path / "b_bad.json").write_text('{"name": "bad", "steps": []}')
    before = len(sink.requests)
    assert replay(tmp_path, "--target", sink.url).exit_code == 2
    assert len(sink.requests) == before


def test_unreachable_target_exits_3(tmp_path):
    result = replay(write(tmp_path, [{"twilio": "voice"}]), "--target", "http://127.0.0.1:9")
    assert result.exit_code == 3 and "could not be reached" in result.output


def test_a_signed_step_without_a_token_is_a_clear_error(tmp_path, sink):
    result = runner.invoke(app, ["replay", str(write(tmp_path, [{"twilio": "voice"}])), "--target", sink.url],
                           env={"TWILIO_AUTH_TOKEN": ""})
    assert result.exit_code == 2 and "TWILIO_AUTH_TOKEN" in result.output


def test_junit_and_load_mode(tmp_path, sink):
    junit = tmp_path / "out.xml"
    result = replay(write(tmp_path, [{"twilio": "voice"}, {"twilio": "status"}]), "--target", sink.url,
                    "--repeat", "20", "--concurrency", "5", "--junit", junit)
    assert result.exit_code == 0
    assert "latency per step across runs" in result.output and "p99" in result.output
    suites = ET.parse(junit).getroot()
    assert len(suites.findall("testsuite")) == 20 and not suites.findall(".//failure")


def test_schema_file_is_up_to_date():
    assert json.loads((ROOT / "fixtures" / "schema.json").read_text()) == fx.schema()


def test_recording_scrubs_secrets(tmp_path):
    from twivapi_cli.bridge.recording import RecordWebhooks
    recorder = RecordWebhooks(None, tmp_path)
    sid, account = "CA" + "1" * 32, "AC" + "2" * 32
    recorder.record("/twilio/voice", f"CallSid={sid}&AccountSid={account}&From=%2B15550001111".encode(), 200)
    body = json.dumps({"message": {"type": "status-update", "status": "ended", "call": {"phoneCallProviderId": sid},
                                   "phoneNumber": {"twilioAuthToken": "s3cret"}, "serverSecret": "x"}}).encode()
    recorder.record("/vapi/webhook", body, 200)
    text = (tmp_path / f"{sid}.json").read_text()
    assert sid not in text and account not in text and "s3cret" not in text and "serverSecret" not in text
    fixture = fx.load(tmp_path / f"{sid}.json")
    assert [s.kind for s in fixture.steps] == ["twilio", "vapi"]
    assert fixture.steps[0].params["CallSid"] == "{{call_sid}}"


def test_stream_urls_change_only_their_scheme():
    from twivapi_cli.replay import _websocket_url
    assert _websocket_url("https://http-8080-abc.ngrok.app") == "wss://http-8080-abc.ngrok.app"
    assert _websocket_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080"
