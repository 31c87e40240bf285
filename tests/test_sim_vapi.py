"""The Vapi REST simulator: assistants, imported Twilio numbers, calls, Live Call Control, errors.

Request bodies are checked against the spec's DTOs and responses against ``Assistant``,
``TwilioPhoneNumber`` and ``Call`` (jsonschema, the spec's ``nullable`` handled); the shallow DTO
copy the simulator validates with at run time (``data/vapi_dtos.json``) is checked against the spec.
Run ``python tests/test_sim_vapi.py --write-fragment`` to regenerate it after a spec update.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import httpx
import pytest
import websockets
from starlette.routing import WebSocketRoute
from twilio.request_validator import RequestValidator

from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.errors import VapiApiError
from twivapi_cli.sim.server import start_sims
from twivapi_cli.sim.state import SimState
from twivapi_cli.sim.twilio_rest import new_number
from twivapi_cli.sim.vapi_rest import INVALID_KEY, create_vapi_app
from twivapi_cli.vapi_api import VapiClient

SPEC_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "specs", Path("/work/shared/specs"))
FRAGMENT = Path(__file__).resolve().parents[1] / "src" / "twivapi_cli" / "data" / "vapi_dtos.json"
ASSISTANT = {"name": "twivapi-demo",
             "model": {"provider": "openai", "model": "gpt-4o",
                       "messages": [{"role": "system", "content": "You are a test."}]},
             "voice": {"provider": "11labs", "voiceId": "cgSgspJ2msm6clMCkdW9"},
             "firstMessage": "Hi there", "serverMessages": ["status-update", "end-of-call-report", "tool-calls"],
             "server": {"url": "https://bridge.example.test/vapi/webhook", "timeoutSeconds": 20},
             "metadata": {"team": "qa"}}
MULAW = {"format": "mulaw", "container": "raw", "sampleRate": 8000}
NUMBER = "+14155550142"


# --- the spec --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def vapi_spec() -> dict | None:
    for folder in SPEC_DIRS:
        if (folder / "vapi_openapi.json").is_file():
            return json.loads((folder / "vapi_openapi.json").read_text())
    return None


def spec_or_skip() -> dict:
    spec = vapi_spec()
    if spec is None:
        pytest.skip("shared/specs/vapi_openapi.json not found")
    return spec


def to_jsonschema(node):
    """OpenAPI 3.0 → JSON Schema: ``nullable``; ``oneOf`` read as ``anyOf`` (the spec's unions
    overlap, e.g. a voiceId is "one of these names" or "any string"; NestJS does not enforce
    exclusivity); and the spec's ``type: object`` on string enums (AudioFormat.format)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {("anyOf" if k == "oneOf" else k): to_jsonschema(v) for k, v in node.items()
           if k not in ("nullable", "example", "examples", "discriminator")}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and len(pattern) > 1 and pattern[0] == "/" and pattern[-1] == "/":
        out["pattern"] = pattern[1:-1]                     # JS-style /.../ delimiters in the spec
    if out.get("type") == "array" and "enum" in out:      # the spec puts item enums on the array
        out["items"] = {**out.get("items", {}), "enum": out.pop("enum")}
    if out.get("type") == "object" and out.get("enum") and all(isinstance(e, str) for e in out["enum"]):
        out["type"] = "string"
    if node.get("nullable"):
        out = {**out, "type": [out["type"], "null"]} if "type" in out else {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def components() -> dict:
    return to_jsonschema(spec_or_skip()["components"])


def conforms(instance, name: str) -> None:
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{name}", "components": components()}
    jsonschema.Draft4Validator(schema).validate(instance)


def build_fragment(spec: dict) -> dict:
    """What ``data/vapi_dtos.json`` should hold for this spec (see ``shallow_property``)."""
    schemas = spec["components"]["schemas"]
    return {"$comment": FRAGMENT_COMMENT, "schemas": {name: _shallow(schemas[name]) for name in ROOTS + NESTED}}


FRAGMENT_COMMENT = (
    "Shallow request schemas (property names, required, scalar types and bounds; nested only where listed) "
    "extracted from the official Vapi OpenAPI spec, VapiAI/docs fern/apis/api/openapi.json (copy: "
    "shared/specs/vapi_openapi.json), components.schemas.<name>. Regenerate: "
    "python tests/test_sim_vapi.py --write-fragment")
ROOTS = ("CreateAssistantDTO", "UpdateAssistantDTO", "CreateTwilioPhoneNumberDTO", "UpdateTwilioPhoneNumberDTO",
         "CreateCallDTO", "ClientInboundMessageAddMessage", "ClientInboundMessageControl", "ClientInboundMessageSay",
         "ClientInboundMessageEndCall", "ClientInboundMessageTransfer", "ClientInboundMessageSendTransportMessage")
NESTED = ("Server", "CreateCustomerDTO", "AudioFormat", "VapiWebsocketTransport", "VonageTransport",
          "TwilioTransport", "VapiSipTransport", "TelnyxTransport", "VapiWebCallTransport",
          # an assistant's model.tools[] of type "function" (serve/provision --tools), checked by the simulator
          "CreateFunctionToolDTO", "OpenAIFunction", "OpenAIFunctionParameters", "JsonSchema")


def _shallow(schema: dict) -> dict:
    return {"required": schema.get("required", []),
            "properties": {k: shallow_property(v) for k, v in schema.get("properties", {}).items()}}


def shallow_property(node: dict) -> dict:
    """Scalars keep type/enum/bounds; a single listed $ref stays a $ref; a union of listed DTOs is a
    ``provider``-discriminated oneOf; other unions and objects only keep their JSON type."""
    alts = node.get("oneOf") or node.get("anyOf") or node.get("allOf")
    if alts:
        refs = [a["$ref"].rsplit("/", 1)[-1] if "$ref" in a else None for a in alts]
        if len(alts) == 1 and refs[0] in NESTED:
            return {"$ref": refs[0]}
        if len(refs) > 1 and all(r in NESTED for r in refs):
            return {"oneOf": refs, "discriminator": "provider"}
        kinds = {"object" if r else a.get("type") for r, a in zip(refs, alts, strict=True)}
        return {"type": kinds.pop()} if len(kinds) == 1 and None not in kinds else {}
    out = {k: node[k] for k in ("type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern") if k in node}
    if out.get("type") == "object" and all(isinstance(v, str) for v in out.get("enum", [None])):
        out["type"] = "string"
    values = (node.get("additionalProperties") or {}).get("$ref", "").rsplit("/", 1)[-1]
    if out.get("type") == "object" and values in NESTED:   # a map of DTOs (JsonSchema.properties)
        out["additionalProperties"] = {"$ref": values}
    if out.get("type") == "array":
        items = node.get("items", {})
        item = {"type": "object"} if "$ref" in items else {k: items[k] for k in ("type", "enum") if k in items}
        if "enum" in out:
            item["enum"] = out.pop("enum")
        out["items"] = {} if items.get("oneOf") or items.get("anyOf") else item
    return out


def test_shipped_dto_fragment_matches_the_spec():
    assert json.loads(FRAGMENT.read_text()) == build_fragment(spec_or_skip())


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sims():
    with start_sims() as running:
        yield running


@pytest.fixture
def state(sims) -> SimState:
    """The simulators' shared state, emptied, with one number bought on the Twilio side."""
    sims.state.reset()
    number = new_number(sims.state.credentials.account_sid, NUMBER,
                        {"voice_url": "https://bridge.example.test/twilio/voice"})
    sims.state.twilio.numbers[number["sid"]] = number
    return sims.state


@pytest.fixture
def base(sims) -> str:
    return sims.vapi_url


@pytest.fixture
def ws_base(sims) -> str:
    return "ws" + sims.vapi_url[4:]


@pytest.fixture
def api(sims, state):
    with httpx.Client(base_url=sims.vapi_url,
                      headers={"Authorization": f"Bearer {state.credentials.vapi_api_key}"}) as client:
        yield client


def create(api, path: str, body: dict, schema: str | None = None, response_schema: str | None = None) -> dict:
    if schema and vapi_spec():
        conforms(body, schema)
    reply = api.post(path, json=body)
    assert reply.status_code == 201, reply.text
    if response_schema and vapi_spec():
        conforms(reply.json(), response_schema)
    return reply.json()


def import_number(api, state, **extra) -> dict:
    body = {"provider": "twilio", "number": NUMBER, "twilioAccountSid": state.credentials.account_sid,
            "twilioAuthToken": state.credentials.auth_token, "name": "twivapi", "smsEnabled": False, **extra}
    return create(api, "/phone-number", body, "CreateTwilioPhoneNumberDTO", "TwilioPhoneNumber")


# --- auth, errors, validation ------------------------------------------------------------------------

def test_bearer_key_is_required(state, base):
    with httpx.Client(base_url=base) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {state.credentials.vapi_api_key}"}):
            reply = client.get("/assistant", headers=headers)
            assert reply.status_code == 401
            assert reply.json() == {"message": INVALID_KEY, "error": "Unauthorized", "statusCode": 401}


def test_validation_errors_are_nest_style_lists(api):
    reply = api.post("/assistant", json={**ASSISTANT, "bogus": 1, "maxDurationSeconds": 5, "name": "x" * 41,
                                         "serverMessages": ["nope"], "firstMessageMode": 3})
    assert reply.status_code == 400
    body = reply.json()
    assert body["error"] == "Bad Request" and body["statusCode"] == 400
    assert set(body["message"]) == {
        "property bogus should not exist", "maxDurationSeconds must not be less than 10",
        "name must be shorter than or equal to 40 characters", "firstMessageMode must be a string",
        "each value in serverMessages must be one of the following values: " + ", ".join(
            json.loads(FRAGMENT.read_text())["schemas"]["CreateAssistantDTO"]["properties"]["serverMessages"]["items"]["enum"])}
    nested = api.post("/call", json={"transport": {"provider": "vapi.websocket", "extra": 1,
                                                   "audioFormat": {"format": "mp3", "sampleRate": 8000}}})
    assert nested.json()["message"] == ["transport.property extra should not exist",
                                        "transport.audioFormat.format must be one of the following values: pcm_s16le, mulaw"]
    assert api.post("/call", json={"transport": {"provider": "carrier-pigeon"}}).json()["message"][0].startswith(
        "transport.provider must be one of the following values: vapi.websocket")


def test_bad_json_and_unknown_routes(api):
    bad = api.post("/assistant", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"] == "Bad Request"
    missing = api.get("/nothing-here")
    assert missing.status_code == 404 and missing.json()["message"] == "Cannot GET /nothing-here"
    assert api.get("/assistant/does-not-exist").json()["statusCode"] == 404


# --- assistants --------------------------------------------------------------------------------------

def test_assistant_crud(api):
    first = create(api, "/assistant", ASSISTANT, "CreateAssistantDTO", "Assistant")
    second = create(api, "/assistant", {"name": "second"}, "CreateAssistantDTO", "Assistant")
    assert first["name"] == "twivapi-demo" and first["server"]["url"].endswith("/vapi/webhook")
    listed = api.get("/assistant", params={"limit": 10}).json()
    assert [a["id"] for a in listed] == [second["id"], first["id"]]      # plain array, newest first
    assert len(api.get("/assistant", params={"limit": 1}).json()) == 1
    assert api.get("/assistant", params={"limit": 5000}).status_code == 400
    patch = {"firstMessage": "Hello again", "serverMessages": ["status-update", "transcript"]}
    conforms(patch, "UpdateAssistantDTO") if vapi_spec() else None
    updated = api.patch(f"/assistant/{first['id']}", json=patch).json()
    assert updated["firstMessage"] == "Hello again" and updated["name"] == "twivapi-demo"
    if vapi_spec():
        conforms(updated, "Assistant")
    assert api.patch(f"/assistant/{first['id']}", json={"id": "x"}).status_code == 400
    assert api.get(f"/assistant/{first['id']}").json() == updated
    assert api.delete(f"/assistant/{first['id']}").json()["id"] == first["id"]
    assert api.get(f"/assistant/{first['id']}").status_code == 404


# --- phone numbers -------------------------------------------------------------------------------------

def test_import_checks_twilio_and_repoints_the_voice_url(api, state, base):
    assistant = create(api, "/assistant", ASSISTANT)
    number = import_number(api, state, assistantId=assistant["id"])
    assert number["status"] == "active" and number["twilioAuthToken"] == state.credentials.auth_token  # echoed
    twilio_number = state.twilio.number_by_phone(NUMBER)
    assert twilio_number["voice_url"] == f"{base}/twilio/inbound_call"
    assert twilio_number["sms_url"] == ""                                   # smsEnabled: false
    assert api.get("/phone-number").json() == [number]
    again = api.post("/phone-number", json={"provider": "twilio", "number": NUMBER,
                                            "twilioAccountSid": state.credentials.account_sid,
                                            "twilioAuthToken": state.credentials.auth_token})
    assert again.status_code == 400
    renamed = api.patch(f"/phone-number/{number['id']}", json={"name": "renamed"}).json()
    assert renamed["name"] == "renamed"
    if vapi_spec():
        conforms(renamed, "TwilioPhoneNumber")
    assert api.delete(f"/phone-number/{number['id']}").json()["id"] == number["id"]
    assert api.get(f"/phone-number/{number['id']}").status_code == 404


@pytest.mark.parametrize("body, fragment", [
    ({"provider": "twilio"}, "number should not be empty"),
    ({"provider": "twilio", "number": "+15550001111", "twilioAccountSid": "SID", "twilioAuthToken": "TOKEN"},
     "Number Not Found on Twilio"),
    ({"provider": "twilio", "number": NUMBER, "twilioAccountSid": "SID", "twilioAuthToken": "wrong"}, "Authenticate"),
    ({"provider": "vonage", "number": NUMBER}, "twilio"),
])
def test_import_errors(api, state, body, fragment):
    body = {k: {"SID": state.credentials.account_sid, "TOKEN": state.credentials.auth_token}.get(v, v)
            for k, v in body.items()}
    reply = api.post("/phone-number", json=body)
    assert reply.status_code == 400 and fragment in json.dumps(reply.json())


# --- calls -----------------------------------------------------------------------------------------------

def test_websocket_call(api, state, base, ws_base):
    assistant = create(api, "/assistant", ASSISTANT)
    body = {"assistantId": assistant["id"], "assistantOverrides": {"metadata": {"twilioCallSid": "CA1"}},
            "transport": {"provider": "vapi.websocket", "audioFormat": MULAW}}
    call = create(api, "/call", body, "CreateCallDTO", "Call")
    assert call["type"] == "vapi.websocketCall" and call["status"] == "queued"
    assert call["transport"]["websocketCallUrl"] == f"{ws_base}/call/{call['id']}/transport"
    assert call["monitor"]["controlUrl"] == f"{base}/call/{call['id']}/control"
    record, resolved = state.vapi.find_call(call["id"])
    assert record is call or record == call
    assert resolved["metadata"] == {"team": "qa", "twilioCallSid": "CA1"}    # overrides merged
    sim_call = state.vapi.calls[call["id"]]
    assert sim_call.kind == "websocket" and sim_call.audio_format == MULAW
    assert sim_call.server_url == "https://bridge.example.test/vapi/webhook"
    assert api.get(f"/call/{call['id']}").json() == call
    assert [c["id"] for c in api.get("/call", params={"assistantId": assistant["id"]}).json()] == [call["id"]]
    default = create(api, "/call", {"assistant": {"name": "inline"}, "transport": {"provider": "vapi.websocket"}})
    assert default["transport"]["audioFormat"]["format"] == "pcm_s16le"


def test_websocket_transport_refuses_phone_numbers(api, state):
    number = import_number(api, state)
    for extra in ({"phoneNumberId": number["id"]}, {"phoneNumber": {"twilioPhoneNumber": NUMBER,
                                                                    "twilioAccountSid": "AC1"}}):
        reply = api.post("/call", json={"assistant": {"name": "a"}, "transport": {"provider": "vapi.websocket"}, **extra})
        assert reply.status_code == 400 and "not allowed" in json.dumps(reply.json())


def test_top_level_metadata_is_refused_like_the_real_whitelist(api):
    """CreateCallDTO has no ``metadata`` (it belongs in assistantOverrides.metadata)."""
    reply = api.post("/call", json={"assistant": {"name": "a"}, "metadata": {"x": 1},
                                    "transport": {"provider": "vapi.websocket"}})
    assert reply.status_code == 400 and reply.json()["message"] == ["property metadata should not exist"]


def test_bypass_call_answers_stream_twiml(api, state, ws_base):
    assistant = create(api, "/assistant", ASSISTANT)
    number = import_number(api, state)
    body = {"assistantId": assistant["id"], "phoneNumberId": number["id"], "phoneCallProviderBypassEnabled": True,
            "customer": {"number": "+15551112222"}}
    if vapi_spec():   # the bypass flag is documented but absent from the spec
        conforms({k: v for k, v in body.items() if k != "phoneCallProviderBypassEnabled"}, "CreateCallDTO")
    call = create(api, "/call", body, response_schema="Call")
    root = ET.fromstring(call["phoneCallProviderDetails"]["twiml"])
    stream = root.find("./Connect/Stream")
    assert root.tag == "Response" and stream.get("url") == f"{ws_base}/call/{call['id']}/twilio-stream"
    assert state.vapi.calls[call["id"]].kind == "bypass"
    assert state.vapi.calls[call["id"]].audio_format == MULAW
    for missing in ("phoneNumberId", "customer"):
        assert api.post("/call", json={k: v for k, v in body.items() if k != missing}).status_code == 400


def test_phone_call_dials_through_the_twilio_simulator(api, state):
    assistant = create(api, "/assistant", ASSISTANT)
    number = import_number(api, state)
    call = create(api, "/call", {"assistantId": assistant["id"], "phoneNumberId": number["id"],
                                 "customer": {"number": "+15551112222"}}, "CreateCallDTO", "Call")
    assert call["type"] == "outboundPhoneCall"
    twilio_call = state.twilio.calls[call["phoneCallProviderId"]]
    assert (twilio_call.to, twilio_call.from_) == ("+15551112222", NUMBER)
    assert f"/call/{call['id']}/twilio-stream" in twilio_call.twiml


def test_unknown_assistant_or_number(api):
    assert api.post("/call", json={"assistantId": "nope", "transport": {"provider": "vapi.websocket"}}).status_code == 400
    assert api.post("/call", json={"transport": {"provider": "vapi.websocket"}}).status_code == 400   # no assistant
    reply = api.post("/call", json={"assistant": {"name": "a"}, "phoneNumberId": "nope",
                                    "customer": {"number": "+15551112222"}})
    assert reply.status_code == 400 and "Phone Number" in reply.json()["message"]


def test_live_call_control(api, state, base):
    call = create(api, "/call", {"assistant": {"name": "a"}, "transport": {"provider": "vapi.websocket"}})
    seen: list[dict] = []
    state.vapi.calls[call["id"]].on_control(seen.append)
    control = call["monitor"]["controlUrl"].replace(base, "")
    say = {"type": "say", "content": "One moment", "endCallAfterSpoken": False}
    if vapi_spec():
        conforms(say, "ClientInboundMessageSay")
    assert api.post(control, json=say, headers={"Authorization": ""}).status_code == 200   # no key needed
    assert api.post(control, json={"type": "control", "control": "mute-everyone"}).status_code == 400
    assert api.post(control, json={"type": "hangup"}).status_code == 400
    assert api.post(control, json={"type": "end-call"}).status_code == 200
    assert seen == [say, {"type": "end-call"}]
    ended = api.get(f"/call/{call['id']}").json()
    assert ended["status"] == "ended" and ended["endedReason"] == "manually-canceled" and ended["endedAt"]
    if vapi_spec():
        conforms(ended, "Call")
    assert api.post(control, json={"type": "end-call"}).status_code == 400
    assert api.post("/call/nope/control", json={"type": "end-call"}).status_code == 404


def test_inbound_call_to_an_imported_number(api, state, base, ws_base):
    assistant = create(api, "/assistant", ASSISTANT)
    import_number(api, state, assistantId=assistant["id"])
    url = f"{base}/twilio/inbound_call"
    params = {"CallSid": "CA" + "a" * 32, "From": "+15551112222", "To": NUMBER, "CallStatus": "ringing",
              "Direction": "inbound", "AccountSid": state.credentials.account_sid}
    signature = RequestValidator(state.credentials.auth_token).compute_signature(url, params)
    reply = api.post("/twilio/inbound_call", data=params, headers={"X-Twilio-Signature": signature})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/xml")
    stream_url = ET.fromstring(reply.text).find("./Connect/Stream").get("url")
    call = next(iter(state.vapi.calls.values()))
    assert stream_url == f"{ws_base}/call/{call.id}/twilio-stream"
    assert call.kind == "inbound" and call.record["phoneCallProviderId"] == params["CallSid"]
    assert call.assistant["id"] == assistant["id"]
    if vapi_spec():
        conforms(call.record, "Call")
    forged = api.post("/twilio/inbound_call", data=params, headers={"X-Twilio-Signature": "forged"})
    assert forged.status_code == 403


async def test_extra_routes_are_mounted_first():
    state = SimState()

    async def transport(websocket):
        await websocket.accept()
        record, _ = state.vapi.find_call(websocket.path_params["call_id"])
        await websocket.send_json({"call": record["id"]})
        await websocket.close()

    app = create_vapi_app(state, extra_routes=[WebSocketRoute("/call/{call_id}/transport", transport)])
    server = start_in_thread(app)
    try:
        headers = {"Authorization": f"Bearer {state.credentials.vapi_api_key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
            call = (await http.post("/call", json={"assistant": {"name": "a"},
                                                   "transport": {"provider": "vapi.websocket"}})).json()
        async with websockets.connect(call["transport"]["websocketCallUrl"]) as ws:
            assert json.loads(await ws.recv()) == {"call": call["id"]}
    finally:
        server.stop()


# --- twivapi's own Vapi client against the simulator ---------------------------------------------------------

async def test_vapi_client_round_trip(state):
    app = create_vapi_app(state)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vapi.test")
    client = VapiClient("http://vapi.test", state.credentials.vapi_api_key, client=http)
    try:
        assistant = await client.create_assistant({"name": "via-client"})
        assert (await client.get_assistant(assistant["id"]))["name"] == "via-client"
        number = await client.import_twilio_number({"number": NUMBER, "twilioAccountSid": state.credentials.account_sid,
                                                    "twilioAuthToken": state.credentials.auth_token})
        call = await client.create_websocket_call(assistant["id"], "pcm16-16k")
        assert call["transport"]["audioFormat"]["sampleRate"] == 16000
        bypass = await client.create_bypass_call(assistant["id"], number["id"], "+15551112222")
        assert "<Stream" in bypass["phoneCallProviderDetails"]["twiml"]
        with pytest.raises(VapiApiError) as err:
            await client.get_call("nope")
        assert err.value.status == 404
        bad = VapiClient("http://vapi.test", "wrong-key", client=http)
        with pytest.raises(VapiApiError) as err:
            await bad.list_assistants()
        assert err.value.status == 401 and "VAPI_API_KEY" in str(err.value)
    finally:
        await http.aclose()


async def test_vapi_client_own_transport_round_trip_on_loopback(state, base):
    """The bridge's own client (its requests straight to the aiohttp transport, no httpx client in
    between) against the simulator over real HTTP: bodies, query parameters, the key, a call's
    absolute control URL and the errors come out as through httpx's client."""
    client = VapiClient(base, state.credentials.vapi_api_key)
    try:
        assistant = await client.create_assistant({"name": "via-transport"})
        assert (await client.get_assistant(assistant["id"]))["name"] == "via-transport"
        assert [a["id"] for a in await client.list_assistants()] == [assistant["id"]]   # ?limit=1000
        call = await client.create_websocket_call(assistant["id"], metadata={"twilioCallSid": "CA" + "1" * 32})
        assert call["assistantOverrides"]["metadata"] == {"twilioCallSid": "CA" + "1" * 32}
        assert (await client.get_call(call["id"]))["id"] == call["id"]
        await client.end_call(call)   # POST to the call's own monitor.controlUrl
        assert (await client.get_call(call["id"]))["status"] == "ended"
        with pytest.raises(VapiApiError) as err:
            await client.get_call("nope")
        assert err.value.status == 404
    finally:
        await client.aclose()
    bad = VapiClient(base, "wrong-key")
    try:
        with pytest.raises(VapiApiError) as err:
            await bad.list_assistants()
        assert err.value.status == 401 and "VAPI_API_KEY" in str(err.value) and "wrong-key" not in str(err.value)
    finally:
        await bad.aclose()


if __name__ == "__main__" and "--write-fragment" in sys.argv:
    if vapi_spec() is None:
        sys.exit("shared/specs/vapi_openapi.json not found")
    FRAGMENT.write_text(json.dumps(build_fragment(vapi_spec()), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FRAGMENT}")
