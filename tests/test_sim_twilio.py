"""The Twilio REST simulator, driven by the real twilio SDK over real HTTP (uvicorn on loopback).

Every request the SDK sends is checked against the operation's requestBody/parameters in Twilio's
OpenAPI spec, and every response against the operation's response schema (the spec's ``nullable``
turned into JSON Schema). Also: the call hooks a simulated caller uses, and `twivapi sim`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from typer.testing import CliRunner

from twivapi_cli.sim.server import start_sims
from twivapi_cli.sim.state import DEMO_ACCOUNT_SID, CallUpdate, SimState

SPEC_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "specs", Path("/work/shared/specs"))


# --- the spec --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def twilio_spec() -> dict | None:
    for folder in SPEC_DIRS:
        if (folder / "twilio_api_v2010.json").is_file():
            return json.loads((folder / "twilio_api_v2010.json").read_text())
    return None


def openapi_to_jsonschema(node):
    """OpenAPI 3.0 ``nullable: true`` → JSON Schema ``null`` allowed; everything else as is."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if k not in ("nullable", "example", "examples")}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def components() -> dict:
    return openapi_to_jsonschema(twilio_spec()["components"])


def operation(method: str, path: str) -> dict:
    for template, item in twilio_spec()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {path} is not an operation of the spec")


def check_schema(instance, schema: dict) -> None:
    import jsonschema

    schema = {**openapi_to_jsonschema(schema), "components": components()}
    jsonschema.Draft4Validator(schema).validate(instance)


def _loosen_coordinates(body: dict) -> dict:
    """Spec quirk: AvailablePhoneNumber latitude/longitude are typed number, but the spec's own
    example (readFull) and the real API return strings such as "19.720000", as the simulator does."""
    for entry in body.get("available_phone_numbers", []):
        for key in ("latitude", "longitude"):
            if isinstance(entry.get(key), str):
                entry[key] = float(entry[key])
    return body


def check_form(fields: dict[str, list[str]], schema: dict) -> None:
    """A form body against a requestBody schema: known names, required present, values parse as typed."""
    props = schema.get("properties", {})
    unknown = set(fields) - set(props)
    assert not unknown, f"fields not in the spec: {unknown}"
    for name in schema.get("required", []):
        assert name in fields, f"required field {name} missing"
    for name, values in fields.items():
        prop = props[name]
        if "$ref" in prop:
            prop = components()["schemas"][prop["$ref"].rsplit("/", 1)[-1]]
        if prop.get("type") != "array":
            assert len(values) == 1, f"{name} repeated"
        for value in values:
            kind = prop.get("items", {}).get("type") if prop.get("type") == "array" else prop.get("type")
            if kind == "boolean":
                assert value in ("true", "false"), (name, value)
            elif kind == "integer":
                int(value)
            if "enum" in prop:
                assert value in prop["enum"], (name, value)


def check_exchange(method: str, url: str, params: dict | None, data, response) -> None:
    path = urlsplit(url).path
    op = operation(method, path)
    if params:
        names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(params) <= names, f"query parameters not in the spec: {set(params) - names}"
    if data:
        fields: dict[str, list[str]] = {}
        for key, value in (data.items() if isinstance(data, dict) else data):
            fields.setdefault(key, []).extend(value if isinstance(value, list) else [str(value)])
        schema = op["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
        check_form(fields, schema)
    status = str(response.status_code)
    if response.status_code < 400:
        assert status in op["responses"], f"{method} {path}: status {status} not in the spec"
        content = op["responses"][status].get("content")
        if content:
            check_schema(_loosen_coordinates(json.loads(response.text)), content["application/json"]["schema"])
    else:
        body = json.loads(response.text)
        assert set(body) >= {"code", "message", "more_info", "status"} and body["status"] == response.status_code


class RecordingHttpClient(TwilioHttpClient):
    """twilio-python's own HTTP client, remembering every exchange for the spec checks."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple] = []

    def request(self, method, url, params=None, data=None, headers=None, auth=None, timeout=None,
                allow_redirects=False):
        response = super().request(method, url, params=params, data=data, headers=headers, auth=auth,
                                   timeout=timeout, allow_redirects=allow_redirects)
        self.exchanges.append((method, url, params, data, response))
        return response


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def running_sims():
    with start_sims() as running:
        yield running


@pytest.fixture
def sims(running_sims):
    """Both simulators (started once per module), with empty state and no faults for each test."""
    running_sims.state.reset()
    running_sims.twilio_faults.clear()
    running_sims.vapi_faults.clear()
    return running_sims


@pytest.fixture
def client(sims):
    """The real SDK pointed at the simulator; after the test, every exchange is checked on the spec."""
    http = RecordingHttpClient()
    sdk = Client(sims.state.credentials.account_sid, sims.state.credentials.auth_token, http_client=http)
    sdk.api.base_url = sims.twilio_url
    yield sdk
    assert http.exchanges
    if twilio_spec() is None:       # shared/specs/ missing: the wire checks cannot run
        return
    for exchange in http.exchanges:
        check_exchange(*exchange)


def buy(client, area_code: int = 415, **options):
    offered = client.api.v2010.account.available_phone_numbers("US").local.list(area_code=area_code, limit=1)
    return client.incoming_phone_numbers.create(phone_number=offered[0].phone_number, **options)


def test_the_spec_checks_can_run():
    if twilio_spec() is None:
        pytest.skip("shared/specs/twilio_api_v2010.json not found: SDK exchanges are not checked on the spec")
    assert operation("POST", "/2010-04-01/Accounts/AC1/Calls/CA1.json")["operationId"] == "UpdateCall"


# --- numbers ---------------------------------------------------------------------------------------

def test_account_fetch_is_a_credentials_check(client, sims):
    account = client.api.v2010.accounts(sims.state.credentials.account_sid).fetch()
    assert account.status == "active" and account.sid == DEMO_ACCOUNT_SID


def test_search_offers_any_area_code_with_the_uppercase_capabilities(client):
    found = client.api.v2010.account.available_phone_numbers("US").local.list(
        area_code=907, voice_enabled=True, contains="12*", limit=5)
    assert len(found) == 5
    for number in found:
        assert re.fullmatch(r"\+1907\d{7}", number.phone_number) and "12" in number.phone_number[5:]
        assert number.capabilities == {"voice": True, "SMS": True, "MMS": True, "fax": False}
    toll_free = client.api.v2010.account.available_phone_numbers("US").toll_free.list(limit=2)
    assert all(n.phone_number[2:5] in ("800", "888", "877", "866", "855", "844", "833") for n in toll_free)


def test_buy_list_update_fetch_delete(client, sims):
    number = buy(client, voice_url="https://bridge.example.test/twilio/voice", voice_method="POST",
                 status_callback="https://bridge.example.test/twilio/status", status_callback_method="POST",
                 friendly_name="twivapi")
    assert number.sid.startswith("PN") and len(number.sid) == 34
    assert number.voice_url == "https://bridge.example.test/twilio/voice" and number.friendly_name == "twivapi"
    listed = client.incoming_phone_numbers.list(phone_number=number.phone_number)
    assert [n.sid for n in listed] == [number.sid]
    assert client.incoming_phone_numbers.list(friendly_name="nobody") == []
    updated = client.incoming_phone_numbers(number.sid).update(voice_url="https://other.example.test/voice")
    assert updated.voice_url == "https://other.example.test/voice"
    assert client.incoming_phone_numbers(number.sid).fetch().status_callback.endswith("/twilio/status")
    assert client.incoming_phone_numbers(number.sid).delete() is True
    with pytest.raises(TwilioRestException) as err:
        client.incoming_phone_numbers(number.sid).fetch()
    assert (err.value.status, err.value.code) == (404, 20404)
    assert sims.state.twilio.numbers == {}


def test_twiml_apps_and_a_number_bound_elsewhere_never_calls_its_voice_url(client, sims):
    """As Twilio does: a number with a voice_application_sid (a TwiML App) or a trunk_sid has its
    calls sent to the app's voice URL or to the trunk; its own voice_url is not called."""
    app = client.applications.create(friendly_name="elsewhere", voice_url="https://app.example.test/voice",
                                     status_callback="https://app.example.test/status")
    assert app.sid.startswith("AP") and len(app.sid) == 34
    assert [a.sid for a in client.applications.list()] == [app.sid]
    assert client.applications(app.sid).update(voice_method="GET").voice_method == "GET"
    number = buy(client, voice_url="https://bridge.example.test/twilio/voice",
                 status_callback="https://bridge.example.test/twilio/status")
    bound = client.incoming_phone_numbers(number.sid).update(voice_application_sid=app.sid)
    assert bound.voice_application_sid == app.sid

    def routed() -> tuple:
        call = sims.state.twilio.start_inbound_call(to=number.phone_number, from_="+15551230009")
        return call.url, call.method, call.status_callback
    assert routed() == ("https://app.example.test/voice", "GET", "https://app.example.test/status")
    trunk = sims.state.twilio.add_trunk("sip:pbx.example.test")
    client.incoming_phone_numbers(number.sid).update(trunk_sid=trunk)
    assert routed()[0] == "sip:pbx.example.test"                      # the trunk wins over the app
    unbound = client.incoming_phone_numbers(number.sid).update(voice_application_sid="", trunk_sid="")
    assert unbound.voice_application_sid is None and unbound.trunk_sid is None
    assert routed() == ("https://bridge.example.test/twilio/voice", "POST", "https://bridge.example.test/twilio/status")
    assert client.applications(app.sid).delete() is True and client.applications.list() == []


def test_buy_by_area_code_and_paging(client):
    bought = [client.incoming_phone_numbers.create(area_code="512") for _ in range(5)]
    assert all(n.phone_number.startswith("+1512") for n in bought)
    assert len(client.incoming_phone_numbers.list(page_size=2)) == 5    # follows next_page_uri
    assert len(list(client.incoming_phone_numbers.page(page_size=2))) == 2


@pytest.mark.parametrize("kwargs, code", [
    ({"phone_number": "+14155550000"}, 21422),          # never offered by a search
    ({"phone_number": "415-555-0100"}, 21421),
    ({"area_code": "099"}, 21451),
    ({}, 21421),
])
def test_buy_errors(client, kwargs, code):
    with pytest.raises(TwilioRestException) as err:
        client.incoming_phone_numbers.create(**kwargs)
    assert (err.value.status, err.value.code) == (400, code)


def test_a_bought_number_cannot_be_bought_again(client):
    number = buy(client)
    with pytest.raises(TwilioRestException) as err:
        client.incoming_phone_numbers.create(phone_number=number.phone_number)
    assert err.value.code == 21422 and "not available" in err.value.msg


def test_bad_credentials_and_foreign_account(sims):
    bad = Client(sims.state.credentials.account_sid, "not-the-token")
    bad.api.base_url = sims.twilio_url
    with pytest.raises(TwilioRestException) as err:
        bad.api.v2010.accounts(sims.state.credentials.account_sid).fetch()
    assert (err.value.status, err.value.code) == (401, 20003)
    good = sims.twilio_client()
    with pytest.raises(TwilioRestException) as err:
        good.api.v2010.accounts("AC" + "1" * 32).fetch()
    assert (err.value.status, err.value.code) == (401, 20003)


# --- calls -----------------------------------------------------------------------------------------

def test_create_fetch_list_and_update_a_call(client, sims):
    number = buy(client)
    created_hook: list = []
    sims.state.twilio.on_call_created.append(created_hook.append)
    call = client.calls.create(to="+15551230002", from_=number.phone_number,
                               url="https://bridge.example.test/twilio/voice",
                               status_callback="https://bridge.example.test/twilio/status",
                               status_callback_event=["initiated", "answered", "completed"], timeout=20)
    assert call.sid.startswith("CA") and call.status == "queued" and call.direction == "outbound-api"
    sim_call = sims.state.twilio.calls[call.sid]
    assert created_hook == [sim_call]
    assert sim_call.status_callback_events == ["initiated", "answered", "completed"]
    assert [c.sid for c in client.calls.list(to="+15551230002")] == [call.sid]

    updates: list[CallUpdate] = []
    sim_call.on_update(updates.append)
    sim_call.set_status("in-progress")                      # the simulated caller answered
    redirected = client.calls(call.sid).update(twiml="<Response><Say>Bye</Say><Hangup/></Response>")
    assert redirected.status == "in-progress"
    hung_up = client.calls(call.sid).update(status="completed")
    assert hung_up.status == "completed" and hung_up.end_time is not None
    assert client.calls(call.sid).fetch().status == "completed"
    assert updates == [CallUpdate("redirect", twiml="<Response><Say>Bye</Say><Hangup/></Response>"),
                       CallUpdate("status", status="completed")]
    with pytest.raises(TwilioRestException) as err:
        client.calls(call.sid).update(url="https://bridge.example.test/again")
    assert (err.value.status, err.value.code) == (400, 21220)


def test_cancel_only_touches_calls_not_yet_answered(client, sims):
    number = buy(client)
    ringing = client.calls.create(to="+15551230002", from_=number.phone_number, twiml="<Response/>")
    assert client.calls(ringing.sid).update(status="canceled").status == "canceled"
    answered = client.calls.create(to="+15551230003", from_=number.phone_number, twiml="<Response/>")
    sims.state.twilio.calls[answered.sid].set_status("in-progress")
    assert client.calls(answered.sid).update(status="canceled").status == "in-progress"


@pytest.mark.parametrize("kwargs, code", [
    ({"to": "+15551230002", "from_": "+15559990000", "twiml": "<Response/>"}, 21210),   # not our number
    ({"to": "not a number", "from_": "OWNED", "twiml": "<Response/>"}, 21211),
    ({"to": "+15551230002", "from_": "OWNED"}, 21205),                                  # no Url/Twiml
    ({"to": "+15551230002", "from_": "OWNED", "url": "ftp://x"}, 21205),
])
def test_call_errors(client, kwargs, code):
    number = buy(client)
    kwargs = {k: number.phone_number if v == "OWNED" else v for k, v in kwargs.items()}
    with pytest.raises(TwilioRestException) as err:
        client.calls.create(**kwargs)
    assert (err.value.status, err.value.code) == (400, code)


async def test_updates_reach_a_driver_on_another_loop(sims):
    """The hook a simulated caller uses: an asyncio.Queue on its own loop, fed from the server's."""
    client = sims.twilio_client()
    number = await asyncio.to_thread(buy, client, 415, voice_url="https://bridge.example.test/twilio/voice")
    call = sims.state.twilio.start_inbound_call(to=number.phone_number, from_="+15551230009")
    assert (call.url, call.direction, call.status) == ("https://bridge.example.test/twilio/voice", "inbound", "ringing")
    queue = call.subscribe()
    call.set_status("in-progress")
    auth = (sims.state.credentials.account_sid, sims.state.credentials.auth_token)
    async with httpx.AsyncClient(base_url=sims.twilio_url, auth=auth) as http:
        path = f"/2010-04-01/Accounts/{auth[0]}/Calls/{call.sid}.json"
        fetched = (await http.get(path)).json()
        assert fetched["direction"] == "inbound" and fetched["phone_number_sid"] == number.sid
        reply = await http.post(path, data={"Url": "https://bridge.example.test/next", "Method": "GET"})
        assert reply.status_code == 200
        assert await asyncio.wait_for(queue.get(), 2) == CallUpdate(
            "redirect", url="https://bridge.example.test/next", method="GET")
        await http.post(path, data={"Status": "completed"})
        assert (await asyncio.wait_for(queue.get(), 2)).status == "completed"
    with pytest.raises(KeyError):
        sims.state.twilio.start_inbound_call(to="+15550000000", from_="+15551230009")


def test_unknown_routes_and_methods_are_twilio_errors(sims):
    auth = (sims.state.credentials.account_sid, sims.state.credentials.auth_token)
    reply = httpx.get(f"{sims.twilio_url}/2010-04-01/Accounts/{auth[0]}/Queues.json", auth=auth)
    assert reply.status_code == 404 and reply.json()["code"] == 20404
    search = f"{sims.twilio_url}/2010-04-01/Accounts/{auth[0]}/AvailablePhoneNumbers/US/Bogus.json"
    assert httpx.get(search, auth=auth).json()["code"] == 20404


# --- the runner and `twivapi sim` ----------------------------------------------------------------------

def test_env_points_at_the_simulators(sims):
    env = sims.env()
    assert env["TWILIO_API_BASE_URL"] == sims.twilio_url and env["VAPI_BASE_URL"] == sims.vapi_url
    assert env["TWILIO_ACCOUNT_SID"] == DEMO_ACCOUNT_SID
    from twivapi_cli.config import load_settings

    settings = load_settings({}, environ=env, env_file=None)     # every value is a valid setting
    assert settings.twilio_api_base_url == sims.twilio_url


def test_credentials_come_from_settings_when_set():
    from twivapi_cli.config import load_settings
    from twivapi_cli.sim.state import SimCredentials

    sid = "AC" + "ab" * 16
    settings = load_settings({}, environ={"TWILIO_ACCOUNT_SID": sid, "TWILIO_AUTH_TOKEN": "tok",
                                          "VAPI_API_KEY": "key"}, env_file=None)
    creds = SimCredentials.from_settings(settings)
    assert (creds.account_sid, creds.auth_token, creds.vapi_api_key) == (sid, "tok", "key")
    with start_sims(SimState(credentials=creds)) as running:
        assert running.twilio_client().api.v2010.accounts(sid).fetch().sid == sid


def test_sim_command_on_a_busy_port_exits_3_with_one_line(tmp_path, monkeypatch):
    from twivapi_cli.cli import app

    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["sim", "--twilio-port", str(port), "--vapi-port", "0"])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--twilio-port" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_sim_command_runs_until_interrupted(tmp_path, stop):
    """The real command: eval-able settings on stdout, working simulators, a clean stop (exit 0)."""
    command = [str(Path(sys.executable).with_name("twivapi")), "sim", "--twilio-port", "0", "--vapi-port", "0"]
    # faulthandler: if it ever hangs, SIGABRT makes it print every thread's stack (below)
    # SIGINT as a terminal's Ctrl-C delivers it: a suite started in the background by a non-interactive
    # shell (a CI runner's `cmd &`) has SIGINT ignored, children inherit that, and Python then never
    # raises KeyboardInterrupt (seen: this test hanging only in such runs)
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        env = {}
        while "VAPI_WEBHOOK_SECRET" not in env:
            line = process.stdout.readline()
            assert line, process.stderr.read()
            name, _, value = line.strip().partition("=")
            env[name] = value
        auth = (env["TWILIO_ACCOUNT_SID"], env["TWILIO_AUTH_TOKEN"])
        account = httpx.get(f"{env['TWILIO_API_BASE_URL']}/2010-04-01/Accounts/{auth[0]}.json", auth=auth)
        assert account.status_code == 200 and env["TWILIO_ACCOUNT_SID"] == DEMO_ACCOUNT_SID
        headers = {"Authorization": f"Bearer {env['VAPI_API_KEY']}"}
        assert httpx.get(f"{env['VAPI_BASE_URL']}/assistant", headers=headers).json() == []
        process.send_signal(stop)
        try:
            code = process.wait(10)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            raise AssertionError("twivapi sim did not stop in 10 s:\n" + process.communicate(timeout=10)[1][-8000:]) from None
        assert code == 0
        stderr = process.stderr.read()
        assert "simulators stopped" in stderr and "latency realistic" in stderr   # as slow as the real APIs
    finally:
        process.kill()
        process.communicate()   # and close its pipes


def test_sim_command_prints_evaluable_settings_without_echoing_user_secrets():
    from twivapi_cli.commands.sim import env_lines

    lines = env_lines({"TWILIO_API_BASE_URL": "http://127.0.0.1:4010", "TWILIO_AUTH_TOKEN": "s3cret",
                       "VAPI_API_KEY": "demo key"}, from_user={"TWILIO_AUTH_TOKEN"})
    assert lines[0] == "TWILIO_API_BASE_URL=http://127.0.0.1:4010"
    assert lines[1].startswith("#") and "s3cret" not in lines[1]
    assert lines[2] == "VAPI_API_KEY='demo key'"
