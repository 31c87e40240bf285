"""The simulators answer as slowly as the real services (sim/latency.py): at least the model's
minimum through the real clients, bounded and seeded draws, profiles and the --latency option."""

from __future__ import annotations

import asyncio
import time

import pytest
from typer.testing import CliRunner

from twivapi_cli.sim.latency import TWILIO, VAPI, LatencyModel, scale_of
from twivapi_cli.vapi_api import VapiClient

from .support import VAPI_KEY


def test_post_call_through_the_real_client_takes_what_vapi_takes(sims):
    assistant = sims.assistant(behavior="echo")
    latency = sims.state.latency
    assert latency.scale == 1.0                           # realistic by default, in the tests too

    async def create() -> float:
        client = VapiClient(sims.url, VAPI_KEY)
        try:
            await client.request("GET", "/assistant")     # connect first: time the answer, not the handshake
            started = time.monotonic()
            call = await client.create_websocket_call(assistant)
            elapsed = time.monotonic() - started
            await client.end_call(call)
            return elapsed
        finally:
            await client.aclose()

    assert asyncio.run(create()) >= latency.minimum("vapi", "POST", "/call") == 0.3
    client = sims.running.twilio_client()
    started = time.monotonic()
    client.api.v2010.accounts(sims.state.credentials.account_sid).fetch()
    assert time.monotonic() - started >= latency.minimum("twilio", "GET", "/2010-04-01/Accounts/x.json") > 0


def test_draws_stay_in_their_range_and_repeat_with_a_seed():
    first, second = LatencyModel(seed=7), LatencyModel(seed=7)
    draws = [first.delay("vapi", "POST", "/call") for _ in range(200)]
    assert draws == [second.delay("vapi", "POST", "/call") for _ in range(200)]
    assert 0.3 <= min(draws) and max(draws) <= 0.6 and 0.35 < sum(draws) / len(draws) < 0.5
    for rules, service in ((VAPI, "vapi"), (TWILIO, "twilio")):
        for rule in rules:
            assert 0 < rule.delay.low <= rule.delay.mode <= rule.delay.high <= 600, (service, rule)
    # other routes: tens of ms to ~150
    assert LatencyModel().rule("vapi", "GET", "/call/abc").delay.high <= 150
    assert LatencyModel().rule("twilio", "POST", "/2010-04-01/Accounts/AC1/Calls.json").delay.high <= 150


def test_profiles_and_scale():
    assert LatencyModel("none").delay("vapi", "POST", "/call") == 0.0
    assert LatencyModel("none").minimum("vapi", "POST", "/call") == 0.0
    assert LatencyModel(0.5).minimum("vapi", "POST", "/call") == pytest.approx(0.15)
    assert scale_of("Realistic") == 1.0 and scale_of("2") == 2.0
    for bad in ("fast", "-1", "nan", "1000"):
        with pytest.raises(ValueError):
            scale_of(bad)


def test_sim_latency_option_is_checked_and_names_the_setting(tmp_path, monkeypatch):
    from twivapi_cli.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sim", "--latency", "fast", "--twilio-port", "0", "--vapi-port", "0"])
    assert result.exit_code == 2
    assert "TWIVAPI_SIM_LATENCY" in result.stderr and "realistic or none" in result.stderr
