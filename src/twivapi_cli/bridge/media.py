"""WS /twilio/media: Twilio Media Streams <-> Vapi's WebSocket transport, with barge-in.

One ``MediaCall`` per socket; nothing is shared between calls.

Caller -> Vapi: Twilio's base64 mu-law frames are decoded, transcoded only in ``pcm16-16k`` mode,
and sent as binary frames. Until Vapi's socket is open they wait in a bounded buffer
(``EARLY_AUDIO_FRAMES``, 10 s of audio); past it the oldest frame is dropped and counted.

Vapi -> caller: assistant audio is cut into 20 ms mu-law frames (a partial frame waits for the next
chunk: never padded mid-utterance, never dropped), queued, and paced so Twilio never holds more than
``LEAD_MS`` of it. After each frame a ``mark`` named ``<generation>:<cumulative ms>`` goes out; its
echo tells what the caller actually heard (one mark per 100 ms and at the end of what is queued).

Barge-in: on ``user-interrupted`` or ``speech-update`` (role user, started), from the transport or
from /vapi/webhook, whichever comes first, the queue is dropped, the outbound resampler reset, Twilio
gets ``clear`` and the generation moves on, so late frames and marks of the interrupted turn are
ignored. A second signal for the same interruption (the other channel) finds nothing to clear.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
import time
from typing import Any

import websockets
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import signing
from ..audio import Framer, transcoders
from ..errors import StoreError
from ..models import CallState
from .http import public_url_for

log = logging.getLogger("twivapi.bridge")

FRAME_MS = 20
MULAW_FRAME = 160                # 20 ms of mu-law at 8 kHz
LEAD_MS = 120                    # most assistant audio Twilio may hold unplayed
EARLY_AUDIO_FRAMES = 500         # 10 s of caller audio held until Vapi's socket opens
VAPI_CONNECT_TIMEOUT = 10.0
RELAY_SAMPLE_EVERY = 50          # one media.relay event per 50 frames (1 s), not one per frame
STALE_AUDIO_GAP = 0.3            # after barge-in, Vapi audio this long after the last frame is a new turn
MAX_PAYLOAD = 16_000             # bytes of audio in one Twilio media message (2 s) before we call it bad
MARK_EVERY = 5                   # a mark per 100 ms of audio: playback position to 100 ms, half the messages


def routes() -> list:
    return [WebSocketRoute("/twilio/media", media_stream)]


async def media_stream(websocket: WebSocket) -> None:
    state = websocket.app.state
    if not _handshake_ok(state.settings, websocket):
        state.recorder.count("media.handshake_refused")
        log.warning("403 /twilio/media: X-Twilio-Signature missing or invalid for the wss:// URL")
        await websocket.close(code=1008)
        return
    await websocket.accept()
    await MediaCall(state, websocket).run()


def _handshake_ok(settings, websocket: WebSocket) -> bool:
    url = public_url_for(settings, websocket.url, websocket=True)
    signature = websocket.headers.get(signing.TWILIO_SIGNATURE_HEADER)
    token = settings.twilio_auth_token.reveal()
    # Twilio's docs: try the URL with a trailing slash as well
    return any(signing.verify_twilio(token, candidate, {}, signature) for candidate in (url, url.rstrip("/") + "/"))


class MediaCall:
    def __init__(self, state: Any, twilio: WebSocket):
        self.state, self.twilio = state, twilio
        self.recorder, self.registry, self.store = state.recorder, state.registry, state.store
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self.inbound, self.outbound = transcoders(state.settings.audio_format)
        self.out_framer = Framer(MULAW_FRAME)
        self.early: collections.deque[bytes] = collections.deque()
        self.early_dropped = 0
        self.vapi: Any = None
        self.vapi_task: asyncio.Task | None = None
        self.pacer_task: asyncio.Task | None = None
        self.queue: collections.deque[bytes] = collections.deque()
        self.queue_ready = asyncio.Event()
        self.generation = 0
        self.sent_ms = 0           # assistant audio sent to Twilio in this generation
        self.played_ms = 0         # ... and confirmed played by an echoed mark
        self.play_clock: float | None = None
        self.muted_until_new_turn = False
        self.last_vapi_audio = 0.0
        self.user_stopped_at: float | None = None
        self.frames_in = self.frames_out = 0
        self.bad_messages = 0
        self.closed = False
        self.twilio_gone = False   # a send found Twilio's socket closed
        self.end_reason: str | None = None

    # --- main loop: Twilio -> us ----------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self.closed:
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
            message = json.loads(text)
            event = message["event"]
        except (ValueError, TypeError, KeyError, RecursionError):   # RecursionError: nested too deep
            return await self.bad("invalid JSON or no event")
        if not isinstance(event, str):
            return await self.bad("event is not a string")
        handler = {"connected": self.on_connected, "start": self.on_start, "media": self.on_media,
                   "mark": self.on_mark, "dtmf": self.on_dtmf, "stop": self.on_stop}.get(event)
        if handler is None:
            return await self.bad(f"unknown event {str(event)[:40]!r}")
        if event not in ("connected", "start"):
            if self.stream_sid is None:
                return await self.bad(f"{event} before start")
            if message.get("streamSid") not in (None, self.stream_sid):
                return await self.bad("streamSid does not match this stream")
        try:
            await handler(message)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:   # Overflow: int(Infinity)
            await self.bad(f"malformed {event}: {type(exc).__name__}")
        except StoreError as exc:
            await self.store_unavailable(event, exc)

    async def store_unavailable(self, event: str, exc: StoreError) -> None:
        """The store failed under a message. A call that has not started cannot (its session is
        unknown): close with 1011 and let Twilio go on to the after-stream webhook. One in progress
        keeps its audio flowing: only what this message would have recorded is lost."""
        self.recorder.count("media.store_error")
        log.warning("media %s: store unavailable during %s: %s", self.call_sid or "(no call yet)", event, exc)
        if self.stream_sid is None:
            self.end_reason, self.closed = "store-unavailable", True
            await self.twilio.close(code=1011)

    async def bad(self, reason: str) -> None:
        """Log, count and drop one bad message; the call stays up."""
        self.bad_messages += 1
        self.recorder.count("media.bad_message")
        if self.bad_messages <= 5:
            log.warning("media %s: dropped a message: %s", self.call_sid or "(no call yet)", reason)
            await self.recorder.record("media.bad-message", self.call_sid, reason=reason)

    async def on_connected(self, message: dict) -> None:
        pass

    async def on_start(self, message: dict) -> None:
        if self.stream_sid is not None:
            return await self.bad("second start")
        start = message["start"]
        params = start.get("customParameters") or {}
        call_sid = start.get("callSid") or params.get("callSid")
        stream_sid = start.get("streamSid") or message.get("streamSid")
        if not call_sid or not stream_sid:
            return await self.bad("start without callSid or streamSid")
        fmt = start.get("mediaFormat") or {}
        if fmt and (fmt.get("encoding") != "audio/x-mulaw" or int(fmt.get("sampleRate", 8000)) != 8000):
            return await self.bad(f"unsupported mediaFormat {fmt}")
        session = await self.store.get_session(call_sid)
        if session is None or session.state.terminal:
            await self.recorder.record("media.refused", call_sid, reason="no live session for this call")
            self.end_reason = "no-session"
            self.closed = True
            await self.twilio.close(code=1008)
            return
        self.call_sid, self.stream_sid = call_sid, stream_sid
        await self.store.update_session(call_sid, stream_sid=stream_sid, instance=self.state.instance)
        self.registry.listen(call_sid, self.on_signal)
        await self.recorder.record("media.start", call_sid, stream_sid=stream_sid)
        self.vapi_task = asyncio.create_task(self.connect_vapi())
        self.pacer_task = asyncio.create_task(self.pace())

    async def on_media(self, message: dict) -> None:
        media = message["media"]
        if media.get("track", "inbound") != "inbound":
            return
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            return await self.bad("media payload is not base64")
        if not payload or len(payload) > MAX_PAYLOAD:
            return await self.bad(f"media payload of {len(payload)} bytes")
        received = time.monotonic()
        frame = self.inbound.convert(payload)
        if self.vapi is None:
            if len(self.early) >= EARLY_AUDIO_FRAMES:
                self.early.popleft()
                self.early_dropped += 1
                self.recorder.count("media.early_dropped")
            self.early.append(frame)
            return
        await self.send_vapi_audio(frame, received)

    async def send_vapi_audio(self, frame: bytes, received: float) -> None:
        try:
            await self.vapi.send(frame)
        except websockets.ConnectionClosed:
            return
        self.frames_in += 1
        if self.frames_in % RELAY_SAMPLE_EVERY == 0:
            await self.recorder.record("media.relay", self.call_sid, direction="caller->vapi",
                                       ms=round((time.monotonic() - received) * 1000, 3))

    async def on_mark(self, message: dict) -> None:
        name = str(message["mark"]["name"])
        generation, _, played = name.partition(":")
        if generation != str(self.generation) or not played.isdigit():
            return  # a mark of an interrupted turn, echoed by Twilio's clear
        self.played_ms = max(self.played_ms, int(played))

    async def on_dtmf(self, message: dict) -> None:
        digit = str(message["dtmf"]["digit"])[:1]
        await self.recorder.record("media.dtmf", self.call_sid, digit=digit)
        # Vapi's transport has no DTMF frame; a documented control message carries it instead.
        await self.send_vapi_json({"type": "add-message", "triggerResponseEnabled": True,
                                   "message": {"role": "user", "content": f"The caller pressed {digit}."}})

    async def on_stop(self, message: dict) -> None:
        await self.finish("twilio-stream-stopped")

    # --- Vapi side ------------------------------------------------------------------------------
    async def connect_vapi(self) -> None:
        session = await self.registry.wait_ready(self.call_sid, VAPI_CONNECT_TIMEOUT)
        if session is None or session.state.terminal or not session.websocket_call_url:
            reason = "vapi-not-ready" if session is None or not session.state.terminal else session.ended_reason
            return await self.finish(reason or "vapi-not-ready")
        key = self.state.settings.vapi_api_key.reveal() if self.state.settings.vapi_api_key else ""
        try:
            self.vapi = await websockets.connect(session.websocket_call_url, max_size=2**20, compression=None,
                                                 additional_headers={"Authorization": f"Bearer {key}"},
                                                 open_timeout=VAPI_CONNECT_TIMEOUT)
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
            await self.recorder.record("media.vapi-connect-failed", self.call_sid, error=type(exc).__name__)
            return await self.finish("vapi-socket-failed")
        if session.state in (CallState.READY, CallState.SETTING_UP, CallState.RINGING):
            await self.registry.move(self.call_sid, CallState.ACTIVE)
        flushed = len(self.early)
        while self.early:
            await self.send_vapi_audio(self.early.popleft(), time.monotonic())
        await self.recorder.record("media.vapi-open", self.call_sid, early_frames=flushed,
                                   early_dropped=self.early_dropped)
        try:
            async for frame in self.vapi:
                if isinstance(frame, bytes):
                    await self.on_vapi_audio(frame)
                else:
                    await self.on_vapi_control(frame)
        except websockets.ConnectionClosed:
            pass
        await self.finish("vapi-socket-closed")

    async def send_vapi_json(self, message: dict) -> None:
        if self.vapi is not None:
            try:
                await self.vapi.send(json.dumps(message))
            except websockets.ConnectionClosed:
                pass

    async def on_vapi_audio(self, chunk: bytes) -> None:
        now = time.monotonic()
        if self.muted_until_new_turn:
            if now - self.last_vapi_audio < STALE_AUDIO_GAP:
                self.last_vapi_audio = now
                self.recorder.count("media.stale_dropped")
                return  # the tail of the interrupted turn
            self.muted_until_new_turn = False
        self.last_vapi_audio = now
        for frame in self.out_framer.push(self.outbound.convert(chunk)):
            self.queue.append(frame)
        self.queue_ready.set()

    async def on_vapi_control(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message.get("type")
        except (ValueError, AttributeError):
            return
        if kind == "user-interrupted" or (kind == "speech-update" and message.get("role") == "user"
                                          and message.get("status") == "started"):
            await self.interrupt(time.monotonic(), source="transport")
        elif kind == "speech-update" and message.get("role") == "user" and message.get("status") == "stopped":
            self.user_stopped_at = time.monotonic()
        elif kind == "speech-update" and message.get("role") == "assistant" and message.get("status") == "started":
            self.muted_until_new_turn = False
        elif kind == "speech-update" and message.get("role") == "assistant" and message.get("status") == "stopped":
            tail = self.out_framer.flush()
            if tail:  # end of utterance: the last partial frame is padded with silence
                self.queue.append(tail + b"\xff" * (MULAW_FRAME - len(tail)))
                self.queue_ready.set()
        elif kind == "status-update" and message.get("status") == "ended":
            await self.finish(str(message.get("endedReason") or "vapi-ended"))

    # --- barge-in and pacing --------------------------------------------------------------------
    async def on_signal(self, kind: str, data: dict) -> None:
        if kind == "interrupt":
            await self.interrupt(time.monotonic(), source=data.get("source", "webhook"))
        elif kind == "speech" and data.get("role") == "user" and data.get("status") == "stopped":
            self.user_stopped_at = time.monotonic()
        elif kind == "end":
            await self.finish(data.get("reason", "ended"))

    async def interrupt(self, signalled: float, source: str) -> None:
        if self.stream_sid is None:
            return
        playing = self.queue or self.sent_ms > self.played_ms
        self.muted_until_new_turn = True
        if not playing:
            return  # already cleared by the other channel, or the assistant was silent
        self.queue.clear()
        self.out_framer.clear()
        self.outbound.reset()
        self.generation += 1
        self.sent_ms = self.played_ms = 0
        self.play_clock = None
        await self.send_twilio({"event": "clear", "streamSid": self.stream_sid})
        ms = round((time.monotonic() - signalled) * 1000, 3)
        self.recorder.count("media.interruptions")
        await self.recorder.record("media.clear", self.call_sid, ms=ms, source=source, generation=self.generation)

    async def pace(self) -> None:
        """Send queued assistant frames so Twilio holds at most LEAD_MS of unplayed audio."""
        while not self.closed:
            if not self.queue:
                self.queue_ready.clear()
                await self.queue_ready.wait()
                continue
            now = time.monotonic()
            if self.play_clock is None or now > self.play_clock + self.sent_ms / 1000:
                self.play_clock = now - self.sent_ms / 1000  # Twilio's buffer ran dry: playback restarts now
            ahead_ms = self.sent_ms - (now - self.play_clock) * 1000
            if ahead_ms >= LEAD_MS:
                await asyncio.sleep((ahead_ms - LEAD_MS + FRAME_MS) / 1000)
                continue
            frame = self.queue.popleft()
            generation = self.generation
            await self.send_twilio({"event": "media", "streamSid": self.stream_sid,
                                    "media": {"payload": base64.b64encode(frame).decode()}})
            if generation != self.generation:
                continue  # interrupted while sending
            self.sent_ms += FRAME_MS
            self.frames_out += 1
            if self.frames_out % MARK_EVERY == 0 or not self.queue:
                await self.send_twilio({"event": "mark", "streamSid": self.stream_sid,
                                        "mark": {"name": f"{self.generation}:{self.sent_ms}"}})
            if self.user_stopped_at is not None:
                ms = round((time.monotonic() - self.user_stopped_at) * 1000, 1)
                self.user_stopped_at = None
                await self.recorder.record("media.first-audio", self.call_sid, ms=ms)

    async def send_twilio(self, message: dict) -> None:
        if self.closed or self.twilio_gone:
            return
        try:
            await self.twilio.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError):
            # Twilio closed its side. What it sent before (its last audio, a stop) is still queued
            # for run(), which reads it and then the disconnect, and ends the call: not here.
            self.twilio_gone = True

    # --- the end, once --------------------------------------------------------------------------
    async def finish(self, reason: str) -> None:
        if self.closed and self.end_reason is not None:
            return
        self.closed, self.end_reason = True, reason
        if self.call_sid:
            self.registry.unlisten(self.call_sid, self.on_signal)
        for task in (self.pacer_task,):
            if task and task is not asyncio.current_task():
                task.cancel()
        if self.vapi is not None:
            await self.send_vapi_json({"type": "end-call"})
            await self.vapi.close()
        if self.vapi_task and self.vapi_task is not asyncio.current_task():
            self.vapi_task.cancel()
        try:
            await self.twilio.close()
        except (RuntimeError, WebSocketDisconnect):
            pass  # already closed, or the caller vanished
        if self.call_sid:
            await self.recorder.record("media.stop", self.call_sid, reason=reason, frames_in=self.frames_in,
                                       frames_out=self.frames_out, bad_messages=self.bad_messages,
                                       early_dropped=self.early_dropped)
            await self.registry.end(self.call_sid, reason)
