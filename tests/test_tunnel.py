"""serve --tunnel through the real pyngrok code path, against a stand-in ngrok agent (installing
ngrok when there is none: tests/test_ngrok_install.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from twivapi_cli.cli import app
from twivapi_cli.config import load_settings
from twivapi_cli.errors import TunnelError
from twivapi_cli.tunnel import open_tunnel, restore, rewire

from .sims import running_sims
from .support import TOKEN, VAPI_KEY, VAPI_SECRET

runner = CliRunner()


@pytest.fixture
def fake_ngrok(tmp_path) -> str:
    path = tmp_path / "ngrok"
    path.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_ngrok.py").read_text())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def sims():
    with running_sims() as running:
        yield running


def settings_env(sims, tmp_path, fake_ngrok, **extra) -> dict:
    return {"TWILIO_ACCOUNT_SID": sims.state.credentials.account_sid, "TWILIO_AUTH_TOKEN": TOKEN,
            "TWILIO_API_BASE_URL": sims.twilio_url, "VAPI_API_KEY": VAPI_KEY, "VAPI_BASE_URL": sims.url,
            "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": "https://old.example.test",
            "TWIVAPI_STATE_DIR": str(tmp_path / "state"), "NGROK_AUTHTOKEN": "ngrok-test-token",
            "TWIVAPI_NGROK_PATH": fake_ngrok, "VAPI_ASSISTANT_ID": "unused", **extra}


def test_tunnel_opens_through_pyngrok_and_closes(tmp_path, fake_ngrok):
    settings = load_settings({}, environ={"NGROK_AUTHTOKEN": "tok", "TWIVAPI_NGROK_PATH": fake_ngrok,
                                          "TWIVAPI_STATE_DIR": str(tmp_path)}, env_file=None)
    tunnel = open_tunnel(settings, 8080)
    try:
        assert tunnel.public_url.startswith("https://") and tunnel.public_url.endswith(".fake-ngrok.test")
    finally:
        tunnel.close()


def test_missing_binary_or_token_fails_fast_with_the_fix(tmp_path, fake_ngrok, monkeypatch):
    typo = load_settings({}, environ={"NGROK_AUTHTOKEN": "t", "TWIVAPI_NGROK_PATH": str(tmp_path / "none")},
                         env_file=None)
    with pytest.raises(TunnelError, match="TWIVAPI_NGROK_PATH=.* is not a file"):
        open_tunnel(typo, 8080)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))                          # no ngrok on PATH
    monkeypatch.setenv("PYNGROK_NGROK_PATH", str(tmp_path / "pyngrok" / "ngrok"))   # nor pyngrok's copy
    no_binary = load_settings({}, environ={"NGROK_AUTHTOKEN": "t"}, env_file=None)
    with pytest.raises(TunnelError, match="not found") as info:   # open_tunnel itself never downloads
        open_tunnel(no_binary, 8080)
    for way_out in ("--yes", "TWIVAPI_NGROK_INSTALL=1", "TWIVAPI_NGROK_PATH", "https://ngrok.com/download"):
        assert way_out in str(info.value)
    assert not (tmp_path / "pyngrok").exists()
    no_token = load_settings({}, environ={"TWIVAPI_NGROK_PATH": fake_ngrok}, env_file=None)
    with pytest.raises(TunnelError, match="NGROK_AUTHTOKEN"):
        open_tunnel(no_token, 8080)


def test_rewire_points_the_number_at_the_tunnel_and_restore_puts_it_back(sims, tmp_path, fake_ngrok):
    env = settings_env(sims, tmp_path, fake_ngrok)
    assert runner.invoke(app, ["provision", "--yes"], env=env).exit_code == 0
    settings = load_settings({}, environ=env, env_file=None)
    number = next(iter(sims.state.twilio.numbers.values()))
    assistant = next(iter(sims.state.vapi.assistants.values()))
    assert asyncio.run(rewire(settings, "https://abc.fake-ngrok.test"))
    assert number["voice_url"] == "https://abc.fake-ngrok.test/twilio/voice"
    assert assistant["server"]["url"] == "https://abc.fake-ngrok.test/vapi/webhook"
    assert assistant["server"]["headers"]["X-Vapi-Secret"] == VAPI_SECRET   # only the URL changed
    assert asyncio.run(restore(settings))
    assert number["voice_url"] == "https://old.example.test/twilio/voice"
    assert assistant["server"]["url"] == "https://old.example.test/vapi/webhook"
    assert not asyncio.run(restore(settings))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_tunnel_end_to_end_restores_on_sigterm(sims, tmp_path, fake_ngrok):
    env = settings_env(sims, tmp_path, fake_ngrok)
    assert runner.invoke(app, ["provision", "--yes"], env=env).exit_code == 0
    port = _free_port()
    twivapi = str(Path(sys.executable).with_name("twivapi"))
    proc = subprocess.Popen([twivapi, "serve", "--tunnel", "--port", str(port), "--log-level", "warning"],
                            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    number = next(iter(sims.state.twilio.numbers.values()))
    try:
        deadline = time.monotonic() + 20
        while "fake-ngrok.test" not in (number.get("voice_url") or ""):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        while True:   # the bridge starts listening right after the rewiring
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert number["voice_url"] == "https://old.example.test/twilio/voice"
    with proc.stderr:
        assert "ngrok-test-token" not in proc.stderr.read()


# --- `twivapi tunnel`: a user's own server behind the tunnel ---------------------------------------

def agent_app(public: dict):
    """A stand-in for a user's agent server: its own paths, checking Twilio's signature for the URL
    Twilio called (the tunnel's, once known), as such a server does."""
    from urllib.parse import parse_qsl

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from twilio.request_validator import RequestValidator

    async def voice(request):
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        url = public.get("url", "") + request.url.path
        if not RequestValidator(TOKEN).validate(url, form, request.headers.get("X-Twilio-Signature", "")):
            return Response(status_code=403)
        return Response("<Response><Say>Hello from my own server</Say></Response>", media_type="text/xml")

    async def status(request):
        return Response(status_code=204)

    async def vapi(request):
        return JSONResponse({})

    return Starlette(routes=[Route("/hooks/voice", voice, methods=["POST"]),
                             Route("/hooks/status", status, methods=["POST"]), Route("/hooks/vapi", vapi, methods=["POST"])])


def test_tunnel_command_points_the_number_at_the_users_paths_and_restores(sims, tmp_path, fake_ngrok):
    from twivapi_cli.bridge.server import start_in_thread
    from twivapi_cli.signing import twilio_signature

    env = settings_env(sims, tmp_path, fake_ngrok)
    assert runner.invoke(app, ["provision", "--yes"], env=env).exit_code == 0
    public: dict = {}
    agent = start_in_thread(agent_app(public))
    port = int(agent.url.rsplit(":", 1)[1])
    twivapi = str(Path(sys.executable).with_name("twivapi"))
    proc = subprocess.Popen([twivapi, "tunnel", "--port", str(port), "--voice-path", "/hooks/voice",
                             "--status-path", "/hooks/status", "--vapi-path", "/hooks/vapi"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    number = next(iter(sims.state.twilio.numbers.values()))
    assistant = next(iter(sims.state.vapi.assistants.values()))
    try:
        line = proc.stdout.readline()   # TWIVAPI_PUBLIC_URL=https://<name>.fake-ngrok.test, once rewired
        assert line.startswith("TWIVAPI_PUBLIC_URL=https://"), proc.stderr.read() if proc.poll() is not None else line
        public["url"] = url = line.strip().split("=", 1)[1]
        assert number["voice_url"] == url + "/hooks/voice" and number["status_callback"] == url + "/hooks/status"
        assert assistant["server"]["url"] == url + "/hooks/vapi"
        assert assistant["server"]["headers"]["X-Vapi-Secret"] == VAPI_SECRET
        # a call to the number: Twilio requests the tunnel's URL, which ngrok hands to the server unchanged
        call = sims.state.twilio.start_inbound_call(to=number["phone_number"], from_="+15551230009")
        params = {"CallSid": call.sid, "From": "+15551230009", "To": number["phone_number"], "CallStatus": "ringing"}
        answer = httpx.post(agent.url + httpx.URL(call.url).path, data=params,
                            headers={"X-Twilio-Signature": twilio_signature(TOKEN, call.url, params)})
        assert answer.status_code == 200 and "my own server" in answer.text
        # replay against the same server, its routes mapped, signed for the tunnel's URL
        fixture = tmp_path / "voice.json"
        fixture.write_text('{"name": "voice", "steps": [{"twilio": "voice", "expect": {"status": 200}}]}')
        replayed = runner.invoke(app, ["replay", str(fixture), "--target", agent.url, "--public-url", url,
                                       "--route", "twilio.voice=/hooks/voice"], env=env)
        assert replayed.exit_code == 0, replayed.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        agent.stop()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ngrok-test-token" not in err and "restored" in err
    assert number["voice_url"] == "https://old.example.test/twilio/voice"
    assert assistant["server"]["url"] == "https://old.example.test/vapi/webhook"


def test_tunnel_to_a_port_nothing_listens_on_warns_and_bad_flags_exit_2(tmp_path, fake_ngrok):
    from twivapi_cli.tunnel import WebhookPaths, expose

    env = {"NGROK_AUTHTOKEN": "tok", "TWIVAPI_NGROK_PATH": fake_ngrok, "TWIVAPI_STATE_DIR": str(tmp_path)}
    settings = load_settings({}, environ=env, env_file=None)
    lines: list[str] = []
    waited: list[str] = []
    url = expose(settings, _free_port(), WebhookPaths(), ask=None, announce=lines.append, wait=waited.append)
    assert waited == [url] and url.endswith(".fake-ngrok.test")
    assert any("warning: nothing listens on 127.0.0.1:" in line for line in lines)
    for flags, named in ((["--port", "0"], "--port 0"), (["--port", "70000"], "--port 70000"),
                         (["--port", "8080", "--voice-path", "hooks"], "--voice-path 'hooks'")):
        result = runner.invoke(app, ["tunnel", *flags], env=env)
        assert result.exit_code == 2, result.output
        assert named in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["tunnel", "--port", "8080"], env={**env, "NGROK_AUTHTOKEN": ""})
    assert result.exit_code == 3 and "NGROK_AUTHTOKEN" in result.output
