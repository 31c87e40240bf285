"""The official Python SDK (PyPI ``vapi-server-sdk``, Fern-generated from Vapi's OpenAPI description)
against the Vapi simulator: what it sends must be accepted, and every answer must *validate* as its
models (the SDK itself builds them unchecked, so each raw body is validated again here, strictly,
with pydantic): assistants, a Twilio phone-number import, a ``vapi.websocket`` call, get / list /
update / delete."""

from __future__ import annotations

import typing

import httpx
import pytest

from .support import TOKEN, VAPI_KEY

# The SDK is imported by the fixture, not here: importing it builds ~1,700 pydantic models (35 s of CPU
# here), and every xdist worker imports every test module at collection.


class Answers:
    """Every JSON body the simulator answered, by (method, path)."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, str, int, typing.Any]] = []

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append((response.request.method, response.request.url.path, response.status_code,
                            response.json() if response.content else None))

    def last(self, method: str, path: str) -> typing.Any:
        found = [b for m, p, s, b in self.bodies if m == method and p == path]
        assert found, (method, path, [(m, p) for m, p, _, _ in self.bodies])
        return found[-1]


def strictly(model: typing.Any, body: typing.Any) -> typing.Any:
    """``body`` validated as ``model`` (pydantic, not the SDK's unchecked construction)."""
    import pydantic
    return pydantic.TypeAdapter(model).validate_python(body)


@pytest.fixture
def client(sims):
    pytest.importorskip("vapi", reason="the test extras install vapi-server-sdk")
    from vapi import Vapi
    answers = Answers()
    http = httpx.Client(event_hooks={"response": [answers.hook]}, timeout=10)
    yield Vapi(token=VAPI_KEY, base_url=sims.url, httpx_client=http), answers
    http.close()


def test_the_official_sdk_drives_the_simulator_and_its_models_parse_every_answer(sims, client):
    from vapi.calls.types import CreateCallsResponse
    from vapi.phone_numbers.types import (
        CreatePhoneNumbersResponse,
        DeletePhoneNumbersResponse,
        GetPhoneNumbersResponse,
        ListPhoneNumbersResponseItem,
        UpdatePhoneNumbersResponse,
    )
    from vapi.types import (
        Assistant,
        AudioFormat,
        Call,
        CreateAssistantDtoServerMessagesItem,  # noqa: F401  (the enum's values: plain strings accepted)
        MonitorPlan,
        Server,
        StopSpeakingPlan,
    )
    api, answers = client
    # assistants
    created = api.assistants.create(
        name="sdk-assistant", first_message="Hello from the SDK",
        server=Server(url="https://bridge.example.test/vapi/webhook", timeout_seconds=20,
                      headers={"X-Vapi-Secret": "s3cret"}),
        server_messages=["status-update", "speech-update", "end-of-call-report", "user-interrupted"],
        monitor_plan=MonitorPlan(control_enabled=True), stop_speaking_plan=StopSpeakingPlan(num_words=0, voice_seconds=0.2))
    strictly(Assistant, answers.last("POST", "/assistant"))
    assert created.name == "sdk-assistant" and created.id
    got = api.assistants.get(created.id)
    strictly(Assistant, answers.last("GET", f"/assistant/{created.id}"))
    assert got.server.url.endswith("/vapi/webhook") and got.monitor_plan.control_enabled is True
    listed = api.assistants.list(limit=100)
    strictly(list[Assistant], answers.last("GET", "/assistant"))
    assert created.id in [a.id for a in listed]
    updated = api.assistants.update(created.id, first_message="Hello again")
    strictly(Assistant, answers.last("PATCH", f"/assistant/{created.id}"))
    assert updated.first_message == "Hello again"

    # a Twilio number imported
    from vapi.phone_numbers.types import CreatePhoneNumbersRequest_Twilio, UpdatePhoneNumbersRequestBody_Twilio
    twilio = sims.running.twilio_client()
    offered = twilio.available_phone_numbers("US").local.list(area_code=646, limit=1)
    bought = twilio.incoming_phone_numbers.create(phone_number=offered[0].phone_number)
    number = api.phone_numbers.create(request=CreatePhoneNumbersRequest_Twilio(
        number=bought.phone_number, twilio_account_sid=sims.state.credentials.account_sid, twilio_auth_token=TOKEN,
        assistant_id=created.id, name="sdk-number", sms_enabled=False))
    strictly(CreatePhoneNumbersResponse, answers.last("POST", "/phone-number"))
    assert number.id and number.number == bought.phone_number
    api.phone_numbers.get(number.id)
    strictly(GetPhoneNumbersResponse, answers.last("GET", f"/phone-number/{number.id}"))
    assert number.id in [n.id for n in api.phone_numbers.list()]
    strictly(list[ListPhoneNumbersResponseItem], answers.last("GET", "/phone-number"))
    api.phone_numbers.update(number.id, request=UpdatePhoneNumbersRequestBody_Twilio(name="renamed"))
    renamed = strictly(UpdatePhoneNumbersResponse, answers.last("PATCH", f"/phone-number/{number.id}"))
    assert renamed.name == "renamed"

    # a vapi.websocket call
    from vapi.calls.types import CreateCallDtoTransport_VapiWebsocket
    call = api.calls.create(assistant_id=created.id, transport=CreateCallDtoTransport_VapiWebsocket(
        audio_format=AudioFormat(format="mulaw", container="raw", sample_rate=8000)))
    strictly(CreateCallsResponse, answers.last("POST", "/call"))
    assert call.id and call.type == "vapi.websocketCall" and call.monitor.control_url
    strictly(Call, answers.last("POST", "/call"))
    api.calls.get(call.id)
    strictly(Call, answers.last("GET", f"/call/{call.id}"))
    assert call.id in [c.id for c in api.calls.list(assistant_id=created.id)]
    strictly(list[Call], answers.last("GET", "/call"))
    api.calls.update(call.id, name="sdk-call")
    assert strictly(Call, answers.last("PATCH", f"/call/{call.id}")).name == "sdk-call"
    api.calls.delete(call.id)
    strictly(Call, answers.last("DELETE", f"/call/{call.id}"))
    assert call.id not in sims.state.vapi.calls

    # and away again
    api.phone_numbers.delete(number.id)
    strictly(DeletePhoneNumbersResponse, answers.last("DELETE", f"/phone-number/{number.id}"))
    api.assistants.delete(created.id)
    strictly(Assistant, answers.last("DELETE", f"/assistant/{created.id}"))
    assert all(status < 300 for _, _, status, _ in answers.bodies), [b for b in answers.bodies if b[2] >= 300]


def test_an_sdk_error_is_the_simulator_s_nest_error(client):
    from vapi.core.api_error import ApiError
    api, _ = client
    with pytest.raises(ApiError) as info:
        api.assistants.get("no-such-assistant")
    assert info.value.status_code == 404 and info.value.body["statusCode"] == 404
