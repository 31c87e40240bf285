"""Every command closes what it opens: no aiohttp "Unclosed client session" / "Unclosed connector",
no ResourceWarning, on stderr, in the output, in a log record or as a warning, once the command has
returned and the garbage is collected. Each command runs through CliRunner against the simulators
(and, for `tail`, a real bridge with its admin app)."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twivapi_cli.bridge.admin import create_admin_app
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.cli import app
from twivapi_cli.store.memory import MemoryStore

from .sims import running_sims
from .support import TOKEN, VAPI_KEY, VAPI_SECRET, bridge_settings, running_bridge

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = "https://bridge.example.test"
ADMIN_TOKEN = "admin-token-for-clean-exit"
LEAKS = ("Unclosed client session", "Unclosed connector", "unclosed transport", "ResourceWarning", "unclosed <socket")
runner = CliRunner()


@pytest.fixture(scope="module")
def sims():
    with running_sims() as running:
        running.assistant_id = running.assistant()
        yield running


@pytest.fixture
def env(sims, tmp_path, monkeypatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    return {"TWILIO_ACCOUNT_SID": sims.state.credentials.account_sid, "TWILIO_AUTH_TOKEN": TOKEN,
            "TWILIO_API_BASE_URL": sims.twilio_url, "VAPI_API_KEY": VAPI_KEY, "VAPI_BASE_URL": sims.url,
            "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": PUBLIC,
            "TWIVAPI_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture(scope="module")
def admin(sims) -> Iterator[str]:
    """A bridge with a call's events in its log, and its admin app: what `tail` reads."""
    with running_bridge(bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant_id), MemoryStore()) as bridge:
        server = start_in_thread(create_admin_app(bridge.app, ADMIN_TOKEN))
        try:
            assert bridge.voice("CA" + "1" * 32).status_code == 200
            yield server.url
        finally:
            server.stop()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def invoke_clean(args: list[str], env: dict[str, str], exit_codes: tuple[int, ...] = (0,)):
    """Run one command; fail on any sign of something left open, wherever it shows."""
    gc.collect()   # what earlier tests left behind is not this command's
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(app, args, env=env)
            gc.collect()   # a session left open warns when it is collected
    finally:
        logging.getLogger().removeHandler(records)
    assert result.exit_code in exit_codes, (args, result.output)
    shown = result.output + (result.stderr or "") + "\n".join(records.lines)
    for leak in LEAKS:
        assert leak not in shown, (args, shown[-3000:])
    leaked = [f"{w.category.__name__}: {w.message}" for w in caught
              if issubclass(w.category, ResourceWarning) or any(leak in str(w.message) for leak in LEAKS)]
    assert not leaked, (args, leaked)
    return result


def _provisioned(env: dict[str, str]) -> None:
    assert runner.invoke(app, ["provision", "--yes"], env=env).exit_code == 0


# (name, command, exit codes, setup): `doctor` before provisioning finds the number missing (exit 1)
COMMANDS = [
    ("doctor, nothing provisioned", ["doctor"], (1,), None),
    ("doctor --json", ["doctor", "--json"], (1,), None),
    ("doctor, provisioned", ["doctor"], (0,), _provisioned),
    ("provision --dry-run", ["provision", "--dry-run"], (0,), None),
    ("provision --dry-run --json", ["provision", "--dry-run", "--json"], (0,), None),
    ("provision --yes", ["provision", "--yes"], (0,), None),
    ("config", ["config"], (0,), None),
    ("config --json", ["config", "--json"], (0,), None),
    ("fixtures validate", ["fixtures", "validate", str(ROOT / "fixtures")], (0,), None),
    ("fixtures schema", ["fixtures", "schema"], (0,), None),
    ("replay --in-process", ["replay", str(ROOT / "fixtures" / "tool_call.json"), "--in-process"], (0,), None),
    ("teardown", ["teardown", "--yes"], (0,), _provisioned),
]


@pytest.mark.parametrize("args, exit_codes, setup", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_leaves_nothing_open(env, args, exit_codes, setup):
    if setup is not None:
        setup(env)
    invoke_clean(args, env, exit_codes)


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["tail --once", "tail --once --json"])
def test_tail_leaves_nothing_open(env, admin, extra):
    result = invoke_clean(["tail", "--url", admin, "--token", ADMIN_TOKEN, "--once", *extra], env)
    assert "twilio.voice" in result.stdout


def test_the_check_catches_an_unclosed_session(env, monkeypatch):
    """The check itself: a VapiClient nobody closes is caught (as doctor's was)."""
    from twivapi_cli import provision
    real = provision.Accounts.aclose

    async def forget(self) -> None:   # what doctor did: never close the Vapi client
        return None

    monkeypatch.setattr(provision.Accounts, "aclose", forget)
    with pytest.raises(AssertionError, match="Unclosed"):
        invoke_clean(["doctor"], env, (1,))
    monkeypatch.setattr(provision.Accounts, "aclose", real)
    with warnings.catch_warnings():   # the leak made on purpose: its connector and socket go now
        warnings.simplefilter("ignore")
        for _ in range(3):
            gc.collect()
