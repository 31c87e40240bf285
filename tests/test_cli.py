"""The CLI through Typer's CliRunner, and a real `twivapi serve` process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from typer.testing import CliRunner

from twivapi_cli import __version__
from twivapi_cli.cli import app

from .support import PUBLIC, TOKEN, new_call_sid, reap, start_serve

runner = CliRunner()
TWIVAPI = str(Path(sys.executable).with_name("twivapi"))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"twivapi {__version__}"


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert "serve" in commands
    for command in commands:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0, command
        assert "Usage:" in sub.output


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from twivapi_cli.cli import app; "
            "heavy = [m for m in ('uvicorn', 'starlette', 'twilio', 'numpy', 'httpx', 'redis') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_serve_without_settings_names_the_variables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert "TWILIO_AUTH_TOKEN" in result.output and "VAPI_WEBHOOK_SECRET" in result.output


def test_serve_with_bad_mode_flag_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", "--mode", "sideways"])
    assert result.exit_code == 2 and "TWIVAPI_MODE" in result.output


def test_config_masks_secrets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "very-secret-token")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert "very-secret-token" not in result.output and "(set, hidden)" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_and_restart_keeps_acknowledged_events_and_live_sessions(tmp_path):
    from twivapi_cli import signing
    port = _free_port()
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": "s", "TWIVAPI_PUBLIC_URL": PUBLIC,
           "TWIVAPI_STORE": f"sqlite:///{tmp_path}/kill.db", "TWIVAPI_STATE_DIR": str(tmp_path / "state")}
    proc = start_serve(env, port, "--mode", "native")
    sids = [new_call_sid() for _ in range(25)]
    try:
        for sid in sids:
            params = {"CallSid": sid, "From": "+15550001111"}
            sig = signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params)
            assert httpx.post(f"http://127.0.0.1:{port}/twilio/voice", data=params,
                              headers={"X-Twilio-Signature": sig}).status_code == 200
    finally:
        reap(proc)
    proc = start_serve(env, port, "--mode", "native")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["active_sessions"] == len(sids)
    finally:
        reap(proc, signal.SIGTERM)
    import sqlite3
    rows = sqlite3.connect(tmp_path / "kill.db").execute(
        "SELECT call_sid FROM events WHERE type = 'twilio.voice'").fetchall()
    assert {r[0] for r in rows} == set(sids)
