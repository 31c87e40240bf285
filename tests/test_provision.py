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


# --- the number a dry run shows is the number the real run buys -------------------------------------

def _planned_number(result) -> str:
    import re
    return re.search(r"BUY (\+\d+)", result.output).group(1)


def test_the_real_run_buys_the_number_the_dry_run_showed(sims, env):
    shown = _planned_number(provision(env, "--dry-run", "--area-code", "415"))
    assert "is what the search offers now" in provision(env, "--dry-run", "--area-code", "415").output
    assert _planned_number(provision(env, "--dry-run", "--area-code", "415")) == shown   # kept across dry runs
    result = provision(env, "--area-code", "415", "--yes")
    assert result.exit_code == 0, result.output
    assert f"BUY {shown} (San Francisco), the number the dry run showed" in result.output
    assert [n["phone_number"] for n in sims.state.twilio.numbers.values()] == [shown]
    assert "planned_number" not in state(env)


def test_a_number_gone_since_the_dry_run_is_said_and_another_bought(sims, env):
    shown = _planned_number(provision(env, "--dry-run", "--area-code", "415"))
    client = sims.running.twilio_client()   # someone else takes it meanwhile
    assert client.available_phone_numbers("US").local.list(contains=shown[2:], area_code=415, limit=1)
    taken = client.incoming_phone_numbers.create(phone_number=shown)
    result = provision(env, "--area-code", "415", "--yes")
    assert result.exit_code == 0, result.output
    assert f"{shown}, the number the dry run showed, is no longer offered" in result.output
    bought = state(env)["number"]["phone_number"]
    assert bought != shown and f"BUY {bought}" in result.output
    assert {n["phone_number"] for n in sims.state.twilio.numbers.values()} == {shown, bought}
    assert taken.sid != state(env)["number"]["sid"]


def test_a_dry_run_for_another_area_code_is_not_reused(sims, env):
    provision(env, "--dry-run", "--area-code", "212")
    result = provision(env, "--area-code", "415", "--dry-run")
    assert "BUY +1415" in result.output and "the number the dry run showed" not in result.output


def test_a_number_taken_between_plan_and_purchase_buys_nothing(sims, env):
    import asyncio

    from twivapi_cli import provision as lib
    from twivapi_cli.config import load_settings
    from twivapi_cli.errors import TwilioApiError

    settings = load_settings({}, environ=env, env_file=None)
    state_ = lib.State.load(settings.state_dir)
    options = lib.Options(mode="stream", area_code="415")

    async def run():
        accounts = lib.Accounts(settings)
        try:
            the_plan = await lib.plan(accounts, options, state_)
            wanted = the_plan.actions[0].data["phone_number"]
            await accounts.tw("taking it", accounts.twilio.incoming_phone_numbers.create, phone_number=wanted)
            with pytest.raises(TwilioApiError) as caught:
                await lib.apply(accounts, options, state_, the_plan)
            return wanted, caught.value
        finally:
            await accounts.aclose()

    wanted, error = asyncio.run(run())
    assert f"{wanted} was taken since the plan was made; nothing was bought" in str(error)
    assert "run `twivapi provision` again" in (error.hint or "")
    assert len(sims.state.twilio.numbers) == 1 and not state(env).get("number")


def test_teardown_after_only_a_dry_run_has_nothing_to_do(sims, env):
    assert provision(env, "--dry-run").exit_code == 0
    assert "planned_number" in state(env)
    result = runner.invoke(app, ["teardown"], env=env)
    assert result.exit_code == 0 and "nothing to tear down" in result.output
    from pathlib import Path
    assert not (Path(env["TWIVAPI_STATE_DIR"]) / "provision.json").exists()


# --- what each mode needs --------------------------------------------------------------------------

def test_the_assistant_gets_monitor_control_explicitly_and_its_server_authenticates(sims, env):
    """Ending calls depends on monitor.controlUrl: controlEnabled is set, not left to a default. And
    the simulator signs server messages only as the server says: provision's X-Vapi-Secret header is
    what makes them pass the bridge's check (without VAPI_WEBHOOK_SECRET there is none, and they fail)."""
    from twivapi_cli import signing
    from twivapi_cli.sim.vapi_transport import server_signer
    assert provision(env, "--yes").exit_code == 0
    assistant = next(iter(sims.state.vapi.assistants.values()))
    assert assistant["monitorPlan"] == {"controlEnabled": True, "controlAuthenticationEnabled": False}
    body = b'{"message": {"type": "status-update", "status": "in-progress"}}'
    headers = {k.lower(): v for k, v in server_signer(assistant["server"], sims.state.vapi.credentials)(body).items()}
    assert signing.verify_vapi(VAPI_SECRET, headers, body) == (True, "x-vapi-secret")
    without = {**{k: v for k, v in env.items() if k != "VAPI_WEBHOOK_SECRET"},
               "TWIVAPI_STATE_DIR": env["TWIVAPI_STATE_DIR"] + "-2"}
    assert provision(without, "--yes", "--assistant-name", "forgot").exit_code == 0
    forgot = next(a for a in sims.state.vapi.assistants.values() if a["name"] == "forgot")
    assert "headers" not in forgot["server"]
    unsigned = {k.lower(): v for k, v in server_signer(forgot["server"], sims.state.vapi.credentials)(body).items()}
    assert not signing.verify_vapi(VAPI_SECRET, unsigned, body)[0]


def test_with_a_public_key_control_requests_are_authenticated_as_the_spec_says(sims, env):
    import asyncio

    from twivapi_cli.errors import VapiApiError
    from twivapi_cli.vapi_api import VapiClient
    public = sims.state.credentials.vapi_public_key
    assert provision({**env, "VAPI_PUBLIC_KEY": public}, "--yes").exit_code == 0
    assistant = next(iter(sims.state.vapi.assistants.values()))
    assert assistant["monitorPlan"] == {"controlEnabled": True, "controlAuthenticationEnabled": True}

    async def end_with(control_key):
        client = VapiClient(sims.url, VAPI_KEY, control_key=control_key)
        try:
            call = await client.create_websocket_call(assistant["id"])
            await client.end_call(call)
            return call["id"]
        finally:
            await client.aclose()
    with pytest.raises(VapiApiError) as refused:    # the private key is not what the control URL takes
        asyncio.run(end_with(None))
    assert refused.value.status == 401
    ended = asyncio.run(end_with(public))
    assert sims.state.vapi.calls[ended].status == "ended"


def test_bypass_imports_the_number_points_it_back_and_serve_uses_the_recorded_id(sims, env):
    import asyncio

    from twivapi_cli.bridge.app import check_settings
    from twivapi_cli.config import load_settings
    result = provision(env, "--mode", "bypass", "--area-code", "415", "--yes")
    assert result.exit_code == 0, result.output
    imported = list(sims.state.vapi.phone_numbers.values())
    assert len(imported) == 1 and imported[0]["smsEnabled"] is False
    number = list(sims.state.twilio.numbers.values())[0]
    assert number["voice_url"] == f"{PUBLIC}/twilio/voice"          # pointed back at the bridge after the import
    assert number["status_callback"] == f"{PUBLIC}/twilio/status"
    saved = state(env)
    assert saved["vapi_phone_number"] == {"id": imported[0]["id"], "created": True}
    # `serve --mode bypass` without VAPI_PHONE_NUMBER_ID: the recorded id
    settings = load_settings({"mode": "bypass"}, environ={**env, "VAPI_ASSISTANT_ID": saved["assistant"]["id"]},
                             env_file=None)
    assert settings.vapi_phone_number_id == imported[0]["id"]
    check_settings(settings)                                          # nothing missing
    assert load_settings({}, environ={**env, "VAPI_PHONE_NUMBER_ID": "pn-mine"},
                         env_file=None).vapi_phone_number_id == "pn-mine"   # a setting still wins

    async def bypass_call():
        from twivapi_cli.vapi_api import VapiClient
        client = VapiClient(sims.url, VAPI_KEY)
        try:
            return await client.create_bypass_call(saved["assistant"]["id"], settings.vapi_phone_number_id,
                                                   "+15551112222")
        finally:
            await client.aclose()
    assert "<Stream" in asyncio.run(bypass_call())["phoneCallProviderDetails"]["twiml"]
    # rerun converges (no second import); teardown removes the import and restores the number
    assert provision(env, "--mode", "bypass", "--yes").exit_code == 0
    assert len(sims.state.vapi.phone_numbers) == 1
    assert runner.invoke(app, ["teardown", "--keep-number", "--yes"], env=env).exit_code == 0
    assert not sims.state.vapi.phone_numbers
    assert sims.state.twilio.numbers[number["sid"]]["voice_url"] == ""


ORIGINAL = {"name": "twivapi", "firstMessage": "Hello, this is the original.",
            "model": {"provider": "anthropic", "model": "claude-3-5-sonnet-20241022",
                      "messages": [{"role": "system", "content": "The original prompt."}]},
            "voice": {"provider": "azure", "voiceId": "andrew"},
            "transcriber": {"provider": "assembly-ai"},
            "serverMessages": ["end-of-call-report"], "metadata": {"team": "qa"}}
SERVERS = {
    "credential and headers": {"url": "https://old.example.test/hook", "timeoutSeconds": 30,
                               "credentialId": "550e8400-e29b-41d4-a716-446655440000",
                               "headers": {"X-Old-Secret": "old-header-secret-value", "X-Tenant": "acme"}},
    "no server at all": None,
}


@pytest.mark.parametrize("case", list(SERVERS))
def test_teardown_restores_an_updated_assistant_exactly(sims, env, case):
    from pathlib import Path
    original = dict(ORIGINAL) if SERVERS[case] is None else {**ORIGINAL, "server": SERVERS[case]}
    made = sims.vapi("POST", "/assistant", json=original)
    assert made.status_code == 201, made.text
    before = made.json()
    for _ in range(2):   # a rerun keeps the first record of what was there
        result = provision(env, "--yes", "--json")
        assert result.exit_code == 0, result.output
        assert "old-header-secret-value" not in result.output
    during = sims.state.vapi.assistants[before["id"]]
    assert during["server"]["url"] == f"{PUBLIC}/vapi/webhook" and during["model"]["provider"] == "openai"
    assert during["metadata"]["team"] == "qa"
    text = (Path(env["TWIVAPI_STATE_DIR"]) / "provision.json").read_text()
    assert "old-header-secret-value" not in text and VAPI_SECRET not in text      # never a secret in the file
    result = runner.invoke(app, ["teardown", "--keep-number", "--yes"], env=env)
    assert result.exit_code == 0, result.output
    after = sims.state.vapi.assistants[before["id"]]
    assert {k: v for k, v in after.items() if k != "updatedAt"} == {k: v for k, v in before.items() if k != "updatedAt"}
    assert ("server" in after) is (SERVERS[case] is not None)


# --- a number bound to a TwiML App or a SIP trunk never calls its voice URL -----------------------------

@pytest.mark.parametrize("binding", ["voice_application_sid", "trunk_sid"])
def test_a_reused_number_bound_elsewhere_is_unbound_shown_in_the_plan_and_bound_back(sims, env, binding):
    client = sims.running.twilio_client()
    if binding == "voice_application_sid":
        target, elsewhere = client.applications.create(voice_url="https://app.example.test/voice").sid, \
            "https://app.example.test/voice"
    else:
        target, elsewhere = sims.state.twilio.add_trunk("sip:pbx.example.test"), "sip:pbx.example.test"
    offered = client.available_phone_numbers("US").local.list(area_code=415, limit=1)
    number = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number,
                                                  voice_url="https://old.example.test/voice", **{binding: target})

    def routed_to() -> str | None:
        return sims.state.twilio.start_inbound_call(to=number.phone_number, from_="+15551230009").url
    assert routed_to() == elsewhere   # the mistake, as Twilio makes it: the voice URL is never called

    dry = provision(env, "--number", number.phone_number, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    unbind = [a for a in json.loads(dry.output)["plan"] if a.startswith("unbind")]
    assert unbind and target in unbind[0] and "teardown" in unbind[0]
    assert sims.state.twilio.numbers[number.sid][binding] == target        # a dry run changes nothing

    assert provision(env, "--number", number.phone_number, "--yes").exit_code == 0
    assert sims.state.twilio.numbers[number.sid][binding] is None
    assert state(env)["number"]["bound"] == {binding: target}              # what it was, for teardown
    assert routed_to() == f"{PUBLIC}/twilio/voice"
    good = runner.invoke(app, ["doctor", "--json"], env=env)
    assert good.exit_code == 0, good.output

    client.incoming_phone_numbers(number.sid).update(**{binding: target})   # someone binds it again
    bad = runner.invoke(app, ["doctor", "--json"], env=env)
    checks = {c["name"]: c for c in json.loads(bad.output)["checks"]}
    assert bad.exit_code == 1 and not checks["number binding"]["ok"]
    assert target in checks["number binding"]["found"] and "will not arrive" in checks["number binding"]["found"]

    torn = runner.invoke(app, ["teardown", "--yes"], env=env)
    assert torn.exit_code == 0 and "back to its" in torn.output, torn.output
    restored = sims.state.twilio.numbers[number.sid]
    assert restored[binding] == target and restored["voice_url"] == "https://old.example.test/voice"


def test_stream_mode_asks_vapi_for_phone_call_control_and_other_modes_do_not(sims, env):
    """Vapi cannot transfer or hang up a stream-mode call (the bridge owns the Twilio call): the
    assistant asks for phone-call-control (and transfer-destination-request), on top of its own list."""
    assert provision(env, "--mode", "stream", "--yes").exit_code == 0
    assistant = sims.state.vapi.assistants[state(env)["assistant"]["id"]]
    assert {"phone-call-control", "transfer-destination-request", "tool-calls"} <= set(assistant["serverMessages"])
    assert len(assistant["serverMessages"]) == len(set(assistant["serverMessages"]))
    assert runner.invoke(app, ["teardown", "--yes"], env=env).exit_code == 0
    assert provision(env, "--mode", "native", "--yes").exit_code == 0
    native = sims.state.vapi.assistants[state(env)["assistant"]["id"]]
    assert "phone-call-control" not in native["serverMessages"]   # Vapi owns a native call: it transfers itself
