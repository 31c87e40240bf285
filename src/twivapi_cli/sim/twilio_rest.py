"""A local stand-in for the part of Twilio's REST API (2010-04-01) that twivapi uses.

Paths, form-encoded bodies, JSON shapes (snake_case, ``PN``/``CA`` sids, RFC 2822 dates, ``uri``,
paging keys), status codes and error bodies (``{"code", "message", "more_info", "status"}``) follow
the real API closely enough that the unmodified ``twilio`` SDK works against it::

    client = Client(account_sid, auth_token)
    client.api.base_url = "http://127.0.0.1:4010"      # reference §5.4, option A

Routes (under ``/2010-04-01``): ``Accounts/{Sid}.json`` (GET), ``AvailablePhoneNumbers/{C}/{Type}.json``
(GET; any area code is offered), ``IncomingPhoneNumbers.json`` (GET, POST), ``IncomingPhoneNumbers/
{Sid}.json`` (GET, POST, DELETE), ``Applications.json`` (GET, POST), ``Applications/{Sid}.json`` (GET,
POST, DELETE: TwiML Apps, where a number with a VoiceApplicationSid sends its calls),
``Calls.json`` (GET, POST), ``Calls/{Sid}.json`` (GET, POST).

Calls are ``state.SimCall`` objects in ``state.twilio.calls``. ``POST Calls.json`` only registers the
call (status ``queued``) and runs ``state.twilio.on_call_created`` callbacks: whoever dials it (the
simulated caller) moves it on with ``call.set_status(...)``. ``POST Calls/{Sid}.json`` publishes a
``CallUpdate`` on the call's hub (``call.on_update(fn)`` / ``await call.subscribe().get()``):
``kind="status"`` for ``Status=completed|canceled`` (already applied to the resource), and
``kind="redirect"`` for new ``Twiml`` or ``Url`` — the driver fetches/obeys them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .faults import FaultMiddleware, Faults, control_routes
from .latency import LatencyMiddleware
from .state import TERMINAL, CallUpdate, SimCall, SimState, now, rfc2822, twilio_sid

API = "/2010-04-01"
ACCOUNT = API + "/Accounts/{account_sid}"
NUMBER_TYPES = ("Local", "TollFree", "Mobile", "National", "Voip", "SharedCost", "MachineToMachine")
E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class TwilioError(Exception):
    def __init__(self, status: int, code: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.code, self.message, **self.extra), status_code=self.status)


def error_body(status: int, code: int, message: str, **extra: Any) -> dict:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status, **extra}


def _fault_body(status: int) -> dict:
    return error_body(status, 20500 if status >= 500 else 20001,
                      "Internal Server Error" if status >= 500 else "Simulated fault")


def not_found(path: str) -> TwilioError:
    return TwilioError(404, 20404, f"The requested resource {path} was not found")


# --- request plumbing ----------------------------------------------------------------------------

class Form:
    """A parsed form or query string: first value by name, or all values of a repeated name."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def get(self, name: str, default: str | None = None) -> str | None:
        return next((v for k, v in self.pairs if k == name), default)

    def getlist(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def __contains__(self, name: str) -> bool:
        return any(k == name for k, _ in self.pairs)


def _check_auth(request: Request, state: SimState) -> None:
    """HTTP Basic with the account SID and auth token; the path's AccountSid must be that account."""
    creds = state.credentials
    header = request.headers.get("authorization", "")
    user = password = ""
    if header.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            pass
    path_sid = request.path_params.get("account_sid")
    good = (hmac.compare_digest(user, creds.account_sid) and hmac.compare_digest(password, creds.auth_token)
            and (path_sid is None or path_sid == creds.account_sid))
    if not good:
        raise TwilioError(401, 20003, "Authenticate", detail="Your AccountSid or AuthToken was incorrect.")


Handler = Callable[[Request, Form], Awaitable[Response]]


def endpoint(state: SimState, handler: Handler, *, query: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Auth, form (or query) parsing and TwilioError → JSON error, around one handler."""
    async def run(request: Request) -> Response:
        try:
            _check_auth(request, state)
            if query:
                form = Form(list(request.query_params.multi_items()))
            else:
                body = (await request.body()).decode("utf-8", "replace")
                form = Form(parse_qsl(body, keep_blank_values=True))
            return await handler(request, form)
        except TwilioError as exc:
            return exc.response()
    return run


def _page(request: Request, form: Form, key: str, items: list[dict]) -> dict:
    """Twilio's paging envelope; ``next_page_uri`` is relative, as twilio-python expects."""
    size = min(max(_int(form.get("PageSize"), 50, "PageSize"), 1), 1000)
    page = max(_int(form.get("Page"), 0, "Page"), 0)
    path = request.url.path
    chunk = items[page * size:(page + 1) * size]

    def uri(p: int) -> str:
        return f"{path}?{urlencode({'PageSize': size, 'Page': p})}"
    more = (page + 1) * size < len(items)
    return {key: chunk, "end": page * size + max(len(chunk) - 1, 0), "first_page_uri": uri(0),
            "next_page_uri": (uri(page + 1) + f"&PageToken=PA{page + 1}") if more else None,
            "page": page, "page_size": size, "previous_page_uri": uri(page - 1) if page else None,
            "start": page * size, "uri": uri(page)}


def _int(value: str | None, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise TwilioError(400, 20001, f"Invalid {name}: {value!r} is not an integer") from None


def _bool(value: str | None, name: str) -> bool | None:
    if value in (None, ""):
        return None
    if value.lower() not in ("true", "false"):
        raise TwilioError(400, 20001, f"Invalid {name}: {value!r} is not a boolean")
    return value.lower() == "true"


def _url(form: Form, name: str) -> str | None:
    value = form.get(name)
    if value in (None, ""):
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TwilioError(400, 21205 if name == "Url" else 21609, f"{name} is not a valid URL: {value}")
    return value


def _method(form: Form, name: str) -> str | None:
    value = form.get(name)
    if value in (None, ""):
        return None
    if value.upper() not in ("GET", "POST"):
        raise TwilioError(400, 20001, f"{name} must be GET or POST")
    return value.upper()


def formatted(number: str) -> str:
    """``+14155550100`` → ``(415) 555-0100``, as Twilio formats NANP numbers."""
    if number.startswith("+1") and len(number) == 12:
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


# --- resources -----------------------------------------------------------------------------------

AREAS = {"415": ("San Francisco", "CA", "722", "SNFC", "94103", "37.780000", "-122.410000"),
         "212": ("New York", "NY", "132", "NWYRCYZN01", "10001", "40.750000", "-73.990000"),
         "312": ("Chicago", "IL", "358", "CHCGOZN", "60601", "41.880000", "-87.630000"),
         "512": ("Austin", "TX", "558", "AUSTIN", "78701", "30.270000", "-97.740000")}
TOLL_FREE = ("800", "888", "877", "866", "855", "844", "833")

# form field -> resource field, for IncomingPhoneNumbers create/update (the settable subset)
NUMBER_FIELDS = {
    "FriendlyName": "friendly_name", "VoiceUrl": "voice_url", "VoiceMethod": "voice_method",
    "VoiceFallbackUrl": "voice_fallback_url", "VoiceFallbackMethod": "voice_fallback_method",
    "StatusCallback": "status_callback", "StatusCallbackMethod": "status_callback_method",
    "VoiceCallerIdLookup": "voice_caller_id_lookup", "VoiceApplicationSid": "voice_application_sid",
    "SmsUrl": "sms_url", "SmsMethod": "sms_method", "SmsFallbackUrl": "sms_fallback_url",
    "SmsFallbackMethod": "sms_fallback_method", "SmsApplicationSid": "sms_application_sid",
    "TrunkSid": "trunk_sid", "VoiceReceiveMode": "voice_receive_mode", "AddressSid": "address_sid",
    "IdentitySid": "identity_sid", "BundleSid": "bundle_sid", "EmergencyStatus": "emergency_status",
    "EmergencyAddressSid": "emergency_address_sid",
}
URL_FIELDS = {"VoiceUrl", "VoiceFallbackUrl", "StatusCallback", "SmsUrl", "SmsFallbackUrl"}
METHOD_FIELDS = {"VoiceMethod", "VoiceFallbackMethod", "StatusCallbackMethod", "SmsMethod", "SmsFallbackMethod"}


def _number_values(form: Form) -> dict:
    values: dict[str, Any] = {}
    for name, attr in NUMBER_FIELDS.items():
        if name not in form:
            continue
        if name in URL_FIELDS:
            values[attr] = _url(form, name) or ""
        elif name in METHOD_FIELDS:
            values[attr] = _method(form, name) or "POST"
        elif name == "VoiceCallerIdLookup":
            values[attr] = _bool(form.get(name), name)
        else:
            values[attr] = form.get(name) or None
    return values


# form field -> resource field, for Applications (TwiML Apps) create/update
APPLICATION_FIELDS = {
    "FriendlyName": "friendly_name", "VoiceUrl": "voice_url", "VoiceMethod": "voice_method",
    "VoiceFallbackUrl": "voice_fallback_url", "VoiceFallbackMethod": "voice_fallback_method",
    "StatusCallback": "status_callback", "StatusCallbackMethod": "status_callback_method",
    "VoiceCallerIdLookup": "voice_caller_id_lookup", "SmsUrl": "sms_url", "SmsMethod": "sms_method",
    "SmsFallbackUrl": "sms_fallback_url", "SmsFallbackMethod": "sms_fallback_method",
    "SmsStatusCallback": "sms_status_callback", "MessageStatusCallback": "message_status_callback",
    "PublicApplicationConnectEnabled": "public_application_connect_enabled",
}


def _application_values(form: Form) -> dict:
    values: dict[str, Any] = {}
    for name, attr in APPLICATION_FIELDS.items():
        if name not in form:
            continue
        if name in URL_FIELDS or name in ("SmsStatusCallback", "MessageStatusCallback"):
            values[attr] = _url(form, name) or ""
        elif name in METHOD_FIELDS:
            values[attr] = _method(form, name) or "POST"
        elif name in ("VoiceCallerIdLookup", "PublicApplicationConnectEnabled"):
            values[attr] = _bool(form.get(name), name)
        else:
            values[attr] = form.get(name) or None
    return values


def new_application(account_sid: str, values: dict) -> dict:
    moment = rfc2822(now())
    return {
        "account_sid": account_sid, "api_version": "2010-04-01", "date_created": moment, "date_updated": moment,
        "friendly_name": None, "message_status_callback": "", "sid": twilio_sid("AP"), "sms_fallback_method": "POST",
        "sms_fallback_url": "", "sms_method": "POST", "sms_status_callback": "", "sms_url": "",
        "status_callback": "", "status_callback_method": "POST", "voice_caller_id_lookup": False,
        "voice_fallback_method": "POST", "voice_fallback_url": "", "voice_method": "POST", "voice_url": "",
        "public_application_connect_enabled": True, **values,
    }


def application_json(app: dict) -> dict:
    return {**app, "uri": f"{API}/Accounts/{app['account_sid']}/Applications/{app['sid']}.json"}


def new_number(account_sid: str, phone_number: str, values: dict) -> dict:
    moment = rfc2822(now())
    return {
        "account_sid": account_sid, "address_requirements": "none", "address_sid": None,
        "api_version": "2010-04-01", "beta": False,
        "capabilities": {"fax": False, "mms": True, "sms": True, "voice": True},
        "date_created": moment, "date_updated": moment, "emergency_status": "Inactive",
        "emergency_address_sid": None, "emergency_address_status": "unregistered",
        "friendly_name": formatted(phone_number), "identity_sid": None, "origin": "twilio",
        "phone_number": phone_number, "sid": twilio_sid("PN"), "sms_application_sid": None,
        "sms_fallback_method": "POST", "sms_fallback_url": "", "sms_method": "POST", "sms_url": "",
        "status_callback": "", "status_callback_method": "POST", "trunk_sid": None,
        "voice_application_sid": None, "voice_caller_id_lookup": False, "voice_fallback_method": "POST",
        "voice_fallback_url": "", "voice_method": "POST", "voice_url": "", "bundle_sid": None,
        "voice_receive_mode": "voice", "status": "in-use", "type": "local", **values,
    }


def number_json(number: dict) -> dict:
    return {**number, "uri": f"{API}/Accounts/{number['account_sid']}/IncomingPhoneNumbers/{number['sid']}.json"}


def call_json(call: SimCall) -> dict:
    base = f"{API}/Accounts/{call.account_sid}/Calls/{call.sid}"
    subs = ("notifications", "recordings", "payments", "events", "siprec", "streams", "transcriptions",
            "user_defined_message_subscriptions", "user_defined_messages")
    camel = {"user_defined_message_subscriptions": "UserDefinedMessageSubscriptions",
             "user_defined_messages": "UserDefinedMessages"}
    return {
        "account_sid": call.account_sid, "answered_by": None, "api_version": "2010-04-01",
        "caller_name": None, "date_created": rfc2822(call.date_created), "date_updated": rfc2822(call.date_updated),
        "direction": call.direction, "duration": call.duration, "end_time": rfc2822(call.end_time),
        "forwarded_from": None, "from": call.from_, "from_formatted": formatted(call.from_),
        "group_sid": None, "parent_call_sid": call.parent_call_sid, "phone_number_sid": call.phone_number_sid,
        "price": None, "price_unit": "USD", "queue_time": "0", "sid": call.sid,
        "start_time": rfc2822(call.start_time), "status": call.status,
        "subresource_uris": {s: f"{base}/{camel.get(s, s.capitalize())}.json" for s in subs},
        "to": call.to, "to_formatted": formatted(call.to), "trunk_sid": None, "uri": f"{base}.json",
    }


def _template(contains: str) -> str:
    """Twilio's ``Contains`` as digits and ``*`` (any digit): keypad letters become their digit."""
    keypad = {c: d for d, cs in {"2": "ABC", "3": "DEF", "4": "GHI", "5": "JKL", "6": "MNO", "7": "PQRS",
                                  "8": "TUV", "9": "WXYZ"}.items() for c in cs}
    out = []
    for ch in contains.upper().lstrip("+"):
        if ch == "*" or ch.isdigit():
            out.append(ch)
        elif ch in keypad:
            out.append(keypad[ch])
        else:
            raise TwilioError(400, 20001, f"Invalid Contains pattern: {contains!r}")
    return "".join(out)


def _area_code(value: str | None, toll_free: bool) -> str | None:
    if value in (None, ""):
        return None
    if not re.fullmatch(r"[2-9]\d\d", value) or (toll_free and value not in TOLL_FREE):
        raise TwilioError(400, 21451, f"Invalid area code: {value}")
    return value


def _candidates(state: SimState, area: str, contains: str | None, count: int) -> list[str]:
    """Unowned numbers in ``area`` (555-01xx, the fictional range) with ``contains`` at the end."""
    rng = state.twilio._random
    template = _template(contains)[-10:] if contains else ""
    found: list[str] = []
    for _ in range(count * 20):
        body = f"{area}555{rng.randint(100, 199):04d}"
        filled = "".join(str(rng.randint(0, 9)) if c == "*" else c for c in template)
        body = body[:10 - len(filled)] + filled
        number = "+1" + body
        if body.startswith(area) and number not in found and state.twilio.number_by_phone(number) is None:
            found.append(number)
        if len(found) == count:
            break
    return found


def _available_entry(number: str, country: str, toll_free: bool) -> dict:
    area = number[2:5]
    locality, region, lata, rate_center, postal, lat, lon = AREAS.get(area, (None,) * 7)
    if toll_free:
        locality = region = lata = rate_center = postal = lat = lon = None
    return {"friendly_name": formatted(number), "phone_number": number, "lata": lata, "locality": locality,
            "rate_center": rate_center, "latitude": lat, "longitude": lon, "region": region,
            "postal_code": postal, "iso_country": country, "address_requirements": "none", "beta": False,
            # the uppercase SMS/MMS of the real search response (twilio-node #553)
            "capabilities": {"voice": True, "SMS": True, "MMS": True, "fax": False}}


# --- handlers ------------------------------------------------------------------------------------

class TwilioApi:
    def __init__(self, state: SimState):
        self.state = state
        self.twilio = state.twilio

    async def fetch_account(self, request: Request, form: Form) -> Response:
        sid = self.state.credentials.account_sid
        base = f"{API}/Accounts/{sid}"
        subs = {name: f"{base}/{path}.json" for name, path in (
            ("available_phone_numbers", "AvailablePhoneNumbers"), ("calls", "Calls"),
            ("incoming_phone_numbers", "IncomingPhoneNumbers"))}
        moment = rfc2822(now())
        return JSONResponse({"auth_token": self.state.credentials.auth_token, "date_created": moment,
                             "date_updated": moment, "friendly_name": "twivapi simulated account",
                             "owner_account_sid": sid, "sid": sid, "status": "active", "subresource_uris": subs,
                             "type": "Full", "uri": f"{base}.json"})

    async def search(self, request: Request, form: Form) -> Response:
        country, kind = request.path_params["country"].upper(), request.path_params["kind"]
        if kind not in NUMBER_TYPES:
            raise not_found(request.url.path)
        toll_free = kind == "TollFree"
        area = _area_code(form.get("AreaCode"), toll_free)
        _bool(form.get("VoiceEnabled"), "VoiceEnabled")
        count = min(max(_int(form.get("PageSize"), 30, "PageSize"), 1), 50)
        numbers: list[str] = []
        if country in ("US", "CA"):   # NANP numbers only; elsewhere: no match, an empty list
            area = area or (self.twilio._random.choice(TOLL_FREE) if toll_free else "415")
            numbers = _candidates(self.state, area, form.get("Contains"), count)
        self.twilio.offered.update(numbers)
        entries = [_available_entry(n, country, toll_free) for n in numbers]
        return JSONResponse(_page(request, Form([("PageSize", str(count))]), "available_phone_numbers", entries))

    async def list_numbers(self, request: Request, form: Form) -> Response:
        numbers = list(self.twilio.numbers.values())
        pattern = form.get("PhoneNumber")
        if pattern:
            wanted = re.compile(re.escape(pattern).replace(r"\*", r"\d"))
            numbers = [n for n in numbers if wanted.search(n["phone_number"])]
        if form.get("FriendlyName"):
            numbers = [n for n in numbers if n["friendly_name"] == form.get("FriendlyName")]
        return JSONResponse(_page(request, form, "incoming_phone_numbers", [number_json(n) for n in numbers]))

    async def buy_number(self, request: Request, form: Form) -> Response:
        phone, area = form.get("PhoneNumber"), form.get("AreaCode")
        values = _number_values(form)
        if phone:
            if not E164.match(phone):
                raise TwilioError(400, 21421, f"PhoneNumber {phone} is invalid")
            if phone not in self.twilio.offered or self.twilio.number_by_phone(phone):
                raise TwilioError(400, 21422, "PhoneNumber is not available")
        elif area:
            _area_code(area, False)   # an invalid one is a 400
            phone = self.twilio.fresh_number(area)
        else:
            raise TwilioError(400, 21421, "A PhoneNumber or an AreaCode is required")
        number = new_number(self.state.credentials.account_sid, phone, values)
        self.twilio.numbers[number["sid"]] = number
        self.twilio.offered.discard(phone)
        return JSONResponse(number_json(number), status_code=201)

    def _number(self, request: Request) -> dict:
        number = self.twilio.numbers.get(request.path_params["sid"])
        if number is None:
            raise not_found(request.url.path)
        return number

    async def fetch_number(self, request: Request, form: Form) -> Response:
        return JSONResponse(number_json(self._number(request)))

    async def update_number(self, request: Request, form: Form) -> Response:
        number = self._number(request)
        number.update(_number_values(form))
        number["date_updated"] = rfc2822(now())
        return JSONResponse(number_json(number))

    async def delete_number(self, request: Request, form: Form) -> Response:
        number = self._number(request)
        del self.twilio.numbers[number["sid"]]
        return Response(status_code=204)

    # TwiML Apps: a number bound to one (VoiceApplicationSid) has its calls sent to the app's voice URL
    async def create_application(self, request: Request, form: Form) -> Response:
        app = new_application(self.state.credentials.account_sid, _application_values(form))
        self.twilio.applications[app["sid"]] = app
        return JSONResponse(application_json(app), status_code=201)

    async def list_applications(self, request: Request, form: Form) -> Response:
        apps = list(self.twilio.applications.values())
        if form.get("FriendlyName"):
            apps = [a for a in apps if a["friendly_name"] == form.get("FriendlyName")]
        return JSONResponse(_page(request, form, "applications", [application_json(a) for a in apps]))

    def _application(self, request: Request) -> dict:
        app = self.twilio.applications.get(request.path_params["sid"])
        if app is None:
            raise not_found(request.url.path)
        return app

    async def fetch_application(self, request: Request, form: Form) -> Response:
        return JSONResponse(application_json(self._application(request)))

    async def update_application(self, request: Request, form: Form) -> Response:
        app = self._application(request)
        app.update(_application_values(form))
        app["date_updated"] = rfc2822(now())
        return JSONResponse(application_json(app))

    async def delete_application(self, request: Request, form: Form) -> Response:
        del self.twilio.applications[self._application(request)["sid"]]
        return Response(status_code=204)

    async def create_call(self, request: Request, form: Form) -> Response:
        to, from_ = form.get("To"), form.get("From")
        if not to:
            raise TwilioError(400, 21201, "No 'To' number is specified")
        if not from_:
            raise TwilioError(400, 21213, "No 'From' number is specified")
        if not E164.match(to) and not to.startswith(("client:", "sip:")):
            raise TwilioError(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if E164.match(from_) and self.twilio.number_by_phone(from_) is None:
            raise TwilioError(400, 21210, f"The source phone number provided, {from_}, is not yet verified "
                                          "for your account. You may only make calls from phone numbers "
                                          "that you've verified or purchased from Twilio.")
        url, twiml = _url(form, "Url"), form.get("Twiml")
        if not (url or twiml or form.get("ApplicationSid")):
            raise TwilioError(400, 21205, "Url parameter is required. For more information, see "
                                          "http://www.twilio.com/docs/api/twiml")
        _int(form.get("Timeout"), 60, "Timeout")
        owned = self.twilio.number_by_phone(from_)
        call = SimCall(sid=twilio_sid("CA"), account_sid=self.state.credentials.account_sid, to=to, from_=from_,
                       url=url, method=_method(form, "Method") or "POST", twiml=twiml,
                       status_callback=_url(form, "StatusCallback"),
                       status_callback_method=_method(form, "StatusCallbackMethod") or "POST",
                       status_callback_events=form.getlist("StatusCallbackEvent") or ["completed"],
                       phone_number_sid=owned["sid"] if owned else None)
        self.twilio.add_call(call)
        return JSONResponse(call_json(call), status_code=201)

    async def list_calls(self, request: Request, form: Form) -> Response:
        calls = sorted(self.twilio.calls.values(), key=lambda c: c.date_created, reverse=True)
        for name, attr in (("To", "to"), ("From", "from_"), ("Status", "status")):
            if form.get(name):
                calls = [c for c in calls if getattr(c, attr) == form.get(name)]
        return JSONResponse(_page(request, form, "calls", [call_json(c) for c in calls]))

    def _call(self, request: Request) -> SimCall:
        call = self.twilio.calls.get(request.path_params["sid"])
        if call is None:
            raise not_found(request.url.path)
        return call

    async def fetch_call(self, request: Request, form: Form) -> Response:
        return JSONResponse(call_json(self._call(request)))

    async def update_call(self, request: Request, form: Form) -> Response:
        call = self._call(request)
        status, twiml, url = form.get("Status"), form.get("Twiml"), _url(form, "Url")
        if status and status not in ("completed", "canceled"):
            raise TwilioError(400, 20001, f"Invalid Status: {status} (must be completed or canceled)")
        if twiml and url:   # the API description: "Twiml and url parameters are mutually exclusive"
            raise TwilioError(400, 20001, "Twiml and Url parameters are mutually exclusive")
        if twiml:
            _check_twiml(twiml)
        if (twiml or url) and call.status in TERMINAL:
            raise TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")
        if form.get("StatusCallback"):
            call.status_callback = _url(form, "StatusCallback")
        if twiml or url:
            call.twiml, call.url = (twiml, None) if twiml else (None, url)
            call.method = _method(form, "Method") or "POST"
            call.date_updated = now()
            call.hub.publish(CallUpdate("redirect", twiml=twiml, url=None if twiml else url, method=call.method))
        if status:
            self._hang_up(call, status)
        return JSONResponse(call_json(call))

    def _hang_up(self, call: SimCall, status: str) -> None:
        """completed ends a call whatever its state; canceled only one not yet answered."""
        if call.status in TERMINAL:
            return
        if status == "canceled" and call.status == "in-progress":
            return
        final = "completed" if call.status == "in-progress" else "canceled"
        call.set_status(final)
        call.hub.publish(CallUpdate("status", status=final))


def _check_twiml(twiml: str) -> None:
    """A ``Twiml`` parameter is parsed as Twilio parses it: XML with a ``<Response>`` root (12100)."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        raise TwilioError(400, 12100, f"Document parse failure: {exc}") from None
    if root.tag != "Response":
        raise TwilioError(400, 12100, "Document parse failure: the root element must be <Response>")


def create_twilio_app(state: SimState, faults: Faults | None = None) -> Starlette:
    """The Twilio REST simulator as an ASGI app (plus ``/_sim/faults``)."""
    faults = faults or Faults()
    api = TwilioApi(state)

    def route(path: str, handler: Handler, methods: list[str], query: bool = False) -> Route:
        return Route(path, endpoint(state, handler, query=query), methods=methods)

    numbers, calls, apps = ACCOUNT + "/IncomingPhoneNumbers", ACCOUNT + "/Calls", ACCOUNT + "/Applications"
    routes = [
        route(API + "/Accounts/{account_sid}.json", api.fetch_account, ["GET"], True),
        route(ACCOUNT + "/AvailablePhoneNumbers/{country}/{kind}.json", api.search, ["GET"], True),
        route(numbers + ".json", api.list_numbers, ["GET"], True),
        route(numbers + ".json", api.buy_number, ["POST"]),
        route(numbers + "/{sid}.json", api.fetch_number, ["GET"], True),
        route(numbers + "/{sid}.json", api.update_number, ["POST"]),
        route(numbers + "/{sid}.json", api.delete_number, ["DELETE"], True),
        route(apps + ".json", api.list_applications, ["GET"], True),
        route(apps + ".json", api.create_application, ["POST"]),
        route(apps + "/{sid}.json", api.fetch_application, ["GET"], True),
        route(apps + "/{sid}.json", api.update_application, ["POST"]),
        route(apps + "/{sid}.json", api.delete_application, ["DELETE"], True),
        route(calls + ".json", api.list_calls, ["GET"], True),
        route(calls + ".json", api.create_call, ["POST"]),
        route(calls + "/{sid}.json", api.fetch_call, ["GET"], True),
        route(calls + "/{sid}.json", api.update_call, ["POST"]),
        *control_routes(faults),
    ]

    async def unknown(request: Request, exc: Exception) -> Response:
        return not_found(request.url.path).response()

    app = Starlette(routes=routes, exception_handlers={404: unknown},
                    # faults first: a rule applies to the requests that arrive while it is set
                    middleware=[Middleware(FaultMiddleware, faults=faults, error_body=_fault_body,
                                           latency=lambda method, path: state.latency.delay("twilio", method, path)),
                                Middleware(LatencyMiddleware, service="twilio", model=lambda: state.latency)])
    app.state.sim = state
    app.state.faults = faults
    return app
