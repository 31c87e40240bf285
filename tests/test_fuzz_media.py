"""Bad input on the Media Streams socket (WS /twilio/media), generated and mutated.

Every connection is correctly signed (so the input reaches the message handling) and, for most
examples, linked to a live call whose Vapi side is the simulator. Sent: random JSON, text that is
not JSON, binary frames, bad base64, empty and oversized payloads, frames past the socket's size
limit, JSON nested past the parser's depth, non-string event names, Infinity and NaN in numbers,
and Twilio's own messages mutated and in the wrong order (media/mark/dtmf/stop before start, start
twice, unknown events, missing or foreign streamSid).

The outcome asserted for each example:
- nothing escapes the bridge's handler (no exception, so never a 1011 or an aborted socket), and
  nothing hangs (every step has a timeout);
- every message a model of the protocol calls bad is counted as bad (exactly, where the model
  can tell), and the call stays up: only ``stop``, a refused ``start`` or a frame over the size
  limit closes the socket, with 1000, 1008 or 1009 and the matching end reason;
- the session ends with a reason and leaves ``active_sessions``;
- one good call runs alongside the whole property, and its audio comes back bit-exact (an echo
  assistant): the fuzzing never disturbed it;
- afterwards no HTTP route has ever answered a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import threading
import time
from typing import Any

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twivapi_cli import signing, twilio_media
from twivapi_cli.bridge import media
from twivapi_cli.models import CallState
from twivapi_cli.sim.twilio_caller import CallerPlan, CallResult
from twivapi_cli.store.memory import MemoryStore

from .polling import until, wait_for
from .support import TOKEN, VAPI_SECRET, bridge_settings, new_call_sid, place_call, running_bridge

EXAMPLES = 250         # connections per property, normal run
SLOW_EXAMPLES = 500     # the slow variant (./scripts/test-slow)
STEP_TIMEOUT = 5.0
WS_MAX = 1024 * 1024          # the bridge's ws_max_size (bridge/server.py)
CATCH_UP_S = 30.0             # how long the good call's playback may take to catch up after the run
GOOD_AUDIO_S = 600            # the good call's audio: longer than any run of this module


# --- the bridge under test, with each media handler's end observed ----------------------------------

@dataclasses.dataclass
class Ended:
    call: Any                     # the MediaCall
    error: BaseException | None   # what escaped its run(), if anything


@pytest.fixture(scope="module")
def sims(sims):
    # one assistant for every call: it sends back exactly what it hears (bit-exact checks)
    sims.echo_assistant = sims.assistant(behavior="echo")
    return sims


class EndedCalls:
    """Every MediaCall.run() that returned (or raised), by the ``tag`` query parameter of its socket's
    URL: each test connection has its own tag, so a test only ever looks at its own handler."""

    def __init__(self):
        self._ended: dict[str, Ended] = {}
        self._changed = threading.Condition()

    def put(self, tag: str, ended: Ended) -> None:
        with self._changed:
            self._ended[tag] = ended
            self._changed.notify_all()

    def get(self, tag: str, timeout: float = STEP_TIMEOUT) -> Ended:
        with self._changed:
            assert self._changed.wait_for(lambda: tag in self._ended, timeout), \
                f"the bridge's handler for {tag} did not finish in {timeout} s (hung?)"
            return self._ended.pop(tag)


@pytest.fixture(scope="module")
def ended():
    finished = EndedCalls()
    original = media.MediaCall.run

    async def observed_run(self):
        error = None
        try:
            await original(self)
        except BaseException as exc:
            error = exc
            raise
        finally:
            finished.put(self.twilio.query_params.get("tag", ""), Ended(self, error))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(media.MediaCall, "run", observed_run)
        yield finished


@pytest.fixture(scope="module")
def bridge(sims, ended):
    settings_ = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.echo_assistant)
    with running_bridge(settings_, MemoryStore(), public_from_server=True) as b:
        b.ws_url = b.url.replace("http://", "ws://") + "/twilio/media"
        b.ended = ended
        yield b
        five_xx = {key: n for key, n in b.deps.http_counts.items() if key[1] >= 500}
        assert not five_xx, f"HTTP 5xx answered during the media fuzzing: {five_xx}"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# --- the good call alongside -------------------------------------------------------------------------

class GoodCall:
    """A call to the echo assistant on its own thread: random (seeded) audio in, the same out."""

    def __init__(self, bridge, sims):
        self.bridge, self.sims = bridge, sims
        self.call_sid = new_call_sid()
        self.sent = random.Random(9).randbytes(8000 * GOOD_AUDIO_S)
        self.live = CallResult(self.call_sid)   # the call's result as it runs
        self.result: CallResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def _run(self) -> None:
        try:
            self.result = place_call(self.bridge.url, CallerPlan(audio=self.sent, hangup_after_s=None),
                                     result=self.live)
        except BaseException as exc:   # reported by check()
            self.error = exc

    def __enter__(self) -> GoodCall:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self._active():
            assert time.monotonic() < deadline and self.thread.is_alive(), "the good call never went active"
            time.sleep(0.02)
        self.started = time.monotonic()   # its audio flows from here
        return self

    def _active(self) -> bool:
        session = self.bridge.session(self.call_sid)
        return session is not None and session.state == CallState.ACTIVE

    def __exit__(self, *exc) -> None:
        # It kept playing: what the caller said during the run comes back, less a 1 s round trip.
        # Playback lag is no loss (the fuzzer, the simulators and the bridge share one GIL, on a
        # machine that may be loaded), so it may catch up for a while; a stalled relay never does.
        duration = time.monotonic() - self.started
        due = 8000 * (duration - 1.0)
        deadline = time.monotonic() + CATCH_UP_S
        while len(self.live.heard) < due and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.1)
        # Twilio says the call completed: the bridge ends it, the caller's stream closes
        ended = signed_post(self.bridge, "/twilio/status", {"CallSid": self.call_sid, "CallStatus": "completed"})
        assert ended.status_code == 204
        self.thread.join(15)
        if exc[0] is None:
            self.check(due)

    def check(self, due: float) -> None:
        assert not self.thread.is_alive(), "the good call did not end"
        assert self.error is None, repr(self.error)
        result = self.result
        assert not result.errors, result.errors
        heard = bytes(result.heard)
        # everything it said during the run came back, in order, bit-exact
        print(f"good call: {due / 8000 + 1:.1f} s, {len(heard) / 8000:.1f} s heard back bit-exact")
        assert len(heard) >= due, (len(heard), due)
        assert heard == self.sent[:len(heard)], "the good call's audio was altered while the fuzzing ran"
        session = self.bridge.session(self.call_sid)
        assert session.state == CallState.ENDED and session.ended_reason == "twilio-completed"
        stops = [e for e in self.bridge.events(self.call_sid) if e.type == "media.stop"]
        assert len(stops) == 1 and stops[0].data["bad_messages"] == 0


def signed_post(bridge, path: str, params: dict) -> httpx.Response:
    signature = signing.twilio_signature(TOKEN, bridge.url + path, params)
    return bridge.http.post(bridge.url + path, data=params, headers={"X-Twilio-Signature": signature})


# --- one fuzzed connection ---------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    close_code: int | None
    sent: int                   # frames sent before the socket closed
    ended: Ended
    received: list = dataclasses.field(default_factory=list)


_tags = iter(range(1, 10**9))


async def connect(bridge, tag: str | None = None) -> websockets.ClientConnection:
    """A correctly signed Media Streams socket; ``ws.tag`` names its handler in ``bridge.ended``."""
    tag = tag or f"t{next(_tags)}"
    url = f"{bridge.ws_url}?tag={tag}"
    headers = {"X-Twilio-Signature": signing.twilio_signature(TOKEN, url, {})}
    ws = await asyncio.wait_for(websockets.connect(url, additional_headers=headers, max_size=None,
                                                   compression=None, open_timeout=STEP_TIMEOUT), STEP_TIMEOUT)
    ws.tag = tag
    return ws


async def run_connection(bridge, frames: list[str | bytes], *, server_closes: bool = False) -> Outcome:
    """Send ``frames``; then wait for the bridge to close the socket (``server_closes``) or close it."""
    ws = await connect(bridge)
    received: list = []

    async def drain():
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                received.append(message)

    reader = asyncio.create_task(drain())
    sent = 0
    try:
        for frame in frames:
            try:
                await asyncio.wait_for(ws.send(frame), STEP_TIMEOUT)
            except websockets.ConnectionClosed:
                break
            sent += 1
        if server_closes:   # its close code, not an echo of ours
            await asyncio.wait_for(asyncio.shield(reader), STEP_TIMEOUT)
        await asyncio.wait_for(ws.close(), STEP_TIMEOUT)
        await asyncio.wait_for(reader, STEP_TIMEOUT)
    finally:
        reader.cancel()
    code = ws.close_code
    finished = await asyncio.get_running_loop().run_in_executor(None, bridge.ended.get, ws.tag)
    return Outcome(code, sent, finished, received)


def new_session(bridge) -> str:
    """A live call, as Twilio makes it: the voice webhook (the bridge sets up Vapi in the background)."""
    sid = new_call_sid()
    response = signed_post(bridge, "/twilio/voice", {"CallSid": sid, "From": "+15551112222", "To": "+15553334444"})
    assert response.status_code == 200 and "<Stream" in response.text, response.text
    return sid


def terminal_session(bridge, sid: str):
    session = bridge.session(sid)
    return session if session is not None and session.state.terminal else None


def finish_session(bridge, sid: str) -> None:
    """Twilio's completed callback; then the session must be terminal, with a reason, and not active."""
    response = signed_post(bridge, "/twilio/status", {"CallSid": sid, "CallStatus": "completed"})
    assert response.status_code == 204, response.text
    session = bridge.session(sid)
    assert session.state.terminal and session.ended_reason, session
    active = bridge.server.run(lambda: bridge.deps.store.active_sessions())
    assert sid not in {s.call_sid for s in active}


# --- Twilio's messages, valid and broken, and a model of what the bridge must do with each -----------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
KNOWN_EVENTS = {"connected", "start", "media", "mark", "dtmf", "stop"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stream_parameters(sid: str) -> dict:
    """The <Parameter>s our TwiML gives a call's stream, as Twilio hands them back: the CallSid and
    the stream's token (without which a start is refused)."""
    return {"callSid": sid, signing.STREAM_TOKEN_PARAM: signing.stream_token(TOKEN, sid)}


def valid(kind: str, sid: str, stream: str, payload: bytes = b"\xff" * 160) -> dict:
    if kind == "connected":
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    if kind == "start":
        return {"event": "start", "sequenceNumber": "1", "streamSid": stream, "start": {
            "accountSid": "AC" + "0" * 32, "streamSid": stream, "callSid": sid, "tracks": ["inbound"],
            "customParameters": stream_parameters(sid),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    if kind == "media":
        return {"event": "media", "sequenceNumber": "2", "streamSid": stream,
                "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": b64(payload)}}
    if kind == "mark":
        return {"event": "mark", "streamSid": stream, "mark": {"name": "0:20"}}
    if kind == "dtmf":
        return {"event": "dtmf", "streamSid": stream, "dtmf": {"track": "inbound_track", "digit": "5"}}
    if kind == "stop":
        return {"event": "stop", "streamSid": stream, "stop": {"accountSid": "AC" + "0" * 32, "callSid": sid}}
    raise ValueError(kind)


def _lenient_b64_ok(text: str) -> bool:
    try:
        decoded = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        return False
    return 0 < len(decoded) <= media.MAX_PAYLOAD


@dataclasses.dataclass
class Op:
    """One frame to send and what the model expects: ``bad`` is True (must be counted), False (must
    not) or None (either: a random mutation the model does not judge); ``effect`` is the state
    change it makes when accepted (start, stop, refuse, too-big)."""
    frame: str | bytes
    bad: bool | None
    effect: str | None = None
    label: str = ""

    def __repr__(self) -> str:   # a falsifying example stays readable: frames can be 1 MB
        shown = self.frame if len(self.frame) <= 120 else self.frame[:100] + f"... ({len(self.frame)} long)"
        return f"Op({self.label}, bad={self.bad}, {shown!r})"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)
not_start_or_stop = st.text(max_size=12).filter(lambda e: e not in ("start", "stop"))


@st.composite
def ops(draw, sid: str, stream: str) -> Op:
    """One generated frame for a call ``sid`` whose stream would be ``stream``."""
    choice = draw(st.sampled_from([
        "valid-connected", "valid-start", "valid-media", "valid-mark", "valid-dtmf", "valid-stop",
        "valid-media-no-streamSid", "outbound-track", "bad-base64", "empty-payload", "oversized-payload",
        "payload-not-a-string", "foreign-streamSid", "no-event", "unknown-event", "event-not-a-string",
        "start-without-ids", "start-unsupported-format", "start-sample-rate-not-finite", "start-unknown-call",
        "start-not-an-object", "media-not-an-object", "json-not-an-object", "not-json", "binary",
        "deeply-nested", "random-object", "mutated", "random-mark-name"]))
    frame: Any
    if choice.startswith("valid-") and choice != "valid-media-no-streamSid":
        kind = choice[len("valid-"):]
        payload = draw(st.binary(min_size=1, max_size=480))
        frame = valid(kind, sid, stream, payload)
        return Op(json.dumps(frame), False, None if kind == "connected" else kind, choice)
    if choice == "valid-media-no-streamSid":   # Twilio always sends it; the bridge does not insist
        frame = valid("media", sid, stream)
        del frame["streamSid"]
        return Op(json.dumps(frame), False, "media", choice)
    if choice == "outbound-track":              # not the caller's audio: ignored, not bad
        frame = valid("media", sid, stream)
        frame["media"]["track"] = "outbound"
        return Op(json.dumps(frame), False, "media", choice)
    if choice == "bad-base64":
        text = b64(draw(st.binary(min_size=1, max_size=300)))
        at = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(["!", "*", "-", "_", ".", " ", "\n", "é", "\x00", "====", "A"]))
        broken = text[:at] + junk + text[at:]
        if junk == "A":   # one character more: the length is no longer a multiple of 4
            broken = text + "A"
        frame = valid("media", sid, stream)
        frame["media"]["payload"] = broken
        # excess padding after a whole quantum ("AAAA====") decodes to the intended bytes: accepted
        return Op(json.dumps(frame), None if _lenient_b64_ok(broken) else True, None, choice)
    if choice == "empty-payload":
        frame = valid("media", sid, stream)
        frame["media"]["payload"] = ""
        return Op(json.dumps(frame), True, None, choice)
    if choice == "oversized-payload":
        frame = valid("media", sid, stream, b"\x7f" * draw(st.integers(media.MAX_PAYLOAD + 1, 3 * media.MAX_PAYLOAD)))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "payload-not-a-string":
        frame = valid("media", sid, stream)
        frame["media"]["payload"] = draw(st.none() | st.integers() | st.lists(st.integers(0, 255), max_size=3)
                                         | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "foreign-streamSid":
        kind = draw(st.sampled_from(["media", "mark", "dtmf", "stop"]))
        frame = valid(kind, sid, stream)
        frame["streamSid"] = draw(st.sampled_from(["MZ" + "f" * 32, "", 0, [stream], {"sid": stream}]))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "no-event":
        frame = valid(draw(st.sampled_from(sorted(KNOWN_EVENTS))), sid, stream)
        del frame["event"]
        return Op(json.dumps(frame), True, None, choice)
    if choice == "unknown-event":
        frame = valid("media", sid, stream)
        frame["event"] = draw(st.text(max_size=30).filter(lambda e: e not in KNOWN_EVENTS))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "event-not-a-string":
        frame = valid("media", sid, stream)
        frame["event"] = draw(st.sampled_from([None, 1, 2.5, True, ["media"], {"media": 1}, [], {}]))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "start-without-ids":
        frame = valid("start", sid, stream)
        for key in ("streamSid", "callSid", "customParameters"):
            frame["start"].pop(key)
        frame.pop("streamSid")
        if draw(st.booleans()):
            frame["start"]["streamSid"] = stream   # a stream, but no call
        return Op(json.dumps(frame), True, None, choice)
    if choice == "start-unsupported-format":
        frame = valid("start", sid, stream)
        frame["start"]["mediaFormat"] = draw(st.sampled_from([
            {"encoding": "audio/x-l16", "sampleRate": 16000}, {"encoding": "audio/x-mulaw", "sampleRate": 16000},
            {"encoding": "audio/x-mulaw", "sampleRate": "8k"}, {"encoding": "audio/x-mulaw", "sampleRate": [8000]},
            {"encoding": None}, "audio/x-mulaw", [1]]))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "start-sample-rate-not-finite":
        frame = valid("start", sid, stream)
        frame["start"]["mediaFormat"]["sampleRate"] = draw(st.sampled_from([float("inf"), float("-inf"), float("nan"),
                                                                            1e300, -8000]))
        return Op(json.dumps(frame), True, None, choice)
    if choice == "start-unknown-call":   # a stream for a call this bridge never answered: refused
        other = new_call_sid()
        frame = valid("start", other, stream)
        return Op(json.dumps(frame), None, "refuse", choice)
    if choice == "start-not-an-object":
        frame = valid("start", sid, stream)
        frame["start"] = draw(st.none() | st.text(max_size=10) | st.lists(st.integers(), max_size=2) | st.integers())
        return Op(json.dumps(frame), True, None, choice)
    if choice == "media-not-an-object":
        kind = draw(st.sampled_from(["media", "mark", "dtmf"]))
        frame = valid(kind, sid, stream)
        frame[kind] = draw(st.none() | st.text(max_size=10) | st.lists(st.integers(), max_size=2) | st.integers())
        return Op(json.dumps(frame), True, None, choice)
    if choice == "json-not-an-object":
        value = draw(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                     | st.lists(json_values, max_size=3))
        return Op(json.dumps(value), True, None, choice)
    if choice == "not-json":
        text = draw(st.text(max_size=200))
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            return Op(text, True, None, choice)
        return Op(text, not isinstance(parsed, dict) or None, None, choice)
    if choice == "binary":
        return Op(draw(st.binary(max_size=400)), True, None, choice)
    if choice == "deeply-nested":
        depth = draw(st.integers(2_000, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = "1" if opener == "[" else "1"
        text = opener * depth + inner + closer * depth
        if len(text) > WS_MAX:
            text = text[:WS_MAX - 10]
        return Op(text, True, None, choice)
    if choice == "random-object":   # never a start or stop: those change the state the model tracks
        frame = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
        frame.pop("event", None)
        if draw(st.booleans()):
            frame["event"] = draw(st.sampled_from(["media", "mark", "dtmf", "connected"]) | not_start_or_stop)
        return Op(json.dumps(frame), None if "event" in frame else True, None, choice)
    if choice == "random-mark-name":
        frame = valid("mark", sid, stream)
        frame["mark"]["name"] = draw(st.text(max_size=30) | st.integers().map(str) | st.just("0:" + "9" * 5000))
        return Op(json.dumps(frame), None, None, choice)
    # "mutated": a valid media/mark/dtmf/connected with one value replaced or removed
    kind = draw(st.sampled_from(["media", "mark", "dtmf", "connected"]))
    frame = valid(kind, sid, stream)
    container = frame
    keys = [k for k in frame if k != "event"]
    key = draw(st.sampled_from(keys))
    if isinstance(frame[key], dict) and frame[key] and draw(st.booleans()):
        container, key = frame[key], draw(st.sampled_from(sorted(frame[key])))
    if draw(st.booleans()):
        container.pop(key)
    else:
        container[key] = draw(json_values)
    return Op(json.dumps(frame), None, None, choice)


class Model:
    """What the bridge must do with a sequence of ops: how many bad messages (a range where the
    model does not judge), and whether and how the socket ends before the client closes it."""

    def __init__(self):
        self.started = False
        self.closed_by: str | None = None      # stop | refuse
        self.low = self.high = 0
        self.processed = 0                     # ops the bridge handles before it closes

    def feed(self, op: Op) -> None:
        if self.closed_by:
            return
        self.processed += 1
        if op.effect in ("media", "mark", "dtmf", "stop") and op.bad is False:
            if not self.started:               # before start: dropped and counted
                self.low, self.high = self.low + 1, self.high + 1
                return
            if op.effect == "stop":
                self.closed_by = "stop"
            return
        if op.effect == "start":
            if self.started:
                self.low, self.high = self.low + 1, self.high + 1   # a second start
            else:
                self.started = True
            return
        if op.effect == "refuse":
            if self.started:
                self.low, self.high = self.low + 1, self.high + 1
            else:
                self.closed_by = "refuse"
            return
        if op.bad is True:
            self.low, self.high = self.low + 1, self.high + 1
        elif op.bad is None:
            self.high += 1

    @property
    def end_reason(self) -> str:
        return {"stop": "twilio-stream-stopped", "refuse": "no-session"}.get(self.closed_by, "twilio-socket-closed")

    @property
    def close_codes(self) -> set[int]:
        # the bridge closes with 1000 after stop and 1008 on a refused start; else it answers our 1000
        return {"refuse": {1008}}.get(self.closed_by, {1000})


def check_outcome(bridge, sid: str, ops_: list[Op], model: Model, outcome: Outcome) -> None:
    labels = [op.label for op in ops_]
    call = outcome.ended.call
    assert outcome.ended.error is None, (labels, repr(outcome.ended.error))
    assert outcome.close_code in model.close_codes, (labels, outcome.close_code)
    assert model.low <= call.bad_messages <= model.high, (labels, call.bad_messages, model.low, model.high,
                                                          call.end_reason, outcome.sent)
    assert call.end_reason == model.end_reason, (labels, call.end_reason)
    if model.started:
        assert call.call_sid == sid
        # the handler may return while another of its tasks (the pacer, finding the socket closed)
        # is still ending the call: it must end, with the model's reason, within a bound
        session = wait_for(lambda: terminal_session(bridge, sid), f"the session of {labels} ended")
        assert session.ended_reason == model.end_reason, (labels, session.ended_reason)
        stops = wait_for(lambda: [e for e in bridge.events(sid) if e.type == "media.stop"], "media.stop recorded")
        assert len(stops) == 1 and stops[0].data["bad_messages"] == call.bad_messages
    else:
        assert call.call_sid is None, "a stream was linked to a call without a valid start"
    finish_session(bridge, sid)


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def run_property(bridge, loop, examples: int) -> int:
    seen = {"examples": 0}

    @fuzz_settings(examples)
    @given(data=st.data())
    def property_(data):
        sid = new_session(bridge)
        stream = "MZ" + sid[2:]
        # most calls begin as Twilio begins them, so what follows reaches the handlers of a live stream
        lead = data.draw(st.sampled_from(["connected+start", "start", "connected+start", "start", "nothing"]),
                         label="lead")
        ops_ = [Op(json.dumps(valid(kind, sid, stream)), False, None if kind == "connected" else kind, kind)
                for kind in {"connected+start": ["connected", "start"], "start": ["start"]}.get(lead, [])]
        count = data.draw(st.integers(1, 12), label="frames")
        ops_ += [data.draw(ops(sid, stream), label=f"op{i}") for i in range(count)]
        model = Model()
        for op in ops_:
            model.feed(op)
        outcome = loop.run_until_complete(run_connection(bridge, [op.frame for op in ops_],
                                                         server_closes=model.closed_by is not None))
        check_outcome(bridge, sid, ops_, model, outcome)
        seen["examples"] += 1
        key = f"ended by {model.closed_by or 'the caller'}, {'after' if model.started else 'without'} a start"
        seen[key] = seen.get(key, 0) + 1
        seen["bad counted"] = seen.get("bad counted", 0) + outcome.ended.call.bad_messages
        for op in ops_:
            seen[op.label] = seen.get(op.label, 0) + 1

    property_()
    return seen["examples"]


# Hypothesis warns when the global random state moves during a draw: here the bridge, simulator and
# good-call threads run alongside the draws, and use it; the draws themselves do not.
CONCURRENT_THREADS_USE_RANDOM = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")


@CONCURRENT_THREADS_USE_RANDOM
def test_generated_and_mutated_messages_never_crash_and_other_calls_are_unaffected(bridge, sims, loop):
    with GoodCall(bridge, sims):
        examples = run_property(bridge, loop, EXAMPLES)
    assert examples >= EXAMPLES * 0.9
    assert httpx.get(bridge.url + "/health").status_code == 200


@pytest.mark.slow
@CONCURRENT_THREADS_USE_RANDOM
def test_generated_and_mutated_messages_many_more(bridge, sims, loop):
    with GoodCall(bridge, sims):
        run_property(bridge, loop, SLOW_EXAMPLES)


# --- named scenarios: exact outcome, and the call still relays audio afterwards ------------------------

MARKER = bytes(range(1, 161))   # caller audio sent after the bad input: it must reach Vapi


def _scenario(sid: str, stream: str) -> dict[str, tuple[list[str | bytes], int]]:
    """name -> (frames sent after a valid start, bad messages expected)."""
    media_ = json.dumps(valid("media", sid, stream))
    no_stream = valid("media", sid, stream)
    del no_stream["streamSid"]
    return {
        "non-json-text": (["hello", "{", "{'event': 'media'}", "\x00"], 4),
        "binary-frames": ([b"\x00\x01\x02", bytes(160), b""], 3),
        "random-json": (["[]", "1", "null", '"media"', '{"x": 1}', '{"event": null}'], 6),
        "bad-base64": ([json.dumps({**valid("media", sid, stream), "media": {"payload": p}})
                        for p in ("!!!!", "abc", "YWJj\n", "YW=Jj", "====", "é")], 6),
        "empty-and-oversized-payload": ([json.dumps(valid("media", sid, stream, b"")),
                                         json.dumps(valid("media", sid, stream, b"\x7f" * (media.MAX_PAYLOAD + 1)))], 2),
        "start-twice": ([json.dumps(valid("start", sid, stream)), json.dumps(valid("start", sid, "MZ" + "1" * 32))], 2),
        "unknown-events": ([json.dumps({**valid("media", sid, stream), "event": e})
                            for e in ("clear", "Media", "", "x" * 1000)], 4),
        "event-not-a-string": ([json.dumps({**valid("media", sid, stream), "event": e})
                                for e in (["media"], {"a": 1}, 5, True)], 4),
        "foreign-streamSid": ([json.dumps({**valid(k, sid, stream), "streamSid": "MZ" + "e" * 32})
                               for k in ("media", "mark", "dtmf", "stop")], 4),
        "missing-streamSid-is-tolerated": ([json.dumps(no_stream)] * 3, 0),
        "deeply-nested-json": (["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000], 2),
        "non-finite-numbers": ([media_.replace('"20"', "Infinity"), media_.replace('"20"', "NaN"),
                                json.dumps(valid("mark", sid, stream)).replace('"0:20"', "-Infinity")], 0),
        "frame-just-under-the-size-limit": ([json.dumps({**valid("media", sid, stream),
                                                         "pad": "x" * (WS_MAX - 1000)})], 0),
        "marks-that-are-not-ours": ([json.dumps({**valid("mark", sid, stream), "mark": {"name": n}})
                                     for n in ("", ":", "7:x", "0:²", "0:" + "9" * 5000, "a:b:c")], 2),
    }


SCENARIOS = list(_scenario("CA", "MZ"))


def relay_around(bridge, sims, loop, sid: str, before_start: list, after_start: list) -> Ended:
    """Send ``before_start``, a valid start, ``after_start``, then caller audio (MARKER) that must
    reach the assistant with the socket still open, then stop: the call survived the bad input."""
    stream = "MZ" + sid[2:]

    async def go():
        ws = await connect(bridge)
        reader = asyncio.create_task(_drain(ws))
        for frame in [*before_start, json.dumps(valid("start", sid, stream)), *after_start,
                      json.dumps(valid("media", sid, stream, MARKER))]:
            await ws.send(frame)
        assistant = await until(lambda: bridge.session(sid).vapi_call_id and sims.state.vapi.drivers.get(
            bridge.session(sid).vapi_call_id))
        await until(lambda: MARKER in bytes(assistant.heard))
        assert ws.close_code is None, f"the bridge closed the socket: {ws.close_code} {ws.close_reason}"
        await ws.send(json.dumps(valid("stop", sid, stream)))
        await asyncio.wait_for(reader, STEP_TIMEOUT)
        return ws.close_code, ws.tag

    code, tag = loop.run_until_complete(go())
    ended = bridge.ended.get(tag)
    assert ended.error is None, repr(ended.error)
    assert code == 1000 and ended.call.end_reason == "twilio-stream-stopped"
    assert wait_for(lambda: bridge.session(sid).ended_reason, "the session ended") == "twilio-stream-stopped"
    finish_session(bridge, sid)
    return ended


@pytest.mark.parametrize("name", SCENARIOS)
def test_bad_input_after_start_is_dropped_and_counted_and_the_call_stays_up(name, bridge, sims, loop):
    sid = new_session(bridge)
    frames, bad = _scenario(sid, "MZ" + sid[2:])[name]
    ended = relay_around(bridge, sims, loop, sid, [json.dumps(valid("connected", sid, "MZ" + sid[2:]))], frames)
    assert ended.call.bad_messages == bad, (name, ended.call.bad_messages)


ORDER_SCENARIOS = {
    # name: (frames before a valid start, bad messages expected)
    "media-before-start": (["media", "media", "media"], 3),
    "stop-before-start": (["stop"], 1),
    "mark-and-dtmf-before-start": (["mark", "dtmf"], 2),
    "start-without-streamSid": (["start-no-stream"], 1),
    "start-without-callSid": (["start-no-call"], 1),
    "connected-twice": (["connected", "connected"], 0),
    "start-with-an-infinite-sampleRate": (["start-infinite-rate"], 1),
    "start-for-another-format": (["start-16k"], 1),
}


@pytest.mark.parametrize("name", list(ORDER_SCENARIOS))
def test_wrong_event_order_is_dropped_and_counted_and_a_valid_start_still_works(name, bridge, sims, loop):
    sid = new_session(bridge)
    stream = "MZ" + sid[2:]
    names, bad = ORDER_SCENARIOS[name]

    def frame(kind: str) -> str:
        if kind == "start-no-stream":
            message = valid("start", sid, stream)
            message.pop("streamSid")
            message["start"].pop("streamSid")
            return json.dumps(message)
        if kind == "start-no-call":
            message = valid("start", sid, stream)
            message["start"].pop("callSid")
            message["start"]["customParameters"] = {}
            return json.dumps(message)
        if kind in ("start-infinite-rate", "start-16k"):
            message = valid("start", sid, stream)
            message["start"]["mediaFormat"]["sampleRate"] = float("inf") if kind == "start-infinite-rate" else 16000
            return json.dumps(message)   # json writes Infinity, and Python's json reads it back
        return json.dumps(valid(kind, sid, stream))

    ended = relay_around(bridge, sims, loop, sid, [frame(kind) for kind in names], [])
    assert ended.call.bad_messages == bad, (name, ended.call.bad_messages)


class ClosedTwilioSocket:
    """Twilio's side as the bridge sees it after Twilio sent its last frames and closed: every frame
    is still to be read, every send fails. ``on_read(n)`` runs before the n-th frame is returned."""

    def __init__(self, frames: list[str], on_read):
        self.frames, self.on_read, self.reads = list(frames), on_read, 0
        self.query_params = {"tag": f"closed-{id(self)}"}

    async def receive(self) -> dict:
        self.reads += 1
        await self.on_read(self.reads)
        if not self.frames:
            return {"type": "websocket.disconnect", "code": 1000}
        return {"type": "websocket.receive", "text": self.frames.pop(0)}

    async def send_text(self, text: str) -> None:
        from starlette.websockets import WebSocketDisconnect
        raise WebSocketDisconnect(1006)

    async def close(self, code: int = 1000) -> None:
        pass


def test_frames_received_before_twilio_closed_are_processed_even_if_a_send_failed_first(bridge):
    """Twilio sends its last audio and ``stop``, then closes. If the pacer's next send finds the
    socket closed before the receive loop has read those frames, the frames must still be read:
    the call ends as ``twilio-stream-stopped``, with the last audio relayed and bad input counted."""
    sid = new_session(bridge)
    stream = "MZ" + sid[2:]
    frames = [json.dumps(valid("start", sid, stream)), "not json",
              *[json.dumps(valid("media", sid, stream)) for _ in range(3)], "[]",
              json.dumps(valid("stop", sid, stream))]
    holder: dict = {}

    async def on_read(n: int) -> None:
        if n == 3:   # after start and one bad frame: the pacer sends, and finds Twilio gone
            await holder["call"].send_twilio(twilio_media.Mark(stream, "0:20"))

    async def go():
        call = holder["call"] = media.MediaCall(bridge.deps, ClosedTwilioSocket(frames, on_read))
        await call.run()
        return call

    call = bridge.server.run(go)
    assert call.end_reason == "twilio-stream-stopped", call.end_reason
    assert call.bad_messages == 2, call.bad_messages
    bridge.ended.get(call.twilio.query_params["tag"])
    assert wait_for(lambda: bridge.session(sid).ended_reason, "the session ended") == "twilio-stream-stopped"
    finish_session(bridge, sid)


def test_a_frame_over_the_size_limit_closes_with_1009_and_ends_the_call(bridge, loop):
    sid = new_session(bridge)
    stream = "MZ" + sid[2:]
    huge = json.dumps({**valid("media", sid, stream), "pad": "x" * (WS_MAX + 10)})

    async def go():
        ws = await connect(bridge)
        reader = asyncio.create_task(_drain(ws))
        await ws.send(json.dumps(valid("start", sid, stream)))
        await until(lambda: bridge.session(sid).stream_sid == stream)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(huge)
        await asyncio.wait_for(reader, STEP_TIMEOUT)
        return ws.close_code, ws.tag

    code, tag = loop.run_until_complete(go())
    ended = bridge.ended.get(tag)
    assert ended.error is None, repr(ended.error)
    assert code == 1009, code
    session = wait_for(lambda: terminal_session(bridge, sid), "the session ended")
    assert session.state == CallState.ENDED and session.ended_reason == "twilio-socket-closed"
    finish_session(bridge, sid)


def test_a_start_for_a_call_this_bridge_never_answered_is_refused_with_1008(bridge, loop):
    sid = new_call_sid()   # no voice webhook
    outcome = loop.run_until_complete(run_connection(bridge, [json.dumps(valid("start", sid, "MZ" + sid[2:])),
                                                              json.dumps(valid("media", sid, "MZ" + sid[2:]))],
                                                     server_closes=True))
    assert outcome.ended.error is None and outcome.close_code == 1008
    assert outcome.ended.call.end_reason == "no-session" and outcome.ended.call.call_sid is None
    refused = [e for e in bridge.events(sid) if e.type == "media.refused"]
    assert refused and refused[0].data["reason"]
    assert bridge.session(sid) is None, "a refused stream created a session"


@pytest.fixture(scope="module")
def signature_required_bridge(sims):
    """A bridge that requires the upgrade's X-Twilio-Signature (TWIVAPI_MEDIA_SIGNATURE=required)."""
    settings_ = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.echo_assistant, TWIVAPI_MEDIA_SIGNATURE="required")
    with running_bridge(settings_, MemoryStore(), public_from_server=True) as b:
        b.ws_url = b.url.replace("http://", "ws://") + "/twilio/media"
        yield b


@settings(max_examples=max(40, EXAMPLES // 3), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(signature=st.none() | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40),
       query=st.none() | st.text(alphabet="abc=&%12", max_size=12))
def test_unsigned_or_mis_signed_handshakes_are_refused_before_the_socket_opens(signature_required_bridge, loop,
                                                                               signature, query):
    bridge = signature_required_bridge
    url = bridge.ws_url + (f"?{query}" if query else "")
    headers = {} if signature is None else {"X-Twilio-Signature": signature}

    async def go():
        with pytest.raises(websockets.InvalidStatus) as refused:
            await asyncio.wait_for(websockets.connect(url, additional_headers=headers, open_timeout=STEP_TIMEOUT),
                                   STEP_TIMEOUT)
        return refused.value.response.status_code

    assert loop.run_until_complete(go()) == 403


def test_http_routes_still_answer_after_the_media_fuzzing(bridge):
    sid = new_session(bridge)
    deadline = time.monotonic() + 5
    while bridge.session(sid).state != CallState.READY:
        assert time.monotonic() < deadline, "a call after the fuzzing was not set up"
        time.sleep(0.02)
    body = json.dumps({"message": {"type": "status-update", "status": "in-progress",
                                   "call": {"id": bridge.session(sid).vapi_call_id}}}).encode()
    vapi = bridge.http.post(bridge.url + "/vapi/webhook", content=body,
                            headers={"content-type": "application/json", **signing.sign_vapi(VAPI_SECRET, body)})
    assert vapi.status_code == 200
    assert signed_post(bridge, "/twilio/after-stream", {"CallSid": sid}).status_code == 200
    assert httpx.get(bridge.url + "/health").json()["status"] == "ok"
    finish_session(bridge, sid)


async def _drain(ws) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass
