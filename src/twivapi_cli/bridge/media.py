"""WS /twilio/media: Twilio Media Streams <-> Vapi's WebSocket transport, with barge-in.

One ``MediaCall`` per socket; nothing is shared between calls. Its life is one ``StreamState``:

    AWAITING_START --start--> WAITING_VAPI --Vapi's socket open--> RELAYING --> CLOSED
          └──────────── refused / stop / a socket closed / the call ended ─────────┘

Caller -> Vapi: Twilio's frames (``twilio_media``'s typed messages) are decoded, transcoded only in
``pcm16-16k`` mode, and sent as binary frames (``vapi_leg.py``: until Vapi's socket is open they
wait in a bounded buffer, 10 s of audio; past it the oldest frame is dropped and counted).

Vapi -> caller: ``outbound.py`` (framing, queue, pacing, marks); Vapi's socket: ``vapi_leg.py``.

Barge-in: on ``user-interrupted``, from the transport or from /vapi/webhook, whichever comes first,
the outbound queue is dropped, Twilio gets ``clear`` and the generation moves on. A second signal for
the same interruption (the other channel) finds nothing to clear. Vapi decides what interrupts
(``stopSpeakingPlan``): a backchannel ("uh-huh") is a ``speech-update`` without ``user-interrupted``
and the assistant talks on, so clearing on the caller's ``speech-update`` ``started`` too is an
opt-in (``TWIVAPI_BARGE_IN=speech``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import twilio_media
from ..audio import transcoders
from ..config import revealed
from ..errors import StoreError
from ..models import EventType, SignalKind, Trigger
from . import stream_auth
from .call_audio import LATE_EVENTS_S, CallAudio, fill_in
from .deps import Deps, deps
from .outbound import Outbound
from .turns import TurnClock
from .vapi_leg import VAPI_CONNECT_TIMEOUT, VapiLeg, control_event

log = logging.getLogger("twivapi.bridge")

MAX_PAYLOAD = twilio_media.MAX_PAYLOAD


class StreamState(enum.Enum):
    AWAITING_START = "awaiting-start"   # the socket is open; Twilio has not yet said which call it is
    WAITING_VAPI = "waiting-vapi"       # linked to its call; caller audio buffered until Vapi's socket opens
    RELAYING = "relaying"               # both sockets open: audio both ways
    CLOSED = "closed"                   # over (``end_reason`` says why), or refused


def routes() -> list:
    return [WebSocketRoute("/twilio/media", media_stream)]


async def media_stream(websocket: WebSocket) -> None:
    bridge = deps(websocket)
    if not _handshake_ok(bridge, websocket):
        bridge.recorder.count("media.handshake_refused")
        await websocket.close(code=1008)
        return
    await websocket.accept()
    await MediaCall(bridge, websocket).run()


def _handshake_ok(bridge: Deps, websocket: WebSocket) -> bool:
    """The upgrade's X-Twilio-Signature: checked and logged when present, required only with
    TWIVAPI_MEDIA_SIGNATURE=required; the stream is authenticated by its start token (on_start)."""
    return stream_auth.upgrade_allowed(bridge, websocket)


class MediaCall:
    def __init__(self, bridge: Deps, twilio: WebSocket):
        self.bridge, self.twilio = bridge, twilio
        self.recorder, self.store = bridge.recorder, bridge.store
        self.state = StreamState.AWAITING_START
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self.end_reason: str | None = None
        self.inbound, outbound_converter = transcoders(bridge.settings.audio_format)
        self.outbound = Outbound(outbound_converter, self.send_twilio)
        self.outbound.on_first_audio = self._first_audio
        self.vapi = VapiLeg(bridge.recorder, revealed(bridge.settings.vapi_api_key), bridge.vapi_sockets)
        self.turns = TurnClock()
        self.audio: CallAudio | None = None   # serve --record: the two-leg recording (call_audio.py)
        self.recording_task: asyncio.Task | None = None
        self.tasks: list[asyncio.Task] = []
        self.bad_messages = 0
        self.vapi_chunks = 0        # audio messages received from Vapi
        self.twilio_gone = False   # a send found Twilio's socket closed (what it sent before is still read)

    # --- main loop: Twilio -> us ----------------------------------------------------------------
    async def run(self) -> None:
        try:
            while self.state is not StreamState.CLOSED:
                try:
                    frame = await self.twilio.receive()
                except (WebSocketDisconnect, RuntimeError):
                    break
                if frame["type"] == "websocket.disconnect":
                    break
                if frame.get("text") is None:
                    await self.bad("binary frame (Twilio sends JSON text)")
                    continue
                await self.on_twilio(frame["text"])
        finally:
            await self.finish(self.end_reason or "twilio-socket-closed")

    async def on_twilio(self, text: str) -> None:
        try:
            message = twilio_media.parse(text, MAX_PAYLOAD)
        except twilio_media.BadMessage as exc:
            return await self.bad(exc.reason)
        if not isinstance(message, (twilio_media.Connected, twilio_media.Start)):
            if self.stream_sid is None:
                return await self.bad(f"{message.event} before start")
            if message.stream_sid not in (None, self.stream_sid):
                return await self.bad("streamSid does not match this stream")
        try:
            await self._dispatch(message)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:   # e.g. a mark of 5,000 digits
            await self.bad(f"malformed {message.event}: {type(exc).__name__}")
        except StoreError as exc:
            await self.store_unavailable(message.event, exc)

    async def _dispatch(self, message: twilio_media.Message) -> None:
        if isinstance(message, twilio_media.Media):
            await self.on_media(message)
        elif isinstance(message, twilio_media.Mark):
            self.outbound.played(message.name)
            if self.audio is not None:
                self.audio.played(self.outbound.generation, self.outbound.played_ms)
        elif isinstance(message, twilio_media.Start):
            await self.on_start(message)
        elif isinstance(message, twilio_media.Dtmf):
            await self.on_dtmf(message)
        elif isinstance(message, twilio_media.Stop):
            await self.finish("twilio-stream-stopped")
        elif isinstance(message, twilio_media.Clear):
            await self.bad("clear is sent to Twilio, never by it")

    async def store_unavailable(self, event: str, exc: StoreError) -> None:
        """The store failed under a message. A call that has not started cannot (its session is
        unknown): close with 1011 and let Twilio go on to the after-stream webhook. One in progress
        keeps its audio flowing: only what this message would have recorded is lost."""
        self.recorder.count("media.store_error")
        log.warning("media %s: store unavailable during %s: %s", self.call_sid or "(no call yet)", event, exc)
        if self.stream_sid is None:
            await self.refuse("store-unavailable", 1011)

    async def refuse(self, reason: str, code: int) -> None:
        self.state, self.end_reason = StreamState.CLOSED, reason
        await self.twilio.close(code=code)

    async def bad(self, reason: str) -> None:
        """Log, count and drop one bad message; the call stays up."""
        self.bad_messages += 1
        self.recorder.count("media.bad_message")
        if self.bad_messages <= 5:
            log.warning("media %s: dropped a message: %s", self.call_sid or "(no call yet)", reason)
            await self.recorder.record(EventType.MEDIA_BAD_MESSAGE, self.call_sid, reason=reason)

    async def on_start(self, start: twilio_media.Start) -> None:
        if self.state is not StreamState.AWAITING_START:
            return await self.bad("second start")
        refused = await stream_auth.start_refusal(self.bridge, start)   # its token, its session, one per call
        if refused is not None:
            return await self.refuse(refused, 1008)
        self.call_sid, self.stream_sid = start.call_sid, start.stream_sid
        self.outbound.stream_sid, self.vapi.call_sid = start.stream_sid, start.call_sid
        self.state = StreamState.WAITING_VAPI
        await self.store.update_session(start.call_sid, stream_sid=start.stream_sid, instance=self.bridge.instance)
        self.bridge.signals.listen(start.call_sid, self.on_signal)
        if self.bridge.settings.record_dir is not None:
            self.start_recording(start.call_sid)
        await self.recorder.record(EventType.MEDIA_START, start.call_sid, stream_sid=start.stream_sid)
        self.tasks = [asyncio.create_task(self.connect_vapi()), asyncio.create_task(self.outbound.pace())]

    async def on_media(self, media: twilio_media.Media) -> None:
        if media.inbound and self.state in (StreamState.WAITING_VAPI, StreamState.RELAYING):
            if self.audio is not None:
                self.audio.caller(media.payload, media.timestamp)
            await self.vapi.relay(self.inbound.convert(media.payload), time.monotonic())

    def start_recording(self, call_sid: str) -> None:
        """serve --record: this call's WAV and JSON (call_audio.py); pruning the directory and the
        events from before the stream are done beside the stream, never holding it up."""
        settings = self.bridge.settings
        assert settings.record_dir is not None
        try:
            self.audio = CallAudio(settings.record_dir, call_sid)
        except OSError as exc:   # an unwritable directory loses the recording, never the call
            log.warning("media %s: cannot record into %s: %s", call_sid, settings.record_dir, exc)
            return
        self.recorder.taps[call_sid] = self.audio.event
        self.outbound.tap = self.audio.sent
        # not one of self.tasks: a call shorter than it still gets its earlier events
        self.recording_task = asyncio.create_task(fill_in(self.audio, self.store, settings.record_max_mb * 1e6,
                                                          settings.record_max_age_days * 86400))

    async def on_dtmf(self, dtmf: twilio_media.Dtmf) -> None:
        digit = dtmf.digit[:1]
        await self.recorder.record(EventType.MEDIA_DTMF, self.call_sid, digit=digit)
        await self.vapi.send_dtmf(digit)

    # --- Vapi side ------------------------------------------------------------------------------
    async def connect_vapi(self) -> None:
        assert self.call_sid is not None
        session = await self.bridge.signals.wait_ready(self.call_sid, VAPI_CONNECT_TIMEOUT)
        if session is None or session.state.terminal or not session.websocket_call_url:
            reason = "vapi-not-ready" if session is None or not session.state.terminal else session.ended_reason
            return await self.finish(reason or "vapi-not-ready")
        if not await self.vapi.open(session.websocket_call_url):
            return await self.finish("vapi-socket-failed")
        if self.state is StreamState.CLOSED:
            return
        await self.bridge.calls.move(self.call_sid, Trigger.MEDIA_CONNECTED)
        self.state = StreamState.RELAYING
        flushed = await self.vapi.flush_early()
        await self.recorder.record(EventType.MEDIA_VAPI_OPEN, self.call_sid, early_frames=flushed,
                                   early_dropped=self.vapi.early_dropped)
        await self.vapi.receive(self.on_vapi_audio, self.on_vapi_control)
        await self.finish("vapi-socket-closed")

    def on_vapi_audio(self, chunk: bytes) -> None:
        received = time.monotonic()
        self.vapi_chunks += 1
        if not self.outbound.push(chunk):
            self.recorder.count("media.stale_dropped")
        else:
            self.turns.vapi_audio(received, time.monotonic())

    async def on_vapi_control(self, text: str) -> None:
        event, detail = control_event(text) or ("", None)
        if event == "interrupt" or (event == "caller-started" and self.bridge.settings.barge_in == "speech"):
            await self.interrupt(time.monotonic(), source="transport")
        elif event == "caller-stopped":
            self.caller_stopped()
        elif event == "assistant-started":
            self.outbound.new_turn()
        elif event == "assistant-stopped":
            self.outbound.end_of_utterance()
        elif event == "ended":
            await self.finish(detail or "vapi-ended")

    # --- barge-in and signals -------------------------------------------------------------------
    async def on_signal(self, kind: SignalKind, data: dict) -> None:
        if kind is SignalKind.INTERRUPT:
            await self.interrupt(time.monotonic(), source=data.get("source", "webhook"))
        elif kind is SignalKind.SPEECH and data.get("role") == "user" and data.get("status") == "stopped":
            self.caller_stopped()
        elif kind is SignalKind.END:
            await self.finish(data.get("reason", "ended"))

    def caller_stopped(self) -> None:
        """The caller's end of speech: the next turn's latency is timed from it."""
        self.outbound.speech_ended_at = now = time.monotonic()
        self.turns.caller_stopped(now, self.vapi.last_relay_ms)

    async def interrupt(self, signalled: float, source: str) -> None:
        if self.stream_sid is None or not self.outbound.interrupt():
            return
        if self.audio is not None:
            self.audio.cleared()
        await self.send_twilio(twilio_media.Clear(self.stream_sid))
        ms = round((time.monotonic() - signalled) * 1000, 3)
        self.recorder.count("media.interruptions")
        await self.recorder.record(EventType.MEDIA_CLEAR, self.call_sid, ms=ms, source=source,
                                   generation=self.outbound.generation)

    async def _first_audio(self, speech_ended_at: float) -> None:
        now = time.monotonic()
        ms = round((now - speech_ended_at) * 1000, 1)
        await self.recorder.record(EventType.MEDIA_FIRST_AUDIO, self.call_sid, ms=ms, **self.turns.first_audio(now))

    async def send_twilio(self, message: twilio_media.Message | str) -> None:
        if self.state is StreamState.CLOSED or self.twilio_gone:
            return
        text = message if isinstance(message, str) else twilio_media.serialize(message)
        try:
            await self.twilio.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            # Twilio closed its side. What it sent before (its last audio, a stop) is still queued
            # for run(), which reads it and then the disconnect, and ends the call: not here.
            self.twilio_gone = True

    # --- the end, once --------------------------------------------------------------------------
    async def finish(self, reason: str) -> None:
        if self.state is StreamState.CLOSED or self.outbound.playing_out(reason):
            return
        await self.outbound.play_out(reason, lambda: self.twilio_gone)   # Vapi ended it: the rest is still heard
        self.state, self.end_reason = StreamState.CLOSED, reason
        if self.call_sid:
            self.bridge.signals.unlisten(self.call_sid, self.on_signal)
        for task in self.tasks:   # the Vapi side and the pacer (unless one of them is finishing)
            if task is not asyncio.current_task():
                task.cancel()
        await self.vapi.close()
        try:
            await self.twilio.close()
        except (RuntimeError, WebSocketDisconnect):
            pass  # already closed, or the caller vanished
        if self.call_sid:
            await self.recorder.record(EventType.MEDIA_STOP, self.call_sid, reason=reason, frames_in=self.vapi.frames_in,
                                       frames_out=self.outbound.frames_out, bad_messages=self.bad_messages,
                                       early_dropped=self.vapi.early_dropped,
                                       queued_frames=len(self.outbound.queue), vapi_chunks=self.vapi_chunks)
            await self.bridge.calls.end(self.call_sid, reason)
        if self.audio is not None:
            self.stop_recording(self.audio)

    def stop_recording(self, recording: CallAudio) -> None:
        """The audio ends here; the call's late events (its status callback, Vapi's report) still go
        into the JSON for a while."""
        recording.close()
        self.outbound.tap = None
        taps = self.recorder.taps

        def detach() -> None:
            if taps.get(recording.call_sid) == recording.event:
                del taps[recording.call_sid]
        asyncio.get_running_loop().call_later(LATE_EVENTS_S, detach)
