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
