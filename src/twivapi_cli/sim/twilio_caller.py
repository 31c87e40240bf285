"""The simulated caller: Twilio's side of one phone call, for real, over HTTP and WebSocket.

``SimulatedCaller.call(voice_url, ...)`` posts the signed voice webhook, obeys the TwiML it gets
(``Say``, ``Pause``, ``Connect/Stream``, ``Redirect``, ``Hangup``, ``Reject``), runs a Media Streams
client for ``<Connect><Stream>`` and posts signed status callbacks at the end.

The media client sends ``connected``, ``start``, 20 ms mu-law ``media`` frames (the caller's audio,
then silence, paced in real time or ``speed`` times faster), ``dtmf`` and ``stop``, and it plays
back what it receives like Twilio does: assistant audio is buffered and played at 1x, ``mark``s are
echoed when playback reaches them, ``clear`` empties the buffer and echoes pending marks at once.
What the caller heard, and when, is kept in the ``CallResult``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from .. import net, signing, twilio_media
from ..twilio_media import Clear, Connected, Dtmf, Mark, Media, Start, Stop
from .state import TERMINAL, CallUpdate, SimCall, TwilioState, now, rfc2822
from .twilio_dial import Dialer, DialLeg, Person

FRAME = 160            # 20 ms of mu-law
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME


def sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass
class CallResult:
    call_sid: str
    stream_sid: str | None = None
    status: str = "completed"
    said: list[str] = field(default_factory=list)
    twiml: list[str] = field(default_factory=list)
    heard: bytearray = field(default_factory=bytearray)       # assistant audio actually played
    received: bytearray = field(default_factory=bytearray)    # all assistant audio received
    timeline: list[tuple[float, str, Any]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    clear_positions: list[int] = field(default_factory=list)  # len(heard) at each clear
    marks_echoed: list[str] = field(default_factory=list)
    media_after_clear: int = 0
    webhook_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hung_up: bool = False     # the caller hung up (not the server closing the stream)
    started: float = field(default_factory=time.monotonic)
    dialed: list[DialLeg] = field(default_factory=list)     # <Dial> legs, in order
    dial_positions: list[int] = field(default_factory=list)  # len(heard) when each leg was answered
    rest_updates: list[CallUpdate] = field(default_factory=list)   # Calls/{Sid}.json updates obeyed
    # a REST update that ended the stream, for call() to obey next (redirect: its TwiML or URL)
    pending: CallUpdate | None = field(default=None, repr=False)
    updates: asyncio.Queue | None = field(default=None, repr=False)   # the SimCall's, while it is followed
    dialer: Dialer | None = field(default=None, repr=False)

    def note(self, kind: str, data: Any = None) -> None:
        self.timeline.append((round(time.monotonic() - self.started, 4), kind, data))

    def first(self, kind: str) -> float | None:
        return next((t for t, k, _ in self.timeline if k == kind), None)


@dataclass
class CallerPlan:
    """What the caller does on the media stream."""

    audio: bytes = b""                 # mu-law 8 kHz, sent from the start of the stream
    hangup_after_s: float | None = 4.0  # then `stop` and close; None: wait for the server to close
    dtmf: list[tuple[float, str]] = field(default_factory=list)   # (seconds, digit)
    speed: float = 1.0                  # >1 sends faster than real time
    # status callbacks with SequenceNumber, like an outbound REST call's StatusCallbackEvent:
    # "ringing"/"in-progress" go out when the call is answered, the final status at the end
    progress_events: tuple[str, ...] = ()
    drop_after_frames: int | None = None   # fault: the media socket dies after this many frames
    # X-Twilio-Signature on the stream's upgrade: whether Twilio sends one is disputed, so only when
    # asked (a bridge with TWIVAPI_MEDIA_SIGNATURE=required needs it); the TwiML's <Parameter>s,
    # the stream's token among them, go in the start message either way
    sign_upgrade: bool = False


def stream_url_refusal(url: str) -> str | None:
    """Why Twilio would not open this ``<Stream url>``, or None: it opens only wss:// (port 443); a
    ws:// URL is accepted here only to a loopback host (local work: the simulators, no TLS)."""
    try:
        parts = httpx.URL(url) if "://" in url else None
    except httpx.InvalidURL:
        parts = None
    if parts is None or parts.scheme not in ("ws", "wss"):
        return f"31922 stream URL {url!r} is not a wss:// URL"
    if parts.scheme == "ws" and not twilio_media.loopback(parts.host):
        return f"31922 stream URL {url} is ws://: Twilio opens media streams only to wss:// (port 443)"
    return None


# StatusCallbackEvent -> the CallStatus its callback carries (``completed`` is the final status)
PROGRESS_STATUS = {"initiated": "initiated", "ringing": "ringing", "answered": "in-progress"}


class CallbackCounter:
    """What every call-progress callback carries: its ``SequenceNumber`` (from 0, one counter per
    call), the moment (``Timestamp``, RFC 2822) and ``CallbackSource``."""

    def __init__(self) -> None:
        self.sequence = 0

    def params(self, params: dict) -> dict:
        stamped = {**params, "SequenceNumber": str(self.sequence), "CallbackSource": "call-progress-events",
                   "Timestamp": rfc2822(now())}
        self.sequence += 1
        return stamped


class Player:
    """Twilio's playback buffer for one stream: plays at 1x, echoes marks, obeys clear."""

    def __init__(self, result: CallResult, send: Callable[[twilio_media.Message], Awaitable[None]], stream_sid: str):
        self.result, self.send, self.stream_sid = result, send, stream_sid
        self.buffer: collections.deque[tuple[str, Any]] = collections.deque()
        self.wake = asyncio.Event()
        self.cleared_at: float | None = None

    def add_audio(self, payload: bytes) -> None:
        self.result.received += payload
        for i in range(0, len(payload), FRAME):
            self.buffer.append(("audio", payload[i:i + FRAME]))
        self.wake.set()

    def add_mark(self, name: str) -> None:
        self.buffer.append(("mark", name))
        self.wake.set()

    async def clear(self) -> None:
        marks = [item for kind, item in self.buffer if kind == "mark"]
        self.buffer.clear()
        for name in marks:
            await self.echo(name)

    async def echo(self, name: str) -> None:
        self.result.marks_echoed.append(name)
        await self.send(Mark(self.stream_sid, name))

    async def run(self) -> None:
        next_at = time.monotonic()
        while True:
            if not self.buffer:
                self.wake.clear()
                await self.wake.wait()
                next_at = max(next_at, time.monotonic())
                continue
            kind, item = self.buffer.popleft()
            if kind == "mark":
                await self.echo(item)
                continue
            self.result.heard += item
            next_at += len(item) / 8000
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class SimulatedCaller:
    def __init__(self, auth_token: str, account_sid: str = "AC" + "0" * 32, *,
                 http: httpx.AsyncClient | None = None, faults: Any = None, state: TwilioState | None = None,
                 person: Person | None = None):
        self.token, self.account_sid = auth_token, account_sid
        self.state, self.person = state, person   # <Dial>: the account's numbers and calls; who answers
        self.http = http or net.async_client(timeout=15.0)  # Twilio's 15 s cap
        self.faults = faults   # the Twilio simulator's Faults: webhook rules for status callbacks
        self._senders: dict[str, Callable] = {}

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- webhooks -------------------------------------------------------------------------------
    async def post(self, url: str, params: dict, result: CallResult | None = None) -> httpx.Response:
        url = url.split("#", 1)[0]  # connection-override fragments are not signed
        headers = {"X-Twilio-Signature": signing.twilio_signature(self.token, url, params),
                   "I-Twilio-Idempotency-Token": str(uuid.uuid4()), "User-Agent": "TwilioProxy/1.1",
                   "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8", "X-Home-Region": "us1"}
        started = time.monotonic()
        response = await net.post_idempotent(self.http, url, data=params, headers=headers)  # same token: a retry
        if result is not None:
            result.webhook_ms.append(round((time.monotonic() - started) * 1000, 2))
        return response

    async def post_status(self, url: str, params: dict, result: CallResult) -> None:
        """A status callback, through the simulator's webhook faults: a duplicate is a retry (same
        idempotency token), a reorder holds one back until the next, delay and drop do what they say."""
        url = url.split("#", 1)[0]
        deliveries = [params]
        if self.faults is not None:
            path = httpx.URL(url).path
            sender = self._senders.setdefault(f"{result.call_sid}:{path}", self.faults.webhook_sender(path))
            deliveries = await sender(params)
        tokens: dict[int, str] = {}
        for delivery in deliveries:
            token = tokens.setdefault(id(delivery), str(uuid.uuid4()))
            headers = {"X-Twilio-Signature": signing.twilio_signature(self.token, url, delivery),
                       "I-Twilio-Idempotency-Token": token, "User-Agent": "TwilioProxy/1.1",
                       "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
            response = await net.post_idempotent(self.http, url, data=delivery, headers=headers)
            result.note("status-callback", {"status": delivery.get("CallStatus"),
                                            "sequence": delivery.get("SequenceNumber"), "http": response.status_code})

    def voice_params(self, call_sid: str, from_: str, to: str, status: str = "ringing") -> dict:
        return {"AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "CallSid": call_sid,
                "CallStatus": status, "Called": to, "Caller": from_, "Direction": "inbound", "From": from_,
                "To": to, "CallToken": "", "FromCountry": "US", "ToCountry": "US"}

    # --- one call -------------------------------------------------------------------------------
    async def call(self, voice_url: str | None, *, from_: str = "+15551230001", to: str = "+15551230002",
                   plan: CallerPlan | None = None, status_callback: str | None = None,
                   call_sid: str | None = None, status_callback_events: Sequence[str] | None = None,
                   sim_call: SimCall | None = None, result: CallResult | None = None) -> CallResult:
        """One call to ``voice_url``. Status callbacks go to ``status_callback`` as Twilio sends them
        (``SequenceNumber`` from 0, ``Timestamp``, ``CallbackSource``; ``CallDuration`` and
        ``Duration`` on the final one), for the ``status_callback_events`` asked (Twilio's
        ``StatusCallbackEvent`` names; default ``completed`` only, all a number's status callback
        gets), plus the plan's ``progress_events``. ``sim_call``: the Twilio simulator's record of
        this call, followed as Twilio follows its REST updates (``Calls/{Sid}.json``): a ``Twiml`` or
        ``Url`` redirect ends the media stream (``stop``, then the socket closed; the ``<Connect
        action>`` is not requested) and the new TwiML runs; ``Status=completed`` hangs up. Pass a
        ``result`` to watch the call while it runs."""
        plan = plan or CallerPlan()
        result = result or CallResult(call_sid or (sim_call.sid if sim_call else sid("CA")))
        params = self.voice_params(result.call_sid, from_, to)
        if sim_call is not None:
            result.updates = sim_call.subscribe()
        result.dialer = Dialer(params, result.heard.extend, lambda url, p: self.post_status(url, p, result),
                               state=self.state, person=self.person)
        events = list(status_callback_events or ["completed"])
        progress = [PROGRESS_STATUS[e] for e in events if e in PROGRESS_STATUS]
        progress += [status for status in plan.progress_events if status not in progress]
        callbacks = CallbackCounter()
        answered_at = result.started
        url: str | None = voice_url
        twiml: str | None = None   # a REST update's TwiML, run without fetching anything
        first = True
        while url or twiml:
            if twiml is None:
                assert url is not None
                response = await self.post(url, {**params, **result.dialer.action_params}, result)
                result.dialer.action_params = {}
                result.note("webhook", {"url": url, "status": response.status_code})
                if response.status_code != 200:
                    result.errors.append(f"{url} answered {response.status_code}")
                    result.status = "failed"
                    break
                twiml = response.text
            if first:
                answered_at = time.monotonic()
                if sim_call is not None:
                    sim_call.set_status("in-progress")
                for status in progress:
                    if status_callback:
                        await self.post_status(status_callback, callbacks.params({**params, "CallStatus": status}),
                                               result)
            first = False
            url, twiml = await self.obey(twiml, result, plan), None
            update, result.pending = result.pending, None
            if update is not None:   # the server changed the call over REST while it streamed
                if update.kind == "status":
                    result.status = "completed"
                    break
                url, twiml = (None, update.twiml) if update.twiml else (update.url, None)
                params = {**params, "CallStatus": "in-progress"}
                continue
            if result.hung_up:   # the <Connect action> is still requested, with the final status; its answer is moot
                if url:
                    final_action = await self.post(url, {**params, "CallStatus": result.status}, result)
                    result.note("webhook", {"url": url, "status": final_action.status_code, "after": "hang-up"})
                break
            params = {**params, "CallStatus": "in-progress"}
        if status_callback and ("completed" in events or plan.progress_events):
            seconds = int(time.monotonic() - answered_at) if not first else 0
            final = {**params, "CallStatus": result.status, "CallDuration": str(seconds),
                     "Duration": str(math.ceil(seconds / 60))}   # Duration: billed minutes
            await self.post_status(status_callback, callbacks.params(final), result)
        if sim_call is not None and sim_call.status not in TERMINAL:
            sim_call.set_status(result.status)
        result.note("ended", result.status)
        return result

    async def obey(self, twiml: str, result: CallResult, plan: CallerPlan) -> str | None:
        """Run one TwiML document; returns the next URL to fetch, if any."""
        result.twiml.append(twiml)
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError:
            result.errors.append("12100 document parse failure")
            result.status = "failed"
            return None
        if root.tag != "Response":
            result.errors.append("12100 no <Response> root")
            result.status = "failed"
            return None
        for verb in root:
            if verb.tag == "Say":
                result.said.append(verb.text or "")
                result.note("say", verb.text)
            elif verb.tag == "Pause":
                await asyncio.sleep(int(verb.get("length", "1")) / plan.speed)
            elif verb.tag in ("Hangup", "Reject"):
                result.status = "busy" if verb.get("reason") == "busy" else "completed"
                return None
            elif verb.tag == "Redirect":
                return (verb.text or "").strip()
            elif verb.tag == "Connect":
                stream = verb.find("Stream")
                if stream is not None:
                    custom = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
                    await self.stream(stream.get("url", ""), custom, result, plan)
                if result.pending is not None:   # redirected or hung up over REST: no <Connect action>
                    return None
                action = verb.get("action")
                if action:
                    return action
            elif verb.tag == "Dial":
                action = await self.dial(verb, result)
                if action:
                    return action
            else:
                result.errors.append(f"12200 unsupported verb <{verb.tag}>")
        return None

    async def dial(self, verb: ET.Element, result: CallResult) -> str | None:
        """``<Dial>``: a leg to the simulated person (``twilio_dial``); its ``action`` URL, if any."""
        dialer = result.dialer or Dialer({"CallSid": result.call_sid}, result.heard.extend,
                                         lambda url, p: self.post_status(url, p, result), state=self.state)
        result.dial_positions.append(len(result.heard))
        result.note("dial", verb.findtext("Number") or verb.findtext("Sip") or verb.text)
        leg, action_params = await dialer.dial(verb)
        result.dialed.append(leg)
        if leg.error:
            result.errors.append(leg.error)
        result.note("dial-ended", leg.status)
        action = verb.get("action")
        if action:
            dialer.action_params = action_params
        return action

    # --- Media Streams ----------------------------------------------------------------------------
    async def stream(self, url: str, custom: dict, result: CallResult, plan: CallerPlan) -> None:
        refused = stream_url_refusal(url)
        if refused:   # as Twilio: it never opens such a socket
            result.errors.append(refused)
            result.note("stream-refused", refused)
            return
        result.stream_sid = stream_sid = sid("MZ")
        headers = {"X-Twilio-Signature": signing.twilio_signature(self.token, url, {})} if plan.sign_upgrade else {}
        try:
            ws = await websockets.connect(url, additional_headers=headers, max_size=2**20, compression=None)
        except (OSError, websockets.WebSocketException) as exc:
            result.errors.append(f"stream connect failed: {exc}")
            result.note("stream-refused", str(exc))
            return
        sequence = 0

        async def send(message: twilio_media.Message | dict) -> None:
            """Numbered like Twilio's (every message but ``connected``, from 1 at ``start``); a message
            given as its JSON dict (by a subclass's _speak) is read first."""
            nonlocal sequence
            if isinstance(message, dict):
                message = twilio_media.from_wire(message, max_payload=None)
            if not isinstance(message, Connected):
                sequence += 1
                message = twilio_media.numbered(message, sequence)
            try:
                await ws.send(twilio_media.serialize(message))
            except websockets.ConnectionClosed:
                pass

        player = Player(result, send, stream_sid)
        await send(Connected())
        await send(Start(stream_sid, result.call_sid, self.account_sid, ("inbound",), custom))
        result.note("stream-start", stream_sid)
        tasks = [asyncio.create_task(player.run()),
                 asyncio.create_task(self._speak(send, stream_sid, plan, result, ws))]
        if result.updates is not None:
            tasks.append(asyncio.create_task(self._follow(result, send, stream_sid, ws)))
        try:
            async for raw in ws:
                await self._on_server_message(raw, player, result)
        except websockets.ConnectionClosed:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ws.close()
        result.note("stream-closed")

    async def _follow(self, result: CallResult, send, stream_sid: str, ws) -> None:
        """A REST update of the call while it streams: Twilio ends the stream (``stop``, the socket
        closed) and goes where the update says (``call`` obeys ``result.pending``)."""
        assert result.updates is not None
        update = await result.updates.get()
        result.rest_updates.append(update)
        result.pending = update
        result.note("rest-update", update.kind)
        await send(Stop(stream_sid, call_sid=result.call_sid, account_sid=self.account_sid))
        await ws.close()

    async def _on_server_message(self, raw: Any, player: Player, result: CallResult) -> None:
        try:
            message = twilio_media.parse(raw, max_payload=None)   # Twilio takes any size from a server
        except twilio_media.BadMessage as exc:
            result.errors.append(f"server sent a bad message: {exc.reason}")
            return
        if isinstance(message, Media):
            payload = message.payload
            if result.clears and player.cleared_at is not None:
                result.media_after_clear += 1
            player.add_audio(payload)
            if len(result.received) == len(payload):
                result.note("first-audio")
        elif isinstance(message, Mark):
            player.add_mark(message.name)
        elif isinstance(message, Clear):
            result.clears.append(time.monotonic())
            result.clear_positions.append(len(result.heard))
            player.cleared_at = time.monotonic()
            result.note("clear")
            await player.clear()
        else:
            result.errors.append(f"unknown event from server: {message.event}")

    async def _speak(self, send, stream_sid: str, plan: CallerPlan, result: CallResult, ws) -> None:
        started = time.monotonic()
        audio = plan.audio
        dtmf = sorted(plan.dtmf)
        chunk = 0
        end_at = plan.hangup_after_s
        while end_at is None or chunk * FRAME_S < end_at:
            offset = chunk * FRAME
            frame = audio[offset:offset + FRAME] if offset < len(audio) else SILENCE
            frame = frame.ljust(FRAME, b"\xff")
            chunk += 1
            if plan.drop_after_frames is not None and chunk > plan.drop_after_frames:
                result.note("socket-dropped")
                ws.transport.abort()  # no close frame: the connection just dies
                return
            # timestamp: ms from the stream's start to this frame's audio (the first one: 0)
            await send(Media(stream_sid, frame, track="inbound", chunk=chunk, timestamp=(chunk - 1) * 20))
            while dtmf and dtmf[0][0] <= chunk * FRAME_S:
                await send(Dtmf(stream_sid, dtmf.pop(0)[1], track="inbound_track"))
            target = started + chunk * FRAME_S / plan.speed
            await asyncio.sleep(max(0.0, target - time.monotonic()))
        result.note("caller-hangup")
        result.hung_up = True
        await send(Stop(stream_sid, call_sid=result.call_sid, account_sid=self.account_sid))
