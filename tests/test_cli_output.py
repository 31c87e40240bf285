"""What the commands print: `serve`'s own start-up lines (uvicorn's only at debug), tables as wide as
their content when stdout is not a terminal, and `--json` on every command that prints a table."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
from rich.table import Table
from typer.testing import CliRunner

from twivapi_cli.bridge.server import display_store, uvicorn_log_level
from twivapi_cli.cli import app

from .support import PUBLIC, TOKEN, VAPI_KEY, VAPI_SECRET, free_port, start_serve

runner = CliRunner()
UVICORN_LINES = ("Started server process", "Waiting for application startup", "Application startup complete",
                 "Shutting down", "Waiting for application shutdown", "Finished server process")


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch):
    """Off a terminal with no COLUMNS: what a pipe, a file or CI gets."""
    monkeypatch.delenv("COLUMNS", raising=False)


# --- serve's start-up lines ---------------------------------------------------------------------------

def _serve_stderr(tmp_path, *args: str) -> str:
    port = free_port()
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": PUBLIC,
           "TWIVAPI_STORE": f"sqlite:///{tmp_path}/serve.db", "TWIVAPI_STATE_DIR": str(tmp_path / "state"),
           "TWIVAPI_DRAIN_TIMEOUT": "1"}
    proc = start_serve(env, port, "--mode", "native", *args)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return err.replace(str(port), "PORT")


def test_serve_prints_its_own_lines_once_and_not_uvicorns(tmp_path):
    err = _serve_stderr(tmp_path, "--log-level", "info")
    lines = err.splitlines()
    ours = ["twivapi bridge: native mode, listening on http://127.0.0.1:PORT", f"  public URL: {PUBLIC}",
            f"  store: sqlite:///{tmp_path}/serve.db", "  watch it: twivapi tail"]
    for line in ours:
        assert lines.count(line) == 1, (line, err)
    admin = [line for line in lines if line.startswith("  admin (loopback only): http://127.0.0.1:")]
    assert len(admin) == 1 and admin[0].endswith(f"token in {tmp_path / 'state' / 'bridge.json'}"), err
    for noise in UVICORN_LINES:
        assert noise not in err, err


def test_uvicorns_lines_show_at_debug(tmp_path):
    err = _serve_stderr(tmp_path, "--log-level", "debug")
    assert "Started server process" in err and "Waiting for application startup" in err
    assert err.count("twivapi bridge: native mode") == 1


@pytest.mark.parametrize("ours, theirs", [("info", "warning"), ("warning", "warning"), ("debug", "debug"),
                                          ("trace", "trace"), ("error", "error"), ("critical", "critical"),
                                          ("INFO", "warning")])
def test_uvicorn_log_level(ours, theirs):
    assert uvicorn_log_level(ours) == theirs


@pytest.mark.parametrize("url, shown", [
    ("redis://user:hunter22@127.0.0.1:6379/0", "redis://user:***@127.0.0.1:6379/0"),
    ("redis://:hunter22@redis.internal/2", "redis://:***@redis.internal/2"),
    ("rediss://default:hunter22@[::1]:6380/0", "rediss://default:***@[::1]:6380/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
    ("memory://", "memory://"),
])
def test_store_url_is_shown_without_its_password(url, shown):
    assert display_store(url) == shown
    assert "hunter22" not in display_store(url)


# --- tables off a terminal ------------------------------------------------------------------------------

def test_content_width_console_never_cuts_a_cell():
    from twivapi_cli.commands._common import _console
    out = io.StringIO()   # not a terminal
    table = Table("call", "checks")
    table.add_row("hangup-early", "answered with TwiML, session ended once, race detected, " + "x" * 150)
    _console(out).print(table)
    text = out.getvalue()
    assert "hangup-early" in text and "x" * 150 in text and "…" not in text
    assert all(len(line) < 300 for line in text.splitlines())   # as wide as the content, no wider


def test_an_expanding_view_stays_as_wide_as_its_content():
    from twivapi_cli.commands._common import _console
    from twivapi_cli.ui import tail_view
    out = io.StringIO()
    _console(out).print(tail_view({"sessions": [], "latency": {}}, []))
    assert max(len(line) for line in out.getvalue().splitlines()) < 120


def test_columns_still_wins_when_set(monkeypatch):
    from twivapi_cli.commands._common import _console
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    table = Table("a")
    table.add_row("y" * 200)
    _console(out).print(table)
    assert max(len(line) for line in out.getvalue().splitlines()) <= 60


def test_config_table_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"TWILIO_AUTH_TOKEN": "very-secret-token-123", "TWIVAPI_PUBLIC_URL": "https://" + "long" * 30 + ".example"}
    table = runner.invoke(app, ["config"], env=env)
    assert table.exit_code == 0
    assert "https://" + "long" * 30 + ".example" in table.stdout and "…" not in table.stdout
    result = runner.invoke(app, ["config", "--json"], env=env)
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    rows = {row["variable"]: row for row in document["settings"]}
    assert rows["TWILIO_AUTH_TOKEN"] == {"variable": "TWILIO_AUTH_TOKEN", "set": True, "secret": True, "value": None}
    assert rows["TWIVAPI_PORT"]["value"] == 8080 and rows["VAPI_API_KEY"]["set"] is False
    assert "very-secret-token-123" not in result.stdout
    assert runner.invoke(app, ["config", "--json", "--table"]).exit_code == 2


def test_doctor_table_keeps_check_names_whole_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_WEBHOOK_SECRET": VAPI_SECRET}   # no API calls: credentials missing
    result = runner.invoke(app, ["doctor"], env=env)
    assert result.exit_code == 1
    for name in ("setting TWILIO_ACCOUNT_SID", "setting VAPI_WEBHOOK_SECRET", "set TWIVAPI_PUBLIC_URL in the "
                 "environment or .env"):
        assert name in result.stdout, result.stdout
    as_json = runner.invoke(app, ["doctor", "--json"], env={**env, "VAPI_API_KEY": VAPI_KEY})
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert document["ok"] is False
    checks = {c["name"]: c for c in document["checks"]}
    assert checks["setting TWILIO_AUTH_TOKEN"] == {"name": "setting TWILIO_AUTH_TOKEN", "ok": True, "found": "set",
                                                   "fix": None}
    assert checks["setting TWIVAPI_PUBLIC_URL"]["fix"] == "set TWIVAPI_PUBLIC_URL in the environment or .env"
