"""Fault injection: latency, error statuses, garbage bodies, hangs, expiring and probabilistic rules,
the /_sim/faults control API, and the stored rules for WebSocket drops and webhook delivery."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from twilio.base.exceptions import TwilioRestException

from twivapi_cli.errors import VapiApiError
from twivapi_cli.sim.faults import GARBAGE, FaultRule, Faults
from twivapi_cli.sim.server import start_sims
from twivapi_cli.vapi_api import VapiClient


@pytest.fixture(scope="module")
def running():
    with start_sims() as sims:
        yield sims


@pytest.fixture
def sims(running):
    running.state.reset()
    running.twilio_faults.clear()
    running.vapi_faults.clear()
    yield running
    running.twilio_faults.clear()
    running.vapi_faults.clear()


@pytest.fixture
def vapi(sims):
    headers = {"Authorization": f"Bearer {sims.state.credentials.vapi_api_key}"}
    with httpx.Client(base_url=sims.vapi_url, headers=headers, timeout=5) as client:
        yield client


def test_latency_then_normal(sims, vapi):
    sims.vapi_faults.add("latency", "/assistant", method="GET", delay=1.0, count=1)
    started = time.monotonic()
    assert vapi.get("/assistant").status_code == 200
    # the fault's delay comes on top of the latency model's
    assert time.monotonic() - started >= 1.0 + sims.state.latency.minimum("vapi", "GET", "/assistant")
    assert sims.vapi_faults.list() == []                  # the rule expired after one use
    started = time.monotonic()
    assert vapi.get("/assistant").status_code == 200
    assert time.monotonic() - started < 1.0


def test_vapi_429_in_the_apis_own_error_shape(sims, vapi):
    sims.vapi_faults.add("status", "/call", method="POST", status=429, headers={"Retry-After": "2"})
    reply = vapi.post("/call", json={})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "2"
    assert reply.json() == {"message": "Rate limit exceeded", "error": "Too Many Requests", "statusCode": 429}
    assert vapi.get("/call").status_code == 200           # other methods untouched


def test_twilio_500_reaches_the_sdk_as_an_exception(sims):
    sims.twilio_faults.add("status", "/2010-04-01/Accounts/*/IncomingPhoneNumbers.json", status=500)
    client = sims.twilio_client()
    with pytest.raises(TwilioRestException) as err:
        client.incoming_phone_numbers.create(area_code="415")
    assert (err.value.status, err.value.code) == (500, 20500)


def test_custom_body(sims, vapi):
    sims.vapi_faults.add("status", "/assistant*", status=503, body="upstream connect error")
    reply = vapi.get("/assistant/x")
    assert reply.status_code == 503 and reply.text == "upstream connect error"


async def test_garbage_body_is_reported_by_the_vapi_client(sims):
    sims.vapi_faults.add("garbage", "/call", method="POST", status=200)
    client = VapiClient(sims.vapi_url, sims.state.credentials.vapi_api_key)
    try:
        with pytest.raises(VapiApiError, match="non-JSON body"):
            await client.create_websocket_call("asst")
    finally:
        await client.aclose()
    reply = httpx.post(sims.vapi_url + "/call", json={})
    assert reply.status_code == 200 and reply.text == GARBAGE


def test_hang_until_the_client_times_out_then_recover(sims, vapi):
    sims.vapi_faults.add("hang", "/assistant", count=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        vapi.get("/assistant", timeout=0.3)
    assert time.monotonic() - started < 2
    assert vapi.get("/assistant").status_code == 200


def test_count_limited_rules_expire_and_leave_the_listing(sims, vapi):
    sims.vapi_faults.add("status", "/assistant", status=500, count=2)
    assert [vapi.get("/assistant").status_code for _ in range(3)] == [500, 500, 200]
    assert vapi.get("/_sim/faults").json() == []


def test_probability_is_seeded():
    def outcomes(seed: int) -> list[bool]:
        faults = Faults(seed=seed)
        faults.add("status", "*", status=500, probability=0.5)
        return [faults.take("GET", "/x") is not None for _ in range(40)]
    first = outcomes(7)
    assert first == outcomes(7) and 5 < sum(first) < 35


def test_control_api(sims, vapi):
    added = vapi.post("/_sim/faults", json={"kind": "status", "method": "get", "path": "/call/*", "status": 404,
                                            "count": 3})
    assert added.status_code == 201 and added.json()["method"] == "GET" and added.json()["remaining"] == 3
    assert vapi.get("/call/abc").status_code == 404
    listed = vapi.get("/_sim/faults").json()
    assert [(r["id"], r["fired"], r["remaining"]) for r in listed] == [(added.json()["id"], 1, 2)]
    assert vapi.post("/_sim/faults", json={"kind": "explode"}).status_code == 400
    assert vapi.post("/_sim/faults", json={"kind": "status", "probability": 3}).status_code == 400
    assert vapi.post("/_sim/faults", json=["not", "an", "object"]).status_code == 400
    assert vapi.delete(f"/_sim/faults/{added.json()['id']}").json() == {"removed": True}
    assert vapi.delete("/_sim/faults/999").status_code == 404
    sims.vapi_faults.add("latency", delay=0.01)
    assert vapi.delete("/_sim/faults").json() == {"cleared": 1}
    twilio = httpx.post(sims.twilio_url + "/_sim/faults", json={"kind": "hang", "path": "/2010-04-01/*"})
    assert twilio.status_code == 201 and len(sims.twilio_faults.list()) == 1


def test_matching_by_method_and_pattern():
    rule = FaultRule(kind="status", path="/2010-04-01/Accounts/*/Calls/*.json", method="post")
    assert rule.matches("POST", "/2010-04-01/Accounts/AC1/Calls/CA1.json")
    assert not rule.matches("GET", "/2010-04-01/Accounts/AC1/Calls/CA1.json")
    assert not rule.matches("POST", "/2010-04-01/Accounts/AC1/Calls.json")


def test_websocket_drop_rules_are_stored_for_the_socket_code():
    faults = Faults()
    faults.add("drop_ws", "/call/*/transport", frames=25, count=1)
    assert faults.ws_drop_after("/twilio/media") is None
    assert faults.ws_drop_after("/call/abc/transport") == 25
    assert faults.ws_drop_after("/call/abc/transport") is None       # used up
    assert faults.take("GET", "/call/abc/transport") is None          # never applied to HTTP


async def test_webhook_delivery_rules():
    faults = Faults()
    send = faults.webhook_sender("/vapi/webhook")
    plain = {"type": "status-update"}
    assert await send(plain) == [plain]

    faults.add("webhook", "/vapi/webhook", action="duplicate", match_type="tool-calls", count=1)
    tool = {"type": "tool-calls"}
    assert await send(plain) == [plain]                               # other types pass
    assert await send(tool) == [tool, tool]

    faults.add("webhook", "/vapi/*", action="reorder", count=1)
    first, second = {"type": "speech-update", "n": 1}, {"type": "speech-update", "n": 2}
    assert await send(first) == []                                    # held back...
    assert await send(second) == [second, first]                      # ...and sent after the next

    faults.add("webhook", "*", action="drop", count=1)
    assert await send(plain) == []
    faults.add("webhook", "*", action="delay", delay=0.2, count=1)
    started = time.monotonic()
    assert await send({"message": {"type": "hang"}}) == [{"message": {"type": "hang"}}]
    assert time.monotonic() - started >= 0.2

    twilio_side = faults.webhook_sender(lambda: "/twilio/status")
    faults.add("webhook", "/twilio/status", action="drop", match_type="completed")
    assert await twilio_side({"CallStatus": "ringing"}) == [{"CallStatus": "ringing"}]
    assert await twilio_side({"CallStatus": "completed"}) == []


async def test_hang_does_not_block_other_requests(sims):
    sims.vapi_faults.add("hang", "/call", method="POST", count=1)
    headers = {"Authorization": f"Bearer {sims.state.credentials.vapi_api_key}"}
    async with httpx.AsyncClient(base_url=sims.vapi_url, headers=headers) as client:
        hung = asyncio.create_task(client.post("/call", json={}, timeout=1.0))
        await asyncio.sleep(0.05)
        assert (await client.get("/assistant")).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await hung
