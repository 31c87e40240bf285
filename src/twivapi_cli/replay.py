"""Running fixtures against a server: signed webhooks, Vapi messages and a Media Streams client,
timed, with expectations checked. A library: results are data; the CLI renders them.

Signing follows Twilio exactly, for the URL the *target* validates against (``public_url``, the
target itself by default): form bodies signed over URL + sorted params, JSON bodies through
``bodySHA256``, every request with a fresh ``I-Twilio-Idempotency-Token`` unless a step reuses one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from . import audio, net, signing, twilio_media
from .errors import FixtureError, TargetUnreachable
from .fixtures import TWILIO_WEBHOOKS, Fixture, Step, explain_requirements, render, simulator_script
from .sim.twilio_caller import FRAME, Player

QUIET_S = 0.6   # no audio for this long, every mark echoed: the assistant is done speaking


@dataclass
class Credentials:
    twilio_auth_token: str | None
    vapi_secret: str | None
    account_sid: str = "AC" + "0" * 32


@dataclass
class StepResult:
    index: int
    label: str
    ok: bool
    ms: float
    problems: list[str] = field(default_factory=list)
    status: int | None = None


@dataclass
class FixtureResult:
    fixture: str
    path: str
    steps: list[StepResult]
    seconds: float
    run: int = 0

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)


# Our route names -> the paths our bridge serves. `replay --route NAME=PATH` (or a profile's
# [replay.routes]) maps them to another server's paths; a step with an explicit `path` keeps it.
ROUTES: dict[str, str] = {**{f"twilio.{kind}": path for kind, path in TWILIO_WEBHOOKS.items()},
                          "vapi": "/vapi/webhook", "media": "/twilio/media"}


def route_name(step: Step) -> str:
    """The route a step uses: ``twilio.<webhook>``, ``vapi`` or ``media``."""
    return f"twilio.{step.twilio}" if step.twilio else "vapi" if step.vapi is not None else "media"


def label(step: Step) -> str:
    if step.name:
        return step.name
    if step.twilio:
        return f"twilio {step.twilio}" + (f" {step.params.get('CallStatus')}" if step.params.get("CallStatus") else "")
    if step.vapi is not None:
        return f"vapi {step.vapi.get('type')}"
    return f"media {step.media}"


def _path_get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return _MISSING
    return data


_MISSING = object()


def _compare(what: str, got: Any, wanted: Any) -> list[str]:
    """One expectation: ``True`` = present, ``False`` = absent, anything else = equal to it."""
    if wanted is False:
        return [] if got is _MISSING else [f"{what}: present, expected absent"]
    if got is _MISSING:
        return [f"{what}: missing"]
    return [] if wanted is True or got == wanted else [f"{what}: {got!r}, expected {wanted!r}"]


def _twiml_get(root: ET.Element, xpath: str) -> Any:
    path, _, attribute = xpath.partition("/@")
    if xpath.startswith("@"):
        path, attribute = "", xpath[1:]
    node = root.find(path) if path else root
    if node is None:
        return _MISSING
    return node.get(attribute, _MISSING) if attribute else (node.text or "")


class MediaSession:
    """One Media Streams socket, played like Twilio: marks echoed when played, clear obeyed."""

    def __init__(self, ws, stream_sid: str, call_sid: str, account_sid: str):
        from .sim.twilio_caller import CallResult
        self.ws, self.stream_sid, self.call_sid, self.account_sid = ws, stream_sid, call_sid, account_sid
        self.result = CallResult(call_sid, stream_sid)
        self.media_times: list[float] = []
        self.marks_sent: list[str] = []
        self.sequence = 0
        self.chunk = 0
        self.started = time.monotonic()
        self.closed = asyncio.Event()
        self.background: asyncio.Task | None = None   # a media audio step's stream that goes on meanwhile
        self.player = Player(self.result, self.send, stream_sid)
        self.tasks = [asyncio.create_task(self.player.run()), asyncio.create_task(self.receive())]

    async def send(self, message: twilio_media.Message) -> None:
        """Numbered as Twilio numbers them: every message but ``connected``, from 1 at ``start``."""
        if isinstance(message, twilio_media.Start):
            self.started = time.monotonic()   # media timestamps count from here
        if not isinstance(message, twilio_media.Connected):
            self.sequence += 1
            message = twilio_media.numbered(message, self.sequence)
        try:
            await self.ws.send(twilio_media.serialize(message))
        except websockets.ConnectionClosed:
            self.closed.set()

    async def receive(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    message = twilio_media.parse(raw, max_payload=None)   # Twilio takes any size
                except twilio_media.BadMessage:
                    continue
                if isinstance(message, twilio_media.Media):
                    self.media_times.append(time.monotonic())
                    self.player.add_audio(message.payload)
                elif isinstance(message, twilio_media.Mark):
                    self.marks_sent.append(message.name)
                    self.player.add_mark(message.name)
                elif isinstance(message, twilio_media.Clear):
                    self.result.clears.append(time.monotonic())
                    await self.player.clear()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def stream(self, pcm_or_ulaw: bytes, seconds_per_frame: float = 0.02) -> None:
        start = time.monotonic()
        for i in range(0, len(pcm_or_ulaw), FRAME):
            self.chunk += 1
            frame = pcm_or_ulaw[i:i + FRAME].ljust(FRAME, b"\xff")
            # timestamp: ms since the stream started, as Twilio's (it streams through a step's pauses too)
            timestamp = round((time.monotonic() - self.started) * 1000)
            await self.send(twilio_media.Media(self.stream_sid, frame, track="inbound", chunk=self.chunk,
                                               timestamp=timestamp))
            await asyncio.sleep(max(0.0, start + (i // FRAME + 1) * seconds_per_frame - time.monotonic()))

    async def close(self) -> None:
        for task in self.tasks + ([self.background] if self.background else []):
            task.cancel()
        await self.ws.close()


class Runner:
    def __init__(self, target: str, creds: Credentials, *, public_url: str | None = None,
                 overrides: dict[str, str] | None = None, client: httpx.AsyncClient | None = None,
                 base_dir: Path | None = None, routes: Mapping[str, str] | None = None,
                 on_call: Callable[[dict[str, str]], None] | None = None):
        self.target = target.rstrip("/")
        self.on_call = on_call   # told each run's variables (its CallSid) before its first step
        # Route name -> the target's path for it (only what was mapped). None: no mapping in use
        # (--in-process: our own bridge), so a 404 gets no "map it with --route" hint.
        self.routes = dict(routes) if routes is not None else None
        self.public = (public_url or target).rstrip("/")
        self.creds = creds
        self.overrides = overrides or {}
        self.client = client or net.async_client(timeout=20.0, limits=httpx.Limits(max_connections=200,
                                                                                    max_keepalive_connections=200))
        self.base_dir = base_dir or Path(".")
        import os
        self.env_vars = {f"env.{k}": v for k, v in os.environ.items() if k.startswith(("TWIVAPI_", "REPLAY_"))}
        self._templated: dict[int, bool] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def variables(self, fixture: Fixture) -> dict[str, str]:
        call_sid = "CA" + uuid.uuid4().hex
        variables = {"call_sid": call_sid, "call.sid": call_sid, "target": self.target, "public_url": self.public,
                     "account_sid": self.creds.account_sid, "call.from": "+15551230001", "call.to": "+15551230002",
                     "vapi_call_id": str(uuid.uuid4()), "run_id": uuid.uuid4().hex[:8]}
        variables.update(self.env_vars)
        variables.update(fixture.vars)
        variables.update(self.overrides)
        return variables

    async def run(self, fixture: Fixture, path: str = "", run: int = 0) -> FixtureResult:
        variables = self.variables(fixture)
        if self.on_call is not None:
            self.on_call(variables)
        media: MediaSession | None = None
        results: list[StepResult] = []
        started = previous_end = time.monotonic()
        try:
            for index, step in enumerate(fixture.steps):
                wait_until = (started + step.at_ms / 1000 if step.at_ms is not None else
                              previous_end + (step.after_ms or 0) / 1000)
                await asyncio.sleep(max(0.0, wait_until - time.monotonic()))
                for _ in range(step.repeat):
                    result, media = await self.step(index, step, variables, media, path)
                    if not result.ok and step.kind == "media":
                        result.problems = explain_requirements(fixture, step, media, result.problems)
                    results.append(result)
                previous_end = time.monotonic()
        finally:
            if media is not None:
                await media.close()
        return FixtureResult(fixture.name, path, results, time.monotonic() - started, run)

    async def step(self, index: int, step: Step, variables: dict, media: MediaSession | None, path: str):
        if self._templated.setdefault(id(step), "{{" in step.model_dump_json(by_alias=True)):
            try:
                rendered = Step.model_validate(render(step.model_dump(exclude_unset=True, by_alias=True), variables))
            except KeyError as exc:
                raise FixtureError(path, f"unknown variable {{{{{exc.args[0]}}}}}", step=index) from None
        else:
            rendered = step   # nothing to substitute: skip re-validating it on every run
        started = time.monotonic()
        if rendered.kind == "media":
            media, problems = await self.media_step(rendered, variables, media)
            return StepResult(index, label(step), not problems, _ms(started), problems), media
        response = await (self.twilio_step(rendered, variables) if rendered.kind == "twilio"
                          else self.vapi_step(rendered, variables))
        elapsed = _ms(started)
        problems = self.check_http(rendered, response, elapsed)
        if problems and response.status_code == 404 and self.unmapped(rendered):
            route = route_name(rendered)
            problems.append(f"the target has no route for {route}: map it with --route {route}=PATH")
        self.capture(rendered, response, variables)
        if rendered.twilio == "voice":
            remember_stream_parameters(response, variables)
        return StepResult(index, label(step), not problems, elapsed, problems, response.status_code), media

    # --- routes ---------------------------------------------------------------------------------
    def path_for(self, step: Step) -> str:
        """The path a step posts to: its own ``path``, else the mapped route, else our default."""
        if step.path:
            return step.path
        route = route_name(step)
        return (self.routes or {}).get(route) or ROUTES[route]

    def unmapped(self, step: Step) -> bool:
        """The step went to our default path because nothing mapped its route (a 404 then means the
        target serves it elsewhere)."""
        return self.routes is not None and not step.path and route_name(step) not in self.routes

    # --- HTTP steps -----------------------------------------------------------------------------
    def twilio_params(self, step: Step, variables: dict) -> dict:
        defaults = {"AccountSid": self.creds.account_sid, "ApiVersion": "2010-04-01", "CallSid": variables["call_sid"],
                    "From": variables["call.from"], "To": variables["call.to"], "Caller": variables["call.from"],
                    "Called": variables["call.to"], "Direction": "inbound", "CallToken": "",
                    "CallStatus": "ringing" if step.twilio == "voice" else "completed"}
        if step.twilio == "stream-status":
            defaults.update(StreamSid=variables.get("stream_sid", "MZ" + uuid.uuid4().hex),
                            StreamEvent="stream-started", Timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return {**defaults, **step.params}

    async def twilio_step(self, step: Step, variables: dict) -> httpx.Response:
        assert step.twilio is not None   # a Twilio step (the fixture model guarantees it)
        path = self.path_for(step)
        params = self.twilio_params(step, variables)
        token = self.creds.twilio_auth_token
        if token is None and step.signature != "none":
            raise FixtureError("", "a signed Twilio step needs TWILIO_AUTH_TOKEN (or --twilio-token)")
        sign_token = (token or "") + "x" if step.signature == "wrong-token" else (token or "")
        sign_base = "https://wrong.example.invalid" if step.signature == "wrong-url" else self.public
        headers = {"I-Twilio-Idempotency-Token": step.idempotency_token or str(uuid.uuid4()),
                   "User-Agent": "TwilioProxy/1.1", **step.headers}
        if step.json_body:
            body = json.dumps(params, separators=(",", ":")).encode()
            signed_url, signature = signing.sign_twilio_json(sign_token, sign_base + path, body)
            url = self.target + signed_url[len(sign_base):]
            headers["Content-Type"] = "application/json"
            if step.signature != "none":
                headers["X-Twilio-Signature"] = signature
            return await self._post(url, content=body, headers=headers)
        headers["Content-Type"] = "application/x-www-form-urlencoded; charset=UTF-8"
        if step.signature != "none":
            headers["X-Twilio-Signature"] = signing.twilio_signature(sign_token, sign_base + path, params)
        return await self._post(self.target + path, data=params, headers=headers)

    async def vapi_step(self, step: Step, variables: dict) -> httpx.Response:
        message = dict(step.vapi or {})
        message.setdefault("timestamp", int(time.time() * 1000))
        message.setdefault("call", {"id": variables["vapi_call_id"], "phoneCallProviderId": variables["call_sid"]})
        body = json.dumps({"message": message}).encode()
        headers = {"Content-Type": "application/json", **step.headers}
        if step.auth != "none":
            if self.creds.vapi_secret is None:
                raise FixtureError("", "a signed Vapi step needs VAPI_WEBHOOK_SECRET (or --vapi-secret)")
            secret = self.creds.vapi_secret + ("x" if step.auth == "wrong" else "")
            headers.update(signing.sign_vapi(secret, body, "secret" if step.auth == "wrong" else step.auth))
        return await self._post(self.target + self.path_for(step), content=body, headers=headers)

    async def _post(self, url: str, **kwargs) -> httpx.Response:
        try:
            return await self.client.post(url, **kwargs)
        except httpx.TransportError as exc:
            raise TargetUnreachable(f"{url} could not be reached ({type(exc).__name__})",
                                    hint="is the server running? check --target") from None

    def check_http(self, step: Step, response: httpx.Response, elapsed: float) -> list[str]:
        expect, problems = step.expect, []
        if expect.status is not None:
            wanted = expect.status if isinstance(expect.status, list) else [expect.status]
            if response.status_code not in wanted:
                problems.append(f"status {response.status_code}, expected {' or '.join(map(str, wanted))}")
        if expect.content_type and not response.headers.get("content-type", "").startswith(expect.content_type):
            problems.append(f"content type {response.headers.get('content-type')!r}, expected {expect.content_type}")
        if expect.max_ms is not None and elapsed > expect.max_ms:
            problems.append(f"took {elapsed:.1f} ms, budget {expect.max_ms:g} ms")
        if expect.twiml:
            problems += self.check_twiml(response.text, expect.twiml)
        if expect.json_paths:
            try:
                data = response.json()
            except ValueError:
                return problems + ["reply is not JSON"]
            for dotted, wanted in expect.json_paths.items():
                problems += _compare(f"JSON {dotted}", _path_get(data, dotted), wanted)
        return problems

    @staticmethod
    def check_twiml(text: str, checks: dict) -> list[str]:
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return ["reply is not TwiML (XML parse error)"]
        problems = []
        for xpath, wanted in checks.items():
            problems += _compare(f"TwiML {xpath}", _twiml_get(root, xpath), wanted)
        return problems

    @staticmethod
    def capture(step: Step, response: httpx.Response, variables: dict) -> None:
        for name, source in step.capture.items():
            kind, _, where = source.partition(":")
            value: Any = _MISSING
            if kind == "twiml":
                try:
                    value = _twiml_get(ET.fromstring(response.text), where)
                except ET.ParseError:
                    pass
            elif kind == "json":
                try:
                    value = _path_get(response.json(), where)
                except ValueError:
                    pass
            elif kind == "header":
                value = response.headers.get(where, _MISSING)
            elif kind == "status":
                value = response.status_code
            if value is not _MISSING:
                variables[name] = str(value)

    # --- media steps ----------------------------------------------------------------------------
    async def media_step(self, step: Step, variables: dict, media: MediaSession | None):
        if step.media == "open":
            url = step.url or variables.get("stream_url")
            if not url and self.routes and "media" in self.routes:
                url = twilio_media.ws_url(self.public) + self.routes["media"]   # built from the mapped route
            if not url:
                return media, ["no stream URL: capture one from the voice TwiML or give url"
                               + (", or map --route media=PATH" if self.routes is not None else "")]
            public_ws = twilio_media.ws_url(self.public)
            if url.startswith(public_ws):   # the public stream URL, reached through the target
                sign_url, url = url, twilio_media.ws_url(self.target) + url[len(public_ws):]
            else:
                sign_url = url
            token = (self.creds.twilio_auth_token or "") + ("x" if step.signature == "wrong-token" else "")
            if step.signature == "wrong-url":
                sign_url = "wss://wrong.example.invalid" + httpx.URL(sign_url).raw_path.decode()
            headers = {} if step.signature == "none" else {
                "X-Twilio-Signature": signing.twilio_signature(token, sign_url, {})}
            try:
                ws = await websockets.connect(url, additional_headers=headers, compression=None, max_size=2**20)
            except (OSError, websockets.WebSocketException) as exc:
                return media, [f"media socket refused: {exc}"]
            stream_sid = "MZ" + uuid.uuid4().hex
            variables["stream_sid"] = stream_sid
            media = MediaSession(ws, stream_sid, variables["call_sid"], self.creds.account_sid)
            await media.send(twilio_media.Connected())
            # the TwiML's <Parameter>s, as Twilio sends them (the stream's token among them)
            parameters = json.loads(variables.get(STREAM_PARAMETERS) or "null") or {"callSid": variables["call_sid"]}
            await media.send(twilio_media.Start(stream_sid, variables["call_sid"], self.creds.account_sid, ("inbound",),
                                                parameters))
            return media, self.check_media(step, media, time.monotonic())
        if media is None:
            return media, ["no media socket: add a media open step first"]
        started = time.monotonic()
        if step.media == "audio" and step.background:
            if media.background is not None:
                await media.background   # one stream of the caller's audio at a time
            media.background = asyncio.create_task(media.stream(self.audio_for(step)))
        elif step.media == "audio":
            await media.stream(self.audio_for(step))
        elif step.media == "wait":
            await asyncio.sleep(step.ms / 1000)
            settle_until = time.monotonic() + step.settle_ms / 1000
            while self.still_expected(step, media) and time.monotonic() < settle_until:
                await asyncio.sleep(0.05)
        elif step.media == "dtmf":
            await media.send(twilio_media.Dtmf(media.stream_sid, step.digit or "", track="inbound_track"))
        elif step.media == "mark":
            await media.send(twilio_media.Mark(media.stream_sid, step.mark or "m"))
        elif step.media == "stop":
            if media.background is not None:
                await media.background   # the recorded audio first, all of it
            await media.send(twilio_media.Stop(media.stream_sid, call_sid=media.call_sid,
                                               account_sid=self.creds.account_sid))
            try:
                await asyncio.wait_for(media.closed.wait(), 2.0)
            except TimeoutError:
                pass
        return media, self.check_media(step, media, started)

    def audio_for(self, step: Step) -> bytes:
        if step.file:
            path = self.base_dir / step.file if (self.base_dir / step.file).is_file() else Path(step.file)
            pcm, rate = audio.read_wav(str(path))
            if rate != 8000:
                raise FixtureError(str(path), "audio files must be 8 kHz mono")
            return audio.pcm16_to_ulaw(pcm)
        if step.tone_hz:
            return audio.pcm16_to_ulaw(audio.tone(step.tone_hz, step.ms, 8000, step.amplitude))
        return audio.silence_mulaw(step.ms)

    @staticmethod
    def still_expected(step: Step, media: MediaSession) -> bool:
        """Something the step expects to happen has not happened yet (audio, marks, a close)."""
        expect = step.expect.media
        if expect is None:
            return False
        pending_marks = [m for m in media.marks_sent if m not in media.result.marks_echoed]
        if media.media_times and not pending_marks and time.monotonic() - media.media_times[-1] > QUIET_S:
            return False   # the assistant has stopped speaking and all it said was played: waiting won't help
        return bool((expect.min_audio_ms is not None and len(media.result.heard) / 8 < expect.min_audio_ms)
                    or (expect.marks_echoed and (not media.marks_sent or any(
                        m not in media.result.marks_echoed for m in media.marks_sent)))
                    or (expect.closed and not media.closed.is_set()))

    @staticmethod
    def check_media(step: Step, media: MediaSession, started: float) -> list[str]:
        expect = step.expect.media
        if expect is None:
            return []
        problems = []
        clears = [t for t in media.result.clears if t >= started]
        if expect.clear_within_ms is not None:
            if not clears:
                problems.append(f"no clear within {expect.clear_within_ms:g} ms")
            elif (clears[0] - started) * 1000 > expect.clear_within_ms:
                problems.append(f"clear after {(clears[0] - started) * 1000:.0f} ms, "
                                f"expected within {expect.clear_within_ms:g} ms")
        if expect.no_clear and clears:
            problems.append(f"{len(clears)} clear(s), expected none")
        if expect.quiet_after_clear_ms is not None:
            for clear in media.result.clears:
                stale = [t for t in media.media_times if clear < t <= clear + expect.quiet_after_clear_ms / 1000]
                if stale:
                    problems.append(f"{len(stale)} media frame(s) within {expect.quiet_after_clear_ms:g} ms "
                                    f"after a clear (stale audio)")
        if expect.min_audio_ms is not None and len(media.result.heard) / 8 < expect.min_audio_ms:
            problems.append(f"heard {len(media.result.heard) / 8:.0f} ms of audio, expected at least "
                            f"{expect.min_audio_ms:g} ms")
        if expect.marks_echoed:
            missing = [m for m in media.marks_sent if m not in media.result.marks_echoed]
            if not media.marks_sent:
                problems.append("the server sent no marks")
            elif missing:
                problems.append(f"{len(missing)} mark(s) not played yet")
        if expect.closed and not media.closed.is_set():
            problems.append("the server did not close the socket")
        return problems


STREAM_PARAMETERS = "stream.parameters"   # the variable holding the last voice TwiML's <Stream> <Parameter>s


def remember_stream_parameters(response: httpx.Response, variables: dict) -> None:
    """After a voice webhook: the ``<Parameter>`` elements of the ``<Connect><Stream>`` it answered (as
    JSON), which a later ``media open`` sends in its ``start`` message (``Start.custom_parameters``), as Twilio does."""
    try:
        root = ET.fromstring(response.text)
    except ET.ParseError:
        return
    stream = root.find("Connect/Stream")
    if stream is not None:
        variables[STREAM_PARAMETERS] = json.dumps({p.get("name", ""): p.get("value", "")
                                                   for p in stream.findall("Parameter")})


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


def percentiles(results: list[FixtureResult]) -> list[dict]:
    """p50/p95/p99 per step across runs (for --repeat / --concurrency)."""
    by_step: dict[tuple[int, str], list[float]] = {}
    for result in results:
        for step in result.steps:
            by_step.setdefault((step.index, step.label), []).append(step.ms)
    rows = []
    for (index, name), values in sorted(by_step.items()):
        values.sort()
        rows.append({"step": index, "label": name, "n": len(values), "p50": _quantile(values, 0.5),
                     "p95": _quantile(values, 0.95), "p99": _quantile(values, 0.99)})
    return rows


TRANSFER_DESTINATIONS = (("default", "+14155550199"),)   # what an in-process bridge answers transfer requests with


class InProcess:
    """--in-process: the simulators, and per fixture a bridge in the fixture's mode with an assistant
    that behaves as the fixture asks; the simulated assistant plays Vapi's side of media steps."""

    def __init__(self) -> None:
        from .sim.server import start_sims
        from .sim.state import SimState
        self.state = SimState()
        self.sims = start_sims(self.state)
        self.creds = Credentials(self.state.credentials.auth_token, self.state.vapi.webhook_secret,
                                 self.state.credentials.account_sid)
        self._number_id: str | None = None

    def close(self) -> None:
        self.sims.stop()

    def _vapi(self, method: str, path: str, body: dict) -> dict:
        response = httpx.request(method, self.sims.vapi_url + path, json=body,
                                 headers={"Authorization": f"Bearer {self.state.credentials.vapi_api_key}"})
        response.raise_for_status()
        return response.json()

    def _phone_number_id(self) -> str:
        if self._number_id is None:
            client = self.sims.twilio_client()
            offered = client.available_phone_numbers("US").local.list(area_code=415, limit=1)
            number = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number)
            self._number_id = self._vapi("POST", "/phone-number", {
                "provider": "twilio", "number": number.phone_number, "smsEnabled": False,
                "twilioAccountSid": self.state.credentials.account_sid,
                "twilioAuthToken": self.state.credentials.auth_token})["id"]
        return self._number_id

    def register_call(self, variables: dict[str, str]) -> None:
        """A run's call exists in the Twilio simulator, as a live call does in Twilio, so the bridge's
        call control (Calls update: a transfer's <Dial>, a hang-up) finds it. Nobody follows its
        updates: the replay's socket plays the media stream, and the bridge closes it."""
        from .sim.state import SimCall
        self.state.twilio.add_call(SimCall(
            sid=variables["call_sid"], account_sid=self.state.credentials.account_sid, to=variables["call.to"],
            from_=variables["call.from"], direction="inbound", status="in-progress"))

    def bridge(self, fixture: Fixture):
        """A started bridge for this fixture: (RunningServer, its URL)."""
        from .bridge.app import create_app
        from .bridge.server import bind, start_in_thread
        from .cluster.local import LocalCluster
        from .config import Secret, Settings
        from .models import Mode
        from .store.memory import MemoryStore
        from .vapi_api import VapiClient

        sock = bind()
        public = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assistant = self._vapi("POST", "/assistant", {
            "name": f"replay-{fixture.name}"[:40], "server": {"url": public + "/vapi/webhook",   # signed as a provisioned assistant's is
                                                          "headers": {"X-Vapi-Secret": self.state.vapi.webhook_secret or ""}},
            "model": {"provider": "openai", "model": "gpt-4o", "tools": [
                {"type": "function", "function": {"name": "lookup_order"}}]},
            "metadata": {"simulator": simulator_script(fixture)}})
        creds = self.state.credentials
        settings = Settings(twilio_account_sid=creds.account_sid, twilio_auth_token=Secret(creds.auth_token),
                            twilio_api_base_url=self.sims.twilio_url, transfer_destinations=TRANSFER_DESTINATIONS,
                            vapi_api_key=Secret(creds.vapi_api_key), vapi_base_url=self.sims.vapi_url,
                            vapi_webhook_secret=Secret(self.state.vapi.webhook_secret or ""),
                            vapi_assistant_id=assistant["id"], public_url=public, mode=Mode(fixture.mode),
                            vapi_phone_number_id=self._phone_number_id() if fixture.mode == "bypass" else None)
        app = create_app(settings, MemoryStore(), LocalCluster(), VapiClient(self.sims.vapi_url, creds.vapi_api_key))
        return start_in_thread(app, sock=sock), public


_websocket_url = twilio_media.ws_url   # its former name here (tests/test_replay.py imports it)


def _quantile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
