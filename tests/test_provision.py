"""provision / teardown / doctor against the Twilio and Vapi simulators, through the real SDK and httpx."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from twivapi_cli.cli import app

from .sims import running_sims
from .support import TOKEN, VAPI_KEY, VAPI_SECRET

runner = CliRunner()
PUBLIC = "https://bridge.example.test"


@pytest.fixture
def sims():
    with running_sims() as running:
        yield running


@pytest.fixture
def env(sims, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return {"TWILIO_ACCOUNT_SID": sims.state.credentials.account_sid, "TWILIO_AUTH_TOKEN": TOKEN,
            "TWILIO_API_BASE_URL": sims.twilio_url, "VAPI_API_KEY": VAPI_KEY, "VAPI_BASE_URL": sims.url,
            "VAPI_WEBHOOK_SECRET": VAPI_SECRET, "TWIVAPI_PUBLIC_URL": PUBLIC,
            "TWIVAPI_STATE_DIR": str(tmp_path / "state")}


def provision(env, *args, input=None):
    return runner.invoke(app, ["provision", *args], env=env, input=input)


def state(env) -> dict:
    from pathlib import Path
    return json.loads((Path(env["TWIVAPI_STATE_DIR"]) / "provision.json").read_text())


@pytest.mark.parametrize("mode", ["stream", "bypass"])
def test_fresh_provision_buys_a_number_creates_the_assistant_and_wires_webhooks(sims, env, mode):
    result = provision(env, "--mode", mode, "--area-code", "415", "--yes")
    assert result.exit_code == 0, result.output
    numbers = list(sims.state.twilio.numbers.values())
    assert len(numbers) == 1
    assert numbers[0]["voice_url"] == f"{PUBLIC}/twilio/voice"
    assert numbers[0]["status_callback"] == f"{PUBLIC}/twilio/status"
    assistants = list(sims.state.vapi.assistants.values())
    assert len(assistants) == 1 and assistants[0]["server"]["url"] == f"{PUBLIC}/vapi/webhook"
    assert assistants[0]["stopSpeakingPlan"]["numWords"] == 0
    saved = state(env)
    assert saved["number"]["bought"] and saved["assistant"]["created"]


def test_native_mode_imports_the_number_into_vapi(sims, env):
    assert provision(env, "--mode", "native", "--yes").exit_code == 0
    imported = list(sims.state.vapi.phone_numbers.values())
    assert len(imported) == 1 and imported[0]["assistantId"] == state(env)["assistant"]["id"]
    number = list(sims.state.twilio.numbers.values())[0]
    assert number["voice_url"].endswith("/twilio/inbound_call")   # Vapi now answers it


def test_rerun_converges_no_second_number_or_assistant(sims, env):
    assert provision(env, "--yes").exit_code == 0
    again = provision(env, "--yes")
    assert again.exit_code == 0
    assert len(sims.state.twilio.numbers) == 1 and len(sims.state.vapi.assistants) == 1


def test_dry_run_changes_nothing_and_shows_the_purchase(sims, env):
    result = provision(env, "--dry-run")
    assert result.exit_code == 0
    assert "BUY +1" in result.output
    assert not sims.state.twilio.numbers and not sims.state.vapi.assistants


def test_confirmation_is_required_without_yes(sims, env):
    result = provision(env, input="n\n")
    assert result.exit_code == 1
    assert "This buys a number" in result.output
    assert not sims.state.twilio.numbers


def test_an_interrupted_run_resumes_without_buying_twice(sims, env):
    sims.running.vapi_faults.add("status", "/assistant", method="POST", status=500, count=1)
    failed = provision(env, "--yes")
    assert failed.exit_code == 3 and "Vapi POST /assistant" in failed.output
    assert state(env)["number"]["bought"]           # the number step was saved before the failure
    assert provision(env, "--yes").exit_code == 0
    assert len(sims.state.twilio.numbers) == 1 and len(sims.state.vapi.assistants) == 1


def test_teardown_restores_prior_settings_of_a_reused_number(sims, env):
    client = sims.running.twilio_client()
    offered = client.available_phone_numbers("US").local.list(area_code=212, limit=1)
    mine = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number,
                                                voice_url="https://old.example.com/voice",
                                                status_callback="https://old.example.com/status")
    assert provision(env, "--number", mine.phone_number, "--yes").exit_code == 0
    assert sims.state.twilio.numbers[mine.sid]["voice_url"] == f"{PUBLIC}/twilio/voice"
    result = runner.invoke(app, ["teardown", "--yes"], env=env)
    assert result.exit_code == 0, result.output
    restored = sims.state.twilio.numbers[mine.sid]
    assert restored["voice_url"] == "https://old.example.com/voice"
    assert restored["status_callback"] == "https://old.example.com/status"
    assert not sims.state.vapi.assistants


def test_teardown_releases_a_bought_number_only_when_confirmed(sims, env):
    assert provision(env, "--yes").exit_code == 0
    assert runner.invoke(app, ["teardown"], env=env, input="n\n").exit_code == 1
    assert len(sims.state.twilio.numbers) == 1
    assert runner.invoke(app, ["teardown", "--keep-number", "--yes"], env=env).exit_code == 0
    assert len(sims.state.twilio.numbers) == 1
    assert provision(env, "--yes").exit_code == 0     # the kept number is reused... by number
    assert runner.invoke(app, ["teardown", "--yes"], env=env).exit_code == 0


def test_errors_name_what_failed(sims, env):
    missing = provision(env, "--number", "+14155550000", "--yes")
    assert missing.exit_code == 2 and "is not a number of account" in missing.output
    wrong = provision({**env, "TWILIO_AUTH_TOKEN": "wrong"}, "--yes")
    assert wrong.exit_code == 3 and "TWILIO_AUTH_TOKEN" in wrong.output and "wrong" not in wrong.output.split(
        "TWILIO_AUTH_TOKEN")[0][-20:]
    no_public = provision({k: v for k, v in env.items() if k != "TWIVAPI_PUBLIC_URL"}, "--yes")
    assert no_public.exit_code == 2 and "TWIVAPI_PUBLIC_URL" in no_public.output


def test_state_file_is_0600_and_holds_no_secret(sims, env):
    assert provision(env, "--yes").exit_code == 0
    from pathlib import Path
    path = Path(env["TWIVAPI_STATE_DIR"]) / "provision.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert TOKEN not in text and VAPI_KEY not in text and VAPI_SECRET not in text


def test_doctor_spots_each_misconfiguration(sims, env):
    before = runner.invoke(app, ["doctor"], env={**env, "COLUMNS": "200"})
    assert before.exit_code == 1 and "run `twivapi provision`" in before.output
    assert provision(env, "--yes").exit_code == 0
    good = runner.invoke(app, ["doctor"], env={**env, "COLUMNS": "200"})
    assert good.exit_code == 0, good.output
    moved = runner.invoke(app, ["doctor"], env={**env, "TWIVAPI_PUBLIC_URL": "https://new.example.test",
                                                "COLUMNS": "200"})
    assert moved.exit_code == 1 and "https://new.example.test/twilio/voice" in moved.output
    bad_key = runner.invoke(app, ["doctor"], env={**env, "VAPI_API_KEY": "nope", "COLUMNS": "200"})
    assert bad_key.exit_code == 1 and "VAPI_API_KEY" in bad_key.output
