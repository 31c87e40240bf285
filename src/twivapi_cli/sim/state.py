"""In-memory state of the simulated Twilio account and Vapi org, shared by both REST apps and by
whatever drives a simulated call (the simulated caller, the simulated assistant).

``SimState`` holds ``credentials``, ``twilio`` (numbers, calls) and ``vapi`` (assistants, phone
numbers, calls). Everything is plain dicts and dataclasses, read and written on the simulator's
event loop; tests may read it from another thread.

Driving calls: ``SimCall`` (Twilio) and ``VapiCall`` (Vapi) each carry a small pub/sub hook, so a
REST request that changes a live call reaches whoever drives it:

    call.on_update(fn)        fn(update) runs on the simulator's loop, inline, for every update
    q = call.subscribe()      an asyncio.Queue on the *calling* loop receiving every update
                              (safe across threads: delivered with call_soon_threadsafe)

Twilio updates are ``CallUpdate(kind="status"|"redirect", ...)`` from ``POST Calls/{Sid}.json``;
Vapi updates are the Live Call Control messages (``{"type": "end-call"}`` ...) from
``POST /call/{id}/control``. ``TwilioState.on_call_created`` / ``VapiState.on_call_created`` list
callbacks run for each new call (e.g. to start driving an outbound call).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .latency import LatencyModel

DEMO_ACCOUNT_SID = "AC" + "0" * 32                      # demo value: all zeros, obviously not real
DEMO_AUTH_TOKEN = "demo" + "0" * 28                     # demo value (32 chars, like a real token)
DEMO_VAPI_API_KEY = "demo-vapi-key-00000000000000000000"  # demo value
DEMO_WEBHOOK_SECRET = "demo-vapi-webhook-secret"        # demo value
DEMO_VAPI_PUBLIC_KEY = "demo-vapi-public-key-0000000000000"  # demo value: the org's public key (control auth)

TERMINAL = ("completed", "busy", "failed", "no-answer", "canceled")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc2822(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def twilio_sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def twilio_transport(account_sid: str | None, call_sid: str | None) -> dict[str, Any]:
    """A phone call's ``TwilioTransport`` (the spec's ``Call.transport``): where Vapi puts the
    CallSid now (``phoneCallProviderId`` is deprecated, still sent)."""
    transport: dict[str, Any] = {"provider": "twilio", "conversationType": "voice"}
    if account_sid:
        transport["accountSid"] = account_sid
    if call_sid:
        transport["callSid"] = call_sid
    return transport


@dataclass(frozen=True)
class SimCredentials:
    account_sid: str = DEMO_ACCOUNT_SID
    auth_token: str = DEMO_AUTH_TOKEN
    vapi_api_key: str = DEMO_VAPI_API_KEY
    vapi_webhook_secret: str = DEMO_WEBHOOK_SECRET     # printed as VAPI_WEBHOOK_SECRET (servers say how to sign)
    vapi_public_key: str = DEMO_VAPI_PUBLIC_KEY        # the org's public key: control URLs with authentication

    @classmethod
    def from_settings(cls, settings: Any) -> SimCredentials:
        """The user's TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, VAPI_API_KEY, VAPI_WEBHOOK_SECRET,
        VAPI_PUBLIC_KEY when set, demo values otherwise."""
        def reveal(value: Any) -> str | None:
            return value.reveal() if hasattr(value, "reveal") else value
        return cls(account_sid=settings.twilio_account_sid or DEMO_ACCOUNT_SID,
                   auth_token=reveal(settings.twilio_auth_token) or DEMO_AUTH_TOKEN,
                   vapi_api_key=reveal(settings.vapi_api_key) or DEMO_VAPI_API_KEY,
                   vapi_webhook_secret=reveal(settings.vapi_webhook_secret) or DEMO_WEBHOOK_SECRET,
                   vapi_public_key=reveal(getattr(settings, "vapi_public_key", None)) or DEMO_VAPI_PUBLIC_KEY)


class Hub:
    """Fan-out of updates to inline callbacks and to asyncio queues on any loop."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Any], Any]] = []
        self._queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.history: list[Any] = []

    def on_update(self, fn: Callable[[Any], Any]) -> Callable[[], None]:
        self._callbacks.append(fn)
        return lambda: self._callbacks.remove(fn) if fn in self._callbacks else None

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.append((asyncio.get_running_loop(), queue))
        return queue

    def publish(self, update: Any) -> None:
        self.history.append(update)
        for fn in list(self._callbacks):
            fn(update)
        for loop, queue in list(self._queues):
            if loop.is_closed():
                self._queues.remove((loop, queue))
            else:
                loop.call_soon_threadsafe(queue.put_nowait, update)


@dataclass(frozen=True)
class CallUpdate:
    """A change asked through Twilio's REST API: hang up (status) or new instructions (redirect)."""

    kind: str                      # "status" | "redirect"
    status: str | None = None      # completed | canceled
    twiml: str | None = None
    url: str | None = None
    method: str = "POST"


@dataclass
class SimCall:
    """One simulated Twilio call: its REST resource fields plus the hook for its driver."""

    sid: str
    account_sid: str
    to: str
    from_: str
    direction: str = "outbound-api"          # or "inbound"
    status: str = "queued"
    url: str | None = None
    method: str = "POST"
    twiml: str | None = None
    status_callback: str | None = None
    status_callback_method: str = "POST"
    status_callback_events: list[str] = field(default_factory=list)
    phone_number_sid: str | None = None
    parent_call_sid: str | None = None       # a <Dial> leg's: the call that dialled it
    date_created: dt.datetime = field(default_factory=now)
    date_updated: dt.datetime = field(default_factory=now)
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    hub: Hub = field(default_factory=Hub, repr=False)

    def on_update(self, fn: Callable[[CallUpdate], Any]) -> Callable[[], None]:
        return self.hub.on_update(fn)

    def subscribe(self) -> asyncio.Queue:
        return self.hub.subscribe()

    def set_status(self, status: str) -> None:
        """For the driver: record progress (ringing, in-progress, completed...)."""
        moment = now()
        if status == "in-progress" and self.start_time is None:
            self.start_time = moment
        if status in TERMINAL and self.end_time is None:
            self.end_time = moment
        self.status, self.date_updated = status, moment

    @property
    def duration(self) -> str | None:
        if self.end_time is None:
            return None
        if self.start_time is None:
            return "0"
        return str(int((self.end_time - self.start_time).total_seconds()))


class TwilioState:
    def __init__(self, seed: int | None = None) -> None:
        self.numbers: dict[str, dict] = {}          # PN sid -> resource fields (Twilio JSON, no uri)
        self.applications: dict[str, dict] = {}     # AP sid -> TwiML App fields (Twilio JSON, no uri)
        # TK sid -> {"sid", "origination_url"}: Elastic SIP trunks live in another API (trunking.twilio.com),
        # not simulated; a test adds one with add_trunk() and binds a number to it (TrunkSid)
        self.trunks: dict[str, dict] = {}
        self.calls: dict[str, SimCall] = {}
        self.offered: set[str] = set()              # numbers a search returned: buyable
        self.on_call_created: list[Callable[[SimCall], Any]] = []
        self._random = random.Random(seed)

    def number_by_phone(self, phone_number: str) -> dict | None:
        return next((n for n in self.numbers.values() if n["phone_number"] == phone_number), None)

    def fresh_number(self, area_code: str) -> str:
        """A number in ``area_code`` nobody owns; 555-01xx is reserved for fiction."""
        for _ in range(1000):
            candidate = f"+1{area_code}5550{self._random.randint(100, 199)}"
            if self.number_by_phone(candidate) is None:
                return candidate
        candidate = f"+1{area_code}{self._random.randint(2000000, 9999999)}"
        return candidate

    def add_trunk(self, origination_url: str | None = None) -> str:
        """A SIP trunk whose calls go to ``origination_url``; returns its TK sid."""
        trunk_sid = twilio_sid("TK")
        self.trunks[trunk_sid] = {"sid": trunk_sid, "origination_url": origination_url}
        return trunk_sid

    def voice_route(self, number: dict) -> dict[str, Any]:
        """Where Twilio sends a call to ``number``, as it does: to its SIP trunk when it has a
        ``trunk_sid``, else to its TwiML App's voice URL when it has a ``voice_application_sid``,
        else to its own ``voice_url``: a bound number never calls its voice URL. (``url``, ``method``,
        ``status_callback``, ``status_callback_method``; an unknown app or trunk: no URL.)"""
        if number.get("trunk_sid"):
            trunk = self.trunks.get(number["trunk_sid"]) or {}
            return {"url": trunk.get("origination_url"), "method": "POST", "status_callback": None,
                    "status_callback_method": "POST"}
        owner = number
        if number.get("voice_application_sid"):
            owner = self.applications.get(number["voice_application_sid"]) or {}
        return {"url": owner.get("voice_url") or None, "method": owner.get("voice_method") or "POST",
                "status_callback": owner.get("status_callback") or None,
                "status_callback_method": owner.get("status_callback_method") or "POST"}

    def add_call(self, call: SimCall) -> SimCall:
        self.calls[call.sid] = call
        for fn in list(self.on_call_created):
            fn(call)
        return call

    def start_inbound_call(self, to: str, from_: str, call_sid: str | None = None,
                           status_callback_events: list[str] | None = None) -> SimCall:
        """For the simulated caller: someone dials ``to``, one of this account's numbers.

        The call carries the VoiceUrl/VoiceMethod/StatusCallback of where Twilio routes it
        (``voice_route``: the number's own, or its TwiML App's or SIP trunk's when it is bound to
        one); raises KeyError if the account does not own ``to``. A number's status callback gets
        the ``completed`` event only (``status_callback_events`` if the number asks for more).
        """
        number = self.number_by_phone(to)
        if number is None:
            raise KeyError(f"{to} is not a number of this account")
        route = self.voice_route(number)
        call = SimCall(sid=call_sid or twilio_sid("CA"), account_sid=number["account_sid"], to=to, from_=from_,
                       direction="inbound", status="ringing", url=route["url"], method=route["method"],
                       status_callback=route["status_callback"],
                       status_callback_method=route["status_callback_method"],
                       status_callback_events=list(status_callback_events or ["completed"]),
                       phone_number_sid=number["sid"])
        return self.add_call(call)


@dataclass
class VapiCall:
    """One simulated Vapi call: the JSON record served by the API plus what its assistant needs.

    ``kind``: ``websocket`` (vapi.websocket transport), ``bypass`` (phoneCallProviderBypassEnabled),
    ``inbound`` (an imported number was called) or ``phone`` (a plain outbound phone call).
    """

    id: str
    record: dict
    kind: str
    assistant: dict | None = None             # the resolved assistant config (saved + overrides)
    server: dict | None = None                # where server messages go: {"url", "headers", ...}
    audio_format: dict | None = None          # what the transport socket carries
    control_auth: bool = False                # monitorPlan.controlAuthenticationEnabled: control needs the public key
    hub: Hub = field(default_factory=Hub, repr=False)

    @property
    def status(self) -> str:
        return self.record.get("status", "queued")

    @property
    def server_url(self) -> str | None:
        return (self.server or {}).get("url")

    def on_control(self, fn: Callable[[dict], Any]) -> Callable[[], None]:
        return self.hub.on_update(fn)

    def subscribe(self) -> asyncio.Queue:
        return self.hub.subscribe()

    def set_status(self, status: str, ended_reason: str | None = None) -> None:
        """For the driver (and end-call): move the call on; timestamps follow."""
        moment = iso(now())
        self.record["status"] = status
        self.record["updatedAt"] = moment
        if status == "in-progress":
            self.record.setdefault("startedAt", moment)
        if status == "ended":
            self.record.setdefault("endedAt", moment)
            if ended_reason:
                self.record.setdefault("endedReason", ended_reason)


class VapiState:
    def __init__(self, webhook_secret: str | None = None) -> None:
        self.org_id = str(uuid.uuid4())
        self.assistants: dict[str, dict] = {}
        self.phone_numbers: dict[str, dict] = {}
        self.calls: dict[str, VapiCall] = {}
        self.server: dict | None = None           # org-level server (url, headers, credentialId): the last resort
        self.credentials: dict[str, dict] = {}    # POST /credential: custom credentials a server.credentialId names
        # the secret `twivapi sim` prints as VAPI_WEBHOOK_SECRET (set by SimState); server messages are
        # signed only as their server says (headers, credentialId), never with this by default
        self.webhook_secret = webhook_secret
        self.on_call_created: list[Callable[[VapiCall], Any]] = []
        self.drivers: dict[str, Any] = {}          # call id -> the simulated assistant driving it
        self.assistant_requests: list[tuple[dict, Any]] = []   # (assistant-request sent, (type, status, reply))

    def add_call(self, call: VapiCall) -> VapiCall:
        self.calls[call.id] = call
        for fn in list(self.on_call_created):
            fn(call)
        return call

    def find_call(self, call_id: str) -> tuple[dict, dict | None] | None:
        """(call record, assistant config): the shape ``vapi_transport.transport_routes`` wants."""
        call = self.calls.get(call_id)
        return None if call is None else (call.record, call.assistant)


@dataclass
class SimState:
    credentials: SimCredentials = field(default_factory=SimCredentials)
    twilio: TwilioState = field(default_factory=TwilioState)
    vapi: VapiState = field(default_factory=VapiState)
    link: bool = True     # Vapi's number import checks and re-points numbers in ``twilio``
    # how long both REST simulators take to answer (latency.py): realistic unless asked otherwise;
    # read per request, so it can be swapped on running simulators
    latency: LatencyModel = field(default_factory=LatencyModel)

    def __post_init__(self) -> None:
        if self.vapi.webhook_secret is None:
            self.vapi.webhook_secret = self.credentials.vapi_webhook_secret

    def reset(self) -> None:
        """Forget every number, call, assistant and hook (running apps keep serving the same state)."""
        for table in (self.twilio.numbers, self.twilio.calls, self.twilio.offered, self.twilio.on_call_created,
                      self.twilio.applications, self.twilio.trunks,
                      self.vapi.assistants, self.vapi.phone_numbers, self.vapi.calls, self.vapi.on_call_created,
                      self.vapi.credentials):
            table.clear()
