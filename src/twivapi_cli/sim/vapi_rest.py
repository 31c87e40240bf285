"""A local stand-in for Vapi's REST API: assistants, Twilio phone numbers, calls, Live Call Control.

Bearer auth, NestJS-style errors (``{"message": str | [str], "error": ..., "statusCode": N}``) and
request validation like Vapi's ``ValidationPipe`` (whitelist: unknown properties are a 400, messages
in class-validator's wording) against shallow copies of the spec's DTOs (``data/vapi_dtos.json``).

Calls (``POST /call``) become ``state.VapiCall`` records in ``state.vapi.calls``:

- ``transport.provider == "vapi.websocket"`` → ``kind="websocket"``, with
  ``transport.websocketCallUrl = ws://<host>/call/{id}/transport``
- ``phoneCallProviderBypassEnabled`` → ``kind="bypass"``, with ``phoneCallProviderDetails.twiml``
  ``<Connect><Stream url="ws://<host>/call/{id}/twilio-stream"/></Connect>``
- otherwise a phone call from an imported number → ``kind="phone"`` (and, when the Twilio simulator
  shares the state, a Twilio call to the customer that streams to the same ``twilio-stream`` URL)

Importing a Twilio number (``POST /phone-number``) re-points its VoiceUrl at
``<host>/twilio/inbound_call``; a (signed) call there becomes ``kind="inbound"`` and gets the same
``<Connect><Stream>`` TwiML. A number without an assistant asks for one: ``assistant-request`` to the
number's server (else the org's), answered within 7.5 s with ``assistantId``, ``assistant``
(+ ``assistantOverrides``), ``destination`` (forwarded) or ``error`` (spoken, then hung up).

Phone calls carry their CallSid in ``transport`` (a ``TwilioTransport``: ``callSid``,
``accountSid``) and in the deprecated ``phoneCallProviderId``. ``monitor.controlUrl`` exists unless
the assistant's ``monitorPlan.controlEnabled`` is false, and asks for ``Authorization: Bearer <the
org's public key>`` when ``controlAuthenticationEnabled`` is true. Custom credentials
(``POST /credential``: bearer or hmac ``authenticationPlan``) are what a ``server.credentialId``
names; the simulated assistant signs with them and with ``server.headers``, nothing else.

Extension points for the simulated assistant: ``create_vapi_app(..., extra_routes=[...])`` mounts the
WebSocket routes ``/call/{id}/transport`` and ``/call/{id}/twilio-stream`` (and anything else) ahead
of these; ``state.vapi.find_call(id)`` gives ``(record, assistant)``; ``VapiCall.server`` (with
``state.vapi.credentials`` for its ``credentialId``) says where and how to post server messages
(``vapi_transport.ServerPoster.for_server``); ``state.vapi.on_call_created``
runs for every new call; ``POST /call/{id}/control`` messages are published on the call's hub
(``call.on_control(fn)`` / ``call.subscribe()``), ``end-call`` also ends the record.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from .faults import FaultMiddleware, Faults, control_routes
from .latency import LatencyMiddleware
from .state import SimCall, SimState, VapiCall, iso, now, twilio_sid, twilio_transport
from .vapi_transport import ServerPoster

INVALID_KEY = "Invalid Key. Hot tip, you may be using the private key instead of the public key, or vice versa."
REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
# Documented fields the spec lacks (reference vapi.md §1.6): accepted on top of CreateCallDTO.
CALL_EXTRAS = {"phoneCallProviderBypassEnabled": {"type": "boolean"}}
DEFAULT_AUDIO = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
TWILIO_AUDIO = {"format": "mulaw", "container": "raw", "sampleRate": 8000}


class VapiError(Exception):
    def __init__(self, status: int, message: str | list[str]):
        super().__init__(str(message))
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message), status_code=self.status)


def error_body(status: int, message: str | list[str] | None = None) -> dict:
    reason = REASONS.get(status, "Error")
    return {"message": reason if message is None else message, "error": reason, "statusCode": status}


def _fault_body(status: int) -> dict:
    return error_body(status, "Rate limit exceeded" if status == 429 else None)


# --- validation (class-validator wording) --------------------------------------------------------

@lru_cache(maxsize=1)
def dto_schemas() -> dict[str, dict]:
    text = resources.files("twivapi_cli").joinpath("data/vapi_dtos.json").read_text()
    return json.loads(text)["schemas"]


TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "must be a string"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
               "must be a number conforming to the specified constraints"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer number"),
    "boolean": (lambda v: isinstance(v, bool), "must be a boolean value"),
    "object": (lambda v: isinstance(v, dict), "must be an object"),
    "array": (lambda v: isinstance(v, list), "must be an array"),
}


def validate(body: Any, schema_name: str, extras: dict | None = None, prefix: str = "") -> list[str]:
    """NestJS ValidationPipe-style messages for ``body`` against a shallow DTO; [] when valid."""
    schema = dto_schemas()[schema_name]
    props = {**schema["properties"], **(extras or {})}
    if not isinstance(body, dict):
        return [f"{prefix}{schema_name} must be an object"]
    errors = [f"{prefix}property {k} should not exist" for k in body if k not in props]
    for name in schema["required"]:
        if body.get(name) in (None, ""):
            errors.append(f"{prefix}{name} should not be empty")
    for name, value in body.items():
        if name in props and value is not None:
            errors += _check(value, props[name], name, prefix)
    return errors


def _check(value: Any, rule: dict, name: str, prefix: str) -> list[str]:
    if "$ref" in rule:
        return validate(value, rule["$ref"], prefix=f"{prefix}{name}.") if isinstance(value, dict) \
            else [f"{prefix}{name} must be an object"]
    if "oneOf" in rule:
        return _check_union(value, rule, name, prefix)
    kind = rule.get("type")
    if kind in TYPE_CHECKS and not TYPE_CHECKS[kind][0](value):
        return [f"{prefix}{name} {TYPE_CHECKS[kind][1]}"]
    errors = []
    if "enum" in rule and value not in rule["enum"]:
        errors.append(f"{prefix}{name} must be one of the following values: {', '.join(map(str, rule['enum']))}")
    if "minimum" in rule and value < rule["minimum"]:
        errors.append(f"{prefix}{name} must not be less than {rule['minimum']}")
    if "maximum" in rule and value > rule["maximum"]:
        errors.append(f"{prefix}{name} must not be greater than {rule['maximum']}")
    if "maxLength" in rule and len(value) > rule["maxLength"]:
        errors.append(f"{prefix}{name} must be shorter than or equal to {rule['maxLength']} characters")
    if "minLength" in rule and len(value) < rule["minLength"]:
        errors.append(f"{prefix}{name} must be longer than or equal to {rule['minLength']} characters")
    if "pattern" in rule and not re.search(rule["pattern"].strip("/"), value):
        errors.append(f"{prefix}{name} must match {rule['pattern']} regular expression")
    item_enum = rule.get("items", {}).get("enum")
    if kind == "array" and item_enum and any(v not in item_enum for v in value):
        errors.append(f"{prefix}each value in {name} must be one of the following values: {', '.join(item_enum)}")
    item_type = rule.get("items", {}).get("type")
    if kind == "array" and item_type in TYPE_CHECKS and not all(TYPE_CHECKS[item_type][0](v) for v in value):
        errors.append(f"{prefix}each value in {name} {TYPE_CHECKS[item_type][1]}")
    if kind == "object" and "additionalProperties" in rule:   # a map of DTOs (JsonSchema.properties)
        for key, item in value.items():
            errors += _check(item, rule["additionalProperties"], f"{name}.{key}", prefix)
    return errors


def model_tool_errors(body: Any) -> list[str]:
    """An assistant's ``model.tools[]``: the ``function`` ones checked as ``CreateFunctionToolDTO``
    (the model itself is a union by provider, kept shallow)."""
    model = body.get("model") if isinstance(body, dict) else None
    tools = model.get("tools") if isinstance(model, dict) else None
    if tools is None:
        return []
    if not isinstance(tools, list):
        return ["model.tools must be an array"]
    return [error for i, item in enumerate(tools) if isinstance(item, dict) and item.get("type") == "function"
            for error in validate(item, "CreateFunctionToolDTO", prefix=f"model.tools.{i}.")]


def _check_union(value: Any, rule: dict, name: str, prefix: str) -> list[str]:
    """A oneOf of DTOs told apart by ``provider`` (e.g. CreateCallDTO.transport)."""
    if not isinstance(value, dict):
        return [f"{prefix}{name} must be an object"]
    key = rule.get("discriminator", "provider")
    variants = {v: dto_schemas()[v]["properties"][key]["enum"][0] for v in rule["oneOf"]}
    match = next((v for v, tag in variants.items() if tag == value.get(key)), None)
    if match is None:
        return [f"{prefix}{name}.{key} must be one of the following values: {', '.join(variants.values())}"]
    return validate(value, match, prefix=f"{prefix}{name}.")


def check(body: Any, schema_name: str, extras: dict | None = None) -> dict:
    errors = validate(body, schema_name, extras)
    if schema_name in ("CreateAssistantDTO", "UpdateAssistantDTO"):
        errors += model_tool_errors(body)
    if errors:
        raise VapiError(400, errors)
    return body


# --- request plumbing ----------------------------------------------------------------------------

Handler = Callable[[Request, Any], Awaitable[Response]]


def endpoint(state: SimState, handler: Handler, *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Bearer auth, JSON body parsing and VapiError → NestJS error, around one handler."""
    async def run(request: Request) -> Response:
        try:
            if auth:
                _check_auth(request, state)
            body = None
            if request.method in ("POST", "PATCH", "PUT"):
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except ValueError as exc:
                    raise VapiError(400, f"Unexpected token in JSON at position {getattr(exc, 'pos', 0)}") from None
            return await handler(request, body)
        except VapiError as exc:
            return exc.response()
    return run


def _check_auth(request: Request, state: SimState) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), state.credentials.vapi_api_key):
        raise VapiError(401, INVALID_KEY)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _ws_base(request: Request) -> str:
    return "ws" + _base(request)[4:]          # http://h → ws://h, https://h → wss://h


def _limit(request: Request) -> int:
    try:
        limit = int(request.query_params.get("limit", 100))
    except ValueError:
        raise VapiError(400, ["limit must be a number conforming to the specified constraints"]) from None
    if not 0 <= limit <= 1000:
        raise VapiError(400, [f"limit must not be {'greater than 1000' if limit > 1000 else 'less than 0'}"])
    return limit


def _newest_first(records: list[dict], request: Request) -> list[dict]:
    """Records in creation order (dict order), newest first, at most ``limit`` of them."""
    return records[::-1][:_limit(request)]


def stream_twiml(url: str) -> str:
    """The TwiML a bypass call / an imported number answers with: stream the caller to Vapi."""
    response = VoiceResponse()
    response.connect().stream(url=url)
    return str(response)


def _merge(assistant: dict | None, overrides: dict | None) -> dict | None:
    """Saved assistant + assistantOverrides (metadata and variableValues merged one level)."""
    if assistant is None and not overrides:
        return None
    base, extra = assistant or {}, overrides or {}
    merged = {**base, **extra}
    for key in ("metadata", "variableValues"):
        if isinstance(base.get(key), dict) and isinstance(extra.get(key), dict):
            merged[key] = {**base[key], **extra[key]}
    return merged


# --- handlers ------------------------------------------------------------------------------------

class VapiApi:
    def __init__(self, state: SimState):
        self.state = state
        self.vapi = state.vapi

    def _stamp(self, body: dict) -> dict:
        moment = iso(now())
        return {**body, "id": str(uuid.uuid4()), "orgId": self.vapi.org_id, "createdAt": moment, "updatedAt": moment}

    @staticmethod
    def _find(table: dict, request: Request, what: str) -> dict:
        record = table.get(request.path_params["id"])
        if record is None:
            raise VapiError(404, f"{what} not found")
        return record

    # assistants
    async def create_assistant(self, request: Request, body: Any) -> Response:
        record = self._stamp(check(body, "CreateAssistantDTO"))
        self.vapi.assistants[record["id"]] = record
        return JSONResponse(record, status_code=201)

    async def list_assistants(self, request: Request, body: Any) -> Response:
        return JSONResponse(_newest_first(list(self.vapi.assistants.values()), request))

    async def get_assistant(self, request: Request, body: Any) -> Response:
        return JSONResponse(self._find(self.vapi.assistants, request, "Assistant"))

    async def update_assistant(self, request: Request, body: Any) -> Response:
        record = self._find(self.vapi.assistants, request, "Assistant")
        changes = check(body, "UpdateAssistantDTO")
        for key in [k for k, v in changes.items() if v is None]:   # null clears a field (no server at all)
            record.pop(key, None)
        record.update({k: v for k, v in changes.items() if v is not None}, updatedAt=iso(now()))
        return JSONResponse(record)

    async def delete_assistant(self, request: Request, body: Any) -> Response:
        record = self._find(self.vapi.assistants, request, "Assistant")
        del self.vapi.assistants[record["id"]]
        return JSONResponse(record)

    # phone numbers
    async def create_number(self, request: Request, body: Any) -> Response:
        if isinstance(body, dict) and body.get("provider") != "twilio":
            raise VapiError(400, ["provider must be one of the following values: twilio "
                                  "(the simulator imports Twilio numbers only)"])
        check(body, "CreateTwilioPhoneNumberDTO")
        if any(n["number"] == body["number"] for n in self.vapi.phone_numbers.values()):
            raise VapiError(400, f"Phone number {body['number']} already exists in this org.")
        if body.get("assistantId") and body["assistantId"] not in self.vapi.assistants:
            raise VapiError(400, "Couldn't Find Assistant. assistantId does not exist.")
        self._import_into_twilio(body, _base(request))
        record = self._stamp({"smsEnabled": True, **body, "status": "active"})
        self.vapi.phone_numbers[record["id"]] = record
        return JSONResponse(record, status_code=201)

    def _import_into_twilio(self, body: dict, base: str) -> None:
        """Like the real import: check the number and credentials, point the number's webhook at Vapi."""
        if not self.state.link:
            return
        creds = self.state.credentials
        token_ok = hmac.compare_digest(body.get("twilioAuthToken") or "", creds.auth_token)
        if body["twilioAccountSid"] != creds.account_sid or not (token_ok or body.get("twilioApiKey")):
            raise VapiError(400, "Twilio Error: Authenticate. Check twilioAccountSid and twilioAuthToken.")
        number = self.state.twilio.number_by_phone(body["number"])
        if number is None:
            raise VapiError(400, f"Number Not Found on Twilio. {body['number']} is not a number of this account.")
        number.update(voice_url=f"{base}/twilio/inbound_call", voice_method="POST")
        if body.get("smsEnabled", True):
            number.update(sms_url=f"{base}/twilio/sms", sms_method="POST")

    async def list_numbers(self, request: Request, body: Any) -> Response:
        return JSONResponse(_newest_first(list(self.vapi.phone_numbers.values()), request))

    async def get_number(self, request: Request, body: Any) -> Response:
        return JSONResponse(self._find(self.vapi.phone_numbers, request, "Phone Number"))

    async def update_number(self, request: Request, body: Any) -> Response:
        record = self._find(self.vapi.phone_numbers, request, "Phone Number")
        record.update(check(body, "UpdateTwilioPhoneNumberDTO"), updatedAt=iso(now()))
        return JSONResponse(record)

    async def delete_number(self, request: Request, body: Any) -> Response:
        record = self._find(self.vapi.phone_numbers, request, "Phone Number")
        del self.vapi.phone_numbers[record["id"]]
        return JSONResponse(record)

    # calls
    async def create_call(self, request: Request, body: Any) -> Response:
        check(body, "CreateCallDTO", CALL_EXTRAS)
        kind = self._call_kind(body)
        assistant = _merge(self._assistant(body), body.get("assistantOverrides"))
        number = None if kind == "websocket" else self._phone_number(body)
        server = self._server(assistant, number)
        if assistant is None and server is None:
            raise VapiError(400, "Couldn't Get Assistant. Need Either `assistant`, `assistantId`, `squad`, "
                                 "`squadId`, or a server URL for assistant-request.")
        record = self._stamp(body)
        record.update(status="queued", cost=0, monitor=self._monitor(request, record["id"], assistant))
        audio = self._connect(record, kind, f"{_ws_base(request)}/call/{record['id']}", number)
        self.vapi.add_call(VapiCall(record["id"], record, kind, assistant=assistant, server=server, audio_format=audio,
                                    control_auth=self._control_auth(assistant)))
        return JSONResponse(record, status_code=201)

    async def update_call(self, request: Request, body: Any) -> Response:
        """``UpdateCallDTO``: only ``name``."""
        call = self.vapi.calls.get(request.path_params["id"])
        if call is None:
            raise VapiError(404, "Call not found")
        if not isinstance(body, dict):
            raise VapiError(400, ["UpdateCallDTO must be an object"])
        errors = [f"property {k} should not exist" for k in body if k != "name"]
        if "name" in body and not (isinstance(body["name"], str) and len(body["name"]) <= 40):
            errors.append("name must be shorter than or equal to 40 characters")
        if errors:
            raise VapiError(400, errors)
        call.record.update(body, updatedAt=iso(now()))
        return JSONResponse(call.record)

    async def delete_call(self, request: Request, body: Any) -> Response:
        """Deletes the call's data (never hangs up: ending a call is Live Call Control's end-call)."""
        call = self.vapi.calls.get(request.path_params["id"])
        if call is None:
            raise VapiError(404, "Call not found")
        del self.vapi.calls[call.id]
        return JSONResponse(call.record)

    # custom credentials (a server's credentialId)
    async def create_credential(self, request: Request, body: Any) -> Response:
        check_credential(body)
        record = self._stamp(body)
        self.vapi.credentials[record["id"]] = record
        return JSONResponse(_credential_view(record), status_code=201)

    async def list_credentials(self, request: Request, body: Any) -> Response:
        return JSONResponse([_credential_view(c) for c in _newest_first(list(self.vapi.credentials.values()), request)])

    async def get_credential(self, request: Request, body: Any) -> Response:
        return JSONResponse(_credential_view(self._find(self.vapi.credentials, request, "Credential")))

    async def delete_credential(self, request: Request, body: Any) -> Response:
        record = self._find(self.vapi.credentials, request, "Credential")
        del self.vapi.credentials[record["id"]]
        return JSONResponse(_credential_view(record))

    @staticmethod
    def _call_kind(body: dict) -> str:
        unsupported = [k for k in ("customers", "squadId", "squad", "workflowId", "workflow") if body.get(k)]
        if unsupported:
            raise VapiError(400, f"The simulator does not support {', '.join(unsupported)}: use an assistant.")
        transport = body.get("transport")
        if transport:
            if transport.get("provider") != "vapi.websocket":
                raise VapiError(400, f"The simulator supports the vapi.websocket transport only, "
                                     f"not {transport.get('provider')}.")
            if body.get("phoneNumberId") or body.get("phoneNumber"):
                raise VapiError(400, ["phoneNumberId and phoneNumber are not allowed with transport vapi.websocket"])
            return "websocket"
        if not (body.get("customer") or {}).get("number"):
            raise VapiError(400, ["customer.number should not be empty"])
        return "bypass" if body.get("phoneCallProviderBypassEnabled") else "phone"

    def _connect(self, record: dict, kind: str, socket_base: str, number: dict | None) -> dict:
        """Say in the record how the call's audio reaches Vapi; returns that path's audio format."""
        if kind == "websocket":
            audio = record["transport"].get("audioFormat") or DEFAULT_AUDIO
            record.update(type="vapi.websocketCall", transport={
                **record["transport"], "audioFormat": audio, "websocketCallUrl": f"{socket_base}/transport"})
            return audio
        record.update(phoneCallProvider="twilio", phoneCallTransport="pstn")
        if kind == "bypass":
            record.update(type="inboundPhoneCall",
                          phoneCallProviderDetails={"twiml": stream_twiml(f"{socket_base}/twilio-stream")})
        else:
            record["type"] = "outboundPhoneCall"
            if number is not None:   # always, for a phone call: create_call looked it up
                self._dial(record, number, f"{socket_base}/twilio-stream")
        return TWILIO_AUDIO

    def _assistant(self, body: dict) -> dict | None:
        if body.get("assistantId"):
            found = self.vapi.assistants.get(body["assistantId"])
            if found is None:
                raise VapiError(400, "Couldn't Get Assistant. assistantId does not exist.")
            return found
        return body.get("assistant")

    def _phone_number(self, body: dict) -> dict:
        if body.get("phoneNumberId"):
            found = self.vapi.phone_numbers.get(body["phoneNumberId"])
            if found is None:
                raise VapiError(400, "Couldn't Get Phone Number. phoneNumberId does not exist.")
            return found
        if body.get("phoneNumber"):
            return {"provider": "twilio", "number": body["phoneNumber"].get("twilioPhoneNumber"),
                    **body["phoneNumber"]}
        raise VapiError(400, "Need Either `phoneNumberId` Or `phoneNumber`.")

    def _server(self, assistant: dict | None, number: dict | None) -> dict | None:
        """Where server messages go: the assistant's server, else the number's, else the org's."""
        for source in (assistant, number):
            if isinstance(source, dict) and (source.get("server") or {}).get("url"):
                return source["server"]
        return self.vapi.server

    @staticmethod
    def _monitor(request: Request, call_id: str, assistant: dict | None) -> dict:
        """``call.monitor``: the URLs the assistant's ``monitorPlan`` enables (both by default)."""
        found = (assistant or {}).get("monitorPlan")
        plan: dict = found if isinstance(found, dict) else {}
        monitor = {}
        if plan.get("listenEnabled", True) is not False:
            monitor["listenUrl"] = f"{_ws_base(request)}/call/{call_id}/listen"
        if plan.get("controlEnabled", True) is not False:
            monitor["controlUrl"] = f"{_base(request)}/call/{call_id}/control"
        return monitor

    @staticmethod
    def _control_auth(assistant: dict | None) -> bool:
        plan = (assistant or {}).get("monitorPlan")
        return isinstance(plan, dict) and plan.get("controlAuthenticationEnabled") is True

    def _dial(self, record: dict, number: dict, stream_url: str) -> None:
        """Outbound phone call: when the Twilio simulator shares the state, Vapi asks it to dial."""
        twilio = self.state.twilio
        owned = twilio.number_by_phone(number.get("number") or "") if self.state.link else None
        if owned is None:
            return
        call = SimCall(sid=twilio_sid("CA"), account_sid=owned["account_sid"], to=record["customer"]["number"],
                       from_=owned["phone_number"], twiml=stream_twiml(stream_url), phone_number_sid=owned["sid"])
        record.update(phoneCallProviderId=call.sid, transport=twilio_transport(owned["account_sid"], call.sid))
        twilio.add_call(call)

    async def list_calls(self, request: Request, body: Any) -> Response:
        records = [c.record for c in self.vapi.calls.values()]
        for name in ("id", "assistantId", "phoneNumberId"):
            if request.query_params.get(name):
                records = [r for r in records if r.get(name) == request.query_params[name]]
        return JSONResponse(_newest_first(records, request))

    async def get_call(self, request: Request, body: Any) -> Response:
        call = self.vapi.calls.get(request.path_params["id"])
        if call is None:
            raise VapiError(404, "Call not found")
        return JSONResponse(call.record)

    async def control(self, request: Request, body: Any) -> Response:
        """Live Call Control: validated, published to the call's driver; end-call ends the record."""
        call = self.vapi.calls.get(request.path_params["id"])
        if call is None:
            raise VapiError(404, "Call not found")
        if call.control_auth:   # monitorPlan.controlAuthenticationEnabled: Bearer <the org's public key>
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.state.credentials.vapi_public_key.encode()):
                raise VapiError(401, INVALID_KEY)
        kind = body.get("type") if isinstance(body, dict) else None
        schema = CONTROL_SCHEMAS.get(kind) if isinstance(kind, str) else None
        if schema is None:
            raise VapiError(400, [f"type must be one of the following values: {', '.join(CONTROL_SCHEMAS)}"])
        check(body, schema)
        if call.status == "ended":
            raise VapiError(400, "Call has already ended.")
        if body["type"] == "end-call":
            call.set_status("ended", "manually-canceled")
        call.hub.publish(body)
        return JSONResponse({})

    async def twilio_inbound(self, request: Request) -> Response:
        """Twilio's voice webhook for an imported number: start an inbound call, stream it to Vapi."""
        params = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        number = next((n for n in self.vapi.phone_numbers.values() if n["number"] == params.get("To")), None)
        if number is None:
            return Response(_say("This number is not set up in Vapi."), media_type="text/xml")
        token = number.get("twilioAuthToken")
        signature = request.headers.get("x-twilio-signature", "")
        if token and not RequestValidator(token).validate(str(request.url), params, signature):
            return Response("Invalid Twilio signature", status_code=403)
        assistant = self.vapi.assistants.get(number.get("assistantId") or "")
        record = self._stamp({"type": "inboundPhoneCall", "status": "ringing", "cost": 0,
                              "phoneCallProvider": "twilio", "phoneCallTransport": "pstn",
                              "phoneCallProviderId": params.get("CallSid"), "phoneNumberId": number["id"],
                              "transport": twilio_transport(params.get("AccountSid"), params.get("CallSid")),
                              "customer": {"number": params.get("From")}})
        if assistant is None:   # no assistant on the number: ask its server (assistant-request)
            assistant, refusal = await self._assistant_request(record, number)
            if refusal is not None:
                return Response(refusal, media_type="text/xml")
        if assistant and assistant.get("id") in self.vapi.assistants:
            record["assistantId"] = assistant["id"]
        record["monitor"] = self._monitor(request, record["id"], assistant)
        call = VapiCall(record["id"], record, "inbound", assistant=assistant, server=self._server(assistant, number),
                        audio_format=TWILIO_AUDIO, control_auth=self._control_auth(assistant))
        self.vapi.add_call(call)
        return Response(stream_twiml(f"{_ws_base(request)}/call/{record['id']}/twilio-stream"), media_type="text/xml")

    async def _assistant_request(self, record: dict, number: dict) -> tuple[dict | None, str | None]:
        """Vapi's ``assistant-request``: (the assistant to run, None), or (None, the TwiML that ends
        the call) with the call recorded as ended for the spec's reason."""
        server = self._server(None, number)

        def refuse(reason: str, say: str) -> tuple[None, str]:
            record.update(status="ended", endedReason=reason, endedAt=iso(now()))
            self.vapi.calls[record["id"]] = VapiCall(record["id"], record, "inbound", server=server)
            return None, _say(say)

        if not (server or {}).get("url"):
            return refuse("call-start-error-neither-assistant-nor-server-set",
                          "This number has no assistant and no server URL.")
        public = {k: v for k, v in number.items() if k not in ("twilioAuthToken", "twilioApiSecret")}
        message = {"type": "assistant-request", "timestamp": int(now().timestamp() * 1000), "call": record,
                   "phoneNumber": public, "customer": record["customer"]}
        poster = ServerPoster.for_server(server, self.vapi.credentials, timeout=ASSISTANT_REQUEST_TIMEOUT)
        try:
            reply = await poster(message)
        finally:
            await poster.aclose()
        self.vapi.assistant_requests.append((message, poster.replies[-1] if poster.replies else None))
        status = poster.replies[-1][1] if poster.replies else 0
        if status not in (200, 201) or not isinstance(reply, dict):
            return refuse("assistant-request-failed", "Sorry, this call could not be set up.")
        if isinstance(reply.get("error"), str) and reply["error"]:
            return refuse("assistant-request-returned-error", reply["error"])
        destination = reply.get("destination")
        if isinstance(destination, dict) and destination.get("number"):
            record.update(status="forwarding", destination=destination)
            self.vapi.calls[record["id"]] = VapiCall(record["id"], record, "inbound", server=server)
            response = VoiceResponse()
            if destination.get("message"):
                response.say(str(destination["message"]))
            response.dial(str(destination["number"]))
            return None, str(response)
        if reply.get("assistantId"):
            found = self.vapi.assistants.get(str(reply["assistantId"]))
            if found is None:
                return refuse("assistant-request-returned-invalid-assistant", "Sorry, this call could not be set up.")
            return _merge(found, reply.get("assistantOverrides")), None
        if isinstance(reply.get("assistant"), dict):
            errors = validate(reply["assistant"], "CreateAssistantDTO")
            if errors:
                return refuse("assistant-request-returned-invalid-assistant", "Sorry, this call could not be set up.")
            return _merge(reply["assistant"], reply.get("assistantOverrides")), None
        return refuse("assistant-request-returned-no-assistant", "Sorry, this call could not be set up.")


ASSISTANT_REQUEST_TIMEOUT = 7.5   # Vapi's fixed assistant-request deadline (the telephony 15 s cap, minus setup)
CREDENTIAL_SECRETS = ("token", "secretKey", "clientSecret")


def check_credential(body: Any) -> dict:
    """A custom credential (``CreateCustomCredentialDTO``) with a bearer or an hmac
    ``authenticationPlan`` (``BearerAuthenticationPlan``, ``HMACAuthenticationPlan``)."""
    if not isinstance(body, dict):
        raise VapiError(400, ["CreateCustomCredentialDTO must be an object"])
    errors = [f"property {k} should not exist" for k in body
              if k not in ("provider", "authenticationPlan", "name", "encryptionPlan")]
    if body.get("provider") != "custom-credential":
        errors.append("provider must be one of the following values: custom-credential")
    plan = body.get("authenticationPlan")
    if not isinstance(plan, dict) or plan.get("type") not in ("bearer", "hmac"):
        errors.append("authenticationPlan.type must be one of the following values: bearer, hmac "
                      "(the simulator's plans)")
    elif plan["type"] == "bearer" and not isinstance(plan.get("token"), str):
        errors.append("authenticationPlan.token must be a string")
    elif plan["type"] == "hmac":
        if not isinstance(plan.get("secretKey"), str):
            errors.append("authenticationPlan.secretKey must be a string")
        if plan.get("algorithm") not in ("sha256", "sha512", "sha1"):
            errors.append("authenticationPlan.algorithm must be one of the following values: sha256, sha512, sha1")
        if plan.get("signatureEncoding", "hex") not in ("hex", "base64"):
            errors.append("authenticationPlan.signatureEncoding must be one of the following values: hex, base64")
    if errors:
        raise VapiError(400, errors)
    return body


def _credential_view(record: dict) -> dict:
    """A credential as the API shows it: secrets are not viewable after creation."""
    plan = {k: v for k, v in (record.get("authenticationPlan") or {}).items() if k not in CREDENTIAL_SECRETS}
    return {**record, "authenticationPlan": plan}


CONTROL_SCHEMAS = {"add-message": "ClientInboundMessageAddMessage", "control": "ClientInboundMessageControl",
                   "say": "ClientInboundMessageSay", "end-call": "ClientInboundMessageEndCall",
                   "transfer": "ClientInboundMessageTransfer",
                   "send-transport-message": "ClientInboundMessageSendTransportMessage"}


def _say(text: str) -> str:
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return str(response)


def create_vapi_app(state: SimState, faults: Faults | None = None, extra_routes: list | None = None) -> Starlette:
    """The Vapi REST simulator as an ASGI app (plus ``/_sim/faults``).

    ``extra_routes`` (e.g. the simulated assistant's WebSocket routes ``/call/{id}/transport`` and
    ``/call/{id}/twilio-stream``) are matched before the REST routes.
    """
    faults = faults or Faults()
    api = VapiApi(state)

    def route(path: str, handler: Handler, method: str, auth: bool = True) -> Route:
        return Route(path, endpoint(state, handler, auth=auth), methods=[method])

    routes = [
        *(extra_routes or []),
        route("/assistant", api.create_assistant, "POST"), route("/assistant", api.list_assistants, "GET"),
        route("/assistant/{id}", api.get_assistant, "GET"), route("/assistant/{id}", api.update_assistant, "PATCH"),
        route("/assistant/{id}", api.delete_assistant, "DELETE"),
        route("/phone-number", api.create_number, "POST"), route("/phone-number", api.list_numbers, "GET"),
        route("/phone-number/{id}", api.get_number, "GET"), route("/phone-number/{id}", api.update_number, "PATCH"),
        route("/phone-number/{id}", api.delete_number, "DELETE"),
        route("/call", api.create_call, "POST"), route("/call", api.list_calls, "GET"),
        route("/call/{id}", api.get_call, "GET"), route("/call/{id}", api.update_call, "PATCH"),
        route("/call/{id}", api.delete_call, "DELETE"),
        route("/credential", api.create_credential, "POST"), route("/credential", api.list_credentials, "GET"),
        route("/credential/{id}", api.get_credential, "GET"),
        route("/credential/{id}", api.delete_credential, "DELETE"),
        # the control URL is a capability URL on Vapi's call host: no API key (monitorPlan defaults), or
        # Bearer <public key> with monitorPlan.controlAuthenticationEnabled
        route("/call/{id}/control", api.control, "POST", auth=False),
        Route("/twilio/inbound_call", api.twilio_inbound, methods=["POST"]),
        *control_routes(faults),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = f"Cannot {request.method} {request.url.path}"
        return JSONResponse(error_body(status, message), status_code=status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    # faults first: a rule applies to the requests that arrive while it is set
                    middleware=[Middleware(FaultMiddleware, faults=faults, error_body=_fault_body,
                                           latency=lambda method, path: state.latency.delay("vapi", method, path)),
                                Middleware(LatencyMiddleware, service="vapi", model=lambda: state.latency)])
    app.state.sim = state
    app.state.faults = faults
    return app
