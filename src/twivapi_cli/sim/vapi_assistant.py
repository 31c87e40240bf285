"""The simulated assistant behind each simulated Vapi call.

On the WebSocket transport (``/call/{id}/transport``) it behaves like Vapi's: caller audio arrives
as binary frames in the negotiated format (mu-law 8 kHz or PCM16 16 kHz), the assistant "speaks" as
binary frames paced in real time (or faster), and control messages go out as bare JSON text frames
(``status-update``, ``speech-update``, ``transcript``, ``user-interrupted``, ``model-output``).
An energy VAD on the caller's audio drives turn taking: speech over the assistant interrupts it once
it lasts as long as the assistant's ``stopSpeakingPlan`` asks (``numWords`` at 400 ms a word, else
``voiceSeconds``; no plan: at once). Shorter speech is a backchannel ("uh-huh"): a ``speech-update``
and a transcript, no ``user-interrupted``, and the assistant talks on.
The same events are posted to the call's server URL as server messages (``{"message": ...}``), plus
``conversation-update`` after each line of the conversation, ``tool-calls`` (when the assistant has
tools; the reply is checked) and, at the end, ``end-of-call-report`` with per-turn latency: only the
types the assistant's ``serverMessages`` lists (Vapi's default list without one), authenticated as
the call's ``server`` says (``vapi_transport.ServerPoster``). ``speech-update.turn`` is zero-based.

Call control: the assistant's ``transferCall`` and ``endCall`` tools (``model.tools``), chosen by
what the caller says, the way replies are: an utterance at ``TRANSFER_HZ`` is "transfer me", one at
``GOODBYE_HZ`` is "goodbye" (other speech is ordinary; the tones stand in for words). A transfer
speaks the destination's message, then goes to the tool's first destination, or, with none, asks the
server (``transfer-destination-request``; an ``error`` answer is spoken and the call goes on).
``endCall`` speaks a goodbye. With ``phone-call-control`` in the assistant's ``serverMessages`` Vapi
leaves both to the server, as on a call it does not own (stream mode): the simulator posts
``phone-call-control`` (``request`` ``forward`` with the ``destination``, or ``hang-up``) and waits
for the server to end the call (``endedReason`` ``assistant-forwarded-call`` /
``assistant-ended-call``). Without it, ``endCall`` closes the socket itself, and a transfer, which
a ``vapi.websocket`` call has no phone line for, is reported (``transfer-update``) and goes nowhere.

Behaviours (``assistant.metadata.simulator.behavior``): ``answer`` (default: a greeting tone, then a
reply tone after each caller utterance) or ``echo`` (sends back exactly what it heard, for bit-exact
tests).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.websockets import WebSocketDisconnect

from .. import audio

log = logging.getLogger("twivapi.sim")

FRAME_MS = 20
VAD_THRESHOLD_DBFS = -40.0
VAD_START_FRAMES = 3      # 60 ms of speech starts a user turn
VAD_STOP_FRAMES = 15      # 300 ms of silence ends it
# endedReason values this simulator reports, each one of the spec's Call.endedReason enum (tests check)
CUSTOMER_ENDED = "customer-ended-call"                          # the caller's side closed the transport
WORKER_DIED = "call.in-progress.error-vapifault-worker-died"    # fault injection: Vapi's socket drops mid-call
MANUALLY_CANCELED = "manually-canceled"                         # Live Call Control's end-call
WORD_MS = 400             # stopSpeakingPlan.numWords: a word is 400 ms of speech (150 words a minute)
DEFAULT_VOICE_SECONDS = 0.2   # the spec's stopSpeakingPlan.voiceSeconds default
FORWARDED = "assistant-forwarded-call"       # a transfer the server carried out (phone-call-control)
ASSISTANT_ENDED = "assistant-ended-call"     # the endCall tool
# what the caller "says": the tone of an utterance stands for a word (the assistant's own are 440/660 Hz)
TRANSFER_HZ = 500.0
GOODBYE_HZ = 800.0
SPEECH_HZ = 300.0        # anything else the simulated caller says (demo and tests speak at 300 Hz)
CONTROL_MESSAGE_MS = 600  # "Transferring you now" / "Goodbye"


@dataclass
class Script:
    behavior: str = "answer"
    greeting_ms: int = 1200
    reply_ms: int = 800
    model_latency_ms: int = 150
    greeting_hz: float = 440.0
    reply_hz: float = 660.0
    speed: float = 1.0          # >1 speaks faster than real time
    tools: list[str] = field(default_factory=list)
    # stopSpeakingPlan (the assistant's, or metadata.simulator's num_words / voice_seconds): how long the
    # caller must talk over the assistant before Vapi treats it as an interruption. Neither set (no plan):
    # at once, when the VAD starts a user turn.
    num_words: int | None = None
    voice_seconds: float | None = None
    transfer: dict[str, Any] | None = None   # the transferCall tool, if the assistant has one
    end_call: bool = False                   # whether it has the endCall tool

    @classmethod
    def from_assistant(cls, assistant: dict[str, Any] | None) -> Script:
        assistant = assistant or {}
        options = ((assistant.get("metadata") or {}).get("simulator") or {})
        tools = [t.get("function", {}).get("name") for t in (assistant.get("model") or {}).get("tools", [])
                 if isinstance(t, dict) and t.get("function", {}).get("name")]
        plan = assistant.get("stopSpeakingPlan") if isinstance(assistant.get("stopSpeakingPlan"), dict) else None
        stop: dict[str, Any] = {}
        if plan is not None:
            stop = {"num_words": plan.get("numWords", 0), "voice_seconds": plan.get("voiceSeconds",
                                                                                    DEFAULT_VOICE_SECONDS)}
        listed = [t for t in (assistant.get("model") or {}).get("tools", []) if isinstance(t, dict)]
        transfer = next((t for t in listed if t.get("type") == "transferCall"), None)
        end_call = any(t.get("type") == "endCall" for t in listed)
        known = {k: v for k, v in options.items()
                 if k in cls.__dataclass_fields__ and k not in ("tools", "transfer", "end_call")}
        return cls(tools=tools, transfer=transfer, end_call=end_call, **{**stop, **known})

    @property
    def interrupt_after_frames(self) -> int:
        """Voiced frames of the caller, talking over the assistant, that make an interruption
        (``numWords`` words, or ``voiceSeconds`` when ``numWords`` is 0); 0: at once."""
        if self.num_words:
            return -(-self.num_words * WORD_MS // FRAME_MS)
        if self.voice_seconds is None:
            return 0
        return max(0, round(self.voice_seconds * 1000 / FRAME_MS))


Poster = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]   # a server message -> the server's reply


class AssistantSocket(Protocol):
    """What the assistant needs of its socket: starlette's ``WebSocket`` or ``TwilioStreamAdapter``."""

    async def accept(self) -> None: ...
    async def receive(self) -> MutableMapping[str, Any]: ...
    async def send_text(self, data: str, /) -> None: ...
    async def send_bytes(self, data: bytes, /) -> None: ...
    async def close(self, code: int = 1000) -> None: ...


class FormatCodec:
    """Caller audio in / assistant audio out in the call's negotiated format."""

    def __init__(self, audio_format: dict[str, Any] | None):
        fmt = audio_format or {}
        self.mulaw = fmt.get("format", "pcm_s16le") == "mulaw"
        self.rate = int(fmt.get("sampleRate") or (8000 if self.mulaw else 16000))
        self.frame_bytes = self.rate * FRAME_MS // 1000 * (1 if self.mulaw else 2)

    def to_pcm(self, frame: bytes) -> bytes:
        return audio.ulaw_to_pcm16(frame) if self.mulaw else frame

    def tone_frames(self, hz: float, ms: int) -> list[bytes]:
        pcm = audio.tone(hz, ms, rate=self.rate, amplitude=0.3)
        data = audio.pcm16_to_ulaw(pcm) if self.mulaw else pcm
        return [data[i:i + self.frame_bytes] for i in range(0, len(data), self.frame_bytes)]


class SimulatedAssistant:
    def __init__(self, call: dict[str, Any], post: Poster | None, script: Script, *,
                 drop_after_frames: int | None = None, audio_format: dict[str, Any] | None = None):
        self.call, self.post, self.script = call, post, script
        self.drop_after_frames = drop_after_frames   # fault injection: the socket dies mid-call
        # the socket's format: the vapi.websocket transport's audioFormat, or given (Twilio's stream: mu-law)
        self.codec = FormatCodec(audio_format or (call.get("transport") or {}).get("audioFormat"))
        self.ws: AssistantSocket | None = None
        self.speaking: asyncio.Task[None] | None = None
        self.turn = 0              # speech-update.turn: zero-based, the assistant turn now (or last) spoken
        self.turns = 0             # assistant turns started so far
        self.turn_id = uuid.uuid4().hex[:12]
        self.voiced = self.silent = 0
        self.user_talking = False
        self.over_assistant = False    # this user turn started while the assistant was speaking...
        self.barged = False            # ... and became an interruption (else: a backchannel)
        self.user_stopped_at: float | None = None
        self.user_started_at: float | None = None
        self.transcript: list[dict[str, Any]] = []
        self.latencies: list[dict[str, Any]] = []
        self.interruptions = 0
        self.heard = bytearray()       # everything the caller sent, in the call's format
        self.sent = bytearray()        # everything the assistant spoke
        self.socket_messages: list[dict[str, Any]] = []   # control messages sent on the transport socket
        self.started = time.time()
        self.ended_reason = CUSTOMER_ENDED
        self.handed_over: str | None = None   # phone-call-control sent: the endedReason, whoever closes
        self.utterance = bytearray()          # the caller's audio of the current user turn (PCM16)
        self.closed = False

    # --- transport ------------------------------------------------------------------------------
    @property
    def socket(self) -> AssistantSocket:
        """The transport socket; before ``run`` it is not connected (RuntimeError, as starlette's)."""
        if self.ws is None:
            raise RuntimeError("the assistant's socket is not connected yet")
        return self.ws

    async def run(self, websocket: AssistantSocket) -> None:
        self.ws = websocket
        await websocket.accept()
        self.call["status"] = "in-progress"
        await self.emit({"type": "status-update", "status": "in-progress"})
        if self.script.behavior == "answer":
            self.speak(self.script.greeting_hz, self.script.greeting_ms, first=True)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    await self.on_audio(message["bytes"])
                elif message.get("text") is not None and await self.on_control(message["text"]):
                    break
        except WebSocketDisconnect:
            pass
        finally:
            await self.end()

    async def send_json(self, message: dict[str, Any]) -> None:
        self.socket_messages.append(message)
        try:
            await self.socket.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError):
            pass

    async def emit(self, message: dict[str, Any], *, server: bool = True) -> None:
        """Send a control message on the socket and, as a server message, to the server URL."""
        await self.send_json(message)
        if server and self.post is not None:
            asyncio.create_task(self.post(self.envelope(message)))

    def envelope(self, message: dict[str, Any]) -> dict[str, Any]:
        return {**message, "timestamp": int(time.time() * 1000), "call": self.call_summary()}

    def call_summary(self) -> dict[str, Any]:
        keys = ("id", "orgId", "type", "status", "assistantId", "assistantOverrides", "name", "createdAt",
                "updatedAt", "monitor", "phoneCallProvider", "phoneCallProviderId", "customer", "transport")
        return {k: self.call[k] for k in keys if k in self.call}

    async def on_control(self, text: str) -> bool:
        try:
            message = json.loads(text)
        except ValueError:
            return False
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in ("end-call", "hangup"):
            self.ended_reason = CUSTOMER_ENDED
            return True
        if kind == "add-message":
            content = (message.get("message") or {}).get("content", "")
            self.say_line("user", str(content), time.time())
            await self.conversation_update()
            if message.get("triggerResponseEnabled") and self.script.behavior == "answer":
                self.speak(self.script.reply_hz, self.script.reply_ms)
        elif kind == "say":
            self.speak(self.script.reply_hz, self.script.reply_ms)
        return False

    async def conversation_update(self) -> None:
        """``conversation-update``: the conversation so far, after each line of it (``messages`` in
        the artifact's shape, ``messagesOpenAIFormatted`` as OpenAI's chat messages)."""
        openai = [{"role": "assistant" if line["role"] == "bot" else line["role"], "content": line["message"]}
                  for line in self.transcript]
        await self.emit({"type": "conversation-update", "messages": list(self.transcript),
                         "messagesOpenAIFormatted": openai})

    def say_line(self, role: str, text: str, started: float, ended: float | None = None) -> None:
        """A transcript entry shaped like Vapi's artifact messages (role, message, times)."""
        ended = ended or time.time()
        self.transcript.append({"role": role, "message": text, "time": round(started * 1000),
                                "endTime": round(ended * 1000), "duration": round((ended - started) * 1000),
                                "secondsFromStart": round(started - self.started, 3)})

    # --- listening (energy VAD) -----------------------------------------------------------------
    async def on_audio(self, frame: bytes) -> None:
        self.heard += frame
        if self.drop_after_frames is not None and len(self.heard) >= self.drop_after_frames * len(frame):
            self.ended_reason = WORKER_DIED
            try:
                await self.socket.close(code=1011)
            except (RuntimeError, WebSocketDisconnect):
                pass
            return
        if self.script.behavior == "echo":
            await self._send_audio(frame)
            return
        pcm = self.codec.to_pcm(frame)
        loud = audio.rms_dbfs(pcm) > VAD_THRESHOLD_DBFS
        if self.user_talking or loud:
            self.utterance += pcm
        self.voiced, self.silent = (self.voiced + 1, 0) if loud else (0, self.silent + 1)
        if not self.user_talking and self.voiced >= VAD_START_FRAMES:
            await self.user_started()
        elif self.user_talking and self.silent >= VAD_STOP_FRAMES:
            await self.user_stopped()
        elif self.user_talking and self.over_assistant and not self.barged \
                and self.voiced >= self.script.interrupt_after_frames:
            await self.interrupt_assistant()

    @property
    def assistant_speaking(self) -> bool:
        return self.speaking is not None and not self.speaking.done()

    async def user_started(self) -> None:
        self.user_talking = True
        self.user_started_at = time.time()
        self.over_assistant, self.barged = self.assistant_speaking, False
        if self.over_assistant and self.voiced >= self.script.interrupt_after_frames:
            await self.interrupt_assistant()
        await self.emit({"type": "speech-update", "status": "started", "role": "user", "turn": self.turn})

    async def interrupt_assistant(self) -> None:
        """The caller has talked over the assistant long enough (``stopSpeakingPlan``): it stops."""
        self.barged = True
        if not self.assistant_speaking:
            return
        assert self.speaking is not None
        self.speaking.cancel()
        self.interruptions += 1
        await self.emit({"type": "user-interrupted", "turnId": self.turn_id})
        await self.emit({"type": "speech-update", "status": "stopped", "role": "assistant", "turn": self.turn})

    async def user_stopped(self) -> None:
        self.user_talking = False
        backchannel = self.over_assistant and not self.barged and self.assistant_speaking
        if not backchannel:
            self.user_stopped_at = time.monotonic()
        await self.emit({"type": "speech-update", "status": "stopped", "role": "user", "turn": self.turn})
        text = "uh-huh" if backchannel else f"(simulated caller utterance {len(self.transcript) + 1})"
        self.say_line("user", text, self.user_started_at or time.time())
        await self.emit({"type": "transcript", "role": "user", "transcriptType": "final", "transcript": text})
        await self.conversation_update()
        word, self.utterance = self.heard_word(), bytearray()
        if backchannel:   # not an interruption (too short for stopSpeakingPlan): the assistant talks on
            return
        if word == "transfer" and self.script.transfer is not None:
            return await self.transfer_call()
        if word == "goodbye" and self.script.end_call:
            return await self.end_call()
        if self.script.tools and self.post is not None:
            await self.call_tool(self.script.tools[0])
        self.speak(self.script.reply_hz, self.script.reply_ms, delay_ms=self.script.model_latency_ms)

    async def call_tool(self, name: str) -> None:
        if self.post is None:   # no server URL: nobody to ask
            return
        tool_call = {"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
                     # the spec's ToolCall carries arguments as a JSON string
                     "function": {"name": name, "arguments": json.dumps({"order_id": "A1"})}}
        message = self.envelope({"type": "tool-calls", "toolCallList": [tool_call],
                                 "toolWithToolCallList": [{"type": "function", "function": {"name": name},
                                                           "toolCall": tool_call}]})
        reply = await self.post(message)
        results = (reply or {}).get("results") if isinstance(reply, dict) else None
        self.call.setdefault("toolResults", []).append(results)

    # --- call control (transferCall, endCall) ----------------------------------------------------
    def heard_word(self) -> str | None:
        """What the caller's last utterance "said": the tone it was spoken at (``TRANSFER_HZ``,
        ``GOODBYE_HZ``, else ordinary speech)."""
        if len(self.utterance) < 2 * self.codec.rate // 10:   # under 100 ms: nothing to tell
            return None
        pcm = bytes(self.utterance)
        levels = {word: audio.tone_level_db(pcm, hz, self.codec.rate)
                  for word, hz in (("transfer", TRANSFER_HZ), ("goodbye", GOODBYE_HZ), (None, SPEECH_HZ))}
        return max(levels, key=lambda w: levels[w])

    @property
    def delegates_control(self) -> bool:
        """``phone-call-control`` in the assistant's serverMessages: the server transfers and hangs up."""
        return "phone-call-control" in (getattr(self.post, "messages", None) or ())

    async def transfer_call(self) -> None:
        destination = next(iter((self.script.transfer or {}).get("destinations") or []), None)
        if destination is None and self.post is not None:
            reply = await self.post(self.envelope({"type": "transfer-destination-request"}))
            destination = reply.get("destination") if isinstance(reply, dict) else None
            if not isinstance(destination, dict) or not destination:
                error = reply.get("error") if isinstance(reply, dict) else None
                self.say_line("bot", str(error or "I could not transfer you."), time.time())
                self.speak(self.script.reply_hz, self.script.reply_ms)
                return
        if not isinstance(destination, dict):
            return
        await self.say_and_wait(str(destination.get("message") or "Transferring the call now"))
        if not self.delegates_control:
            await self.emit({"type": "transfer-update", "destination": destination})
            return
        self.handed_over = FORWARDED
        await self.post_control({"type": "phone-call-control", "request": "forward", "destination": destination})

    async def end_call(self) -> None:
        await self.say_and_wait("Goodbye")
        if not self.delegates_control:
            return await self.hang_up(ASSISTANT_ENDED)
        self.handed_over = ASSISTANT_ENDED
        await self.post_control({"type": "phone-call-control", "request": "hang-up"})

    async def say_and_wait(self, text: str) -> None:
        self.speak(self.script.reply_hz, CONTROL_MESSAGE_MS)
        self.say_line("bot", text, time.time())
        if self.speaking is not None:
            await asyncio.wait({self.speaking})   # spoken out (or cut short by the caller)

    async def post_control(self, message: dict[str, Any]) -> None:
        """A server message only (not a client message: no copy on the transport socket)."""
        if self.post is not None:
            await self.post(self.envelope(message))

    # --- speaking -------------------------------------------------------------------------------
    def speak(self, hz: float, ms: int, *, first: bool = False, delay_ms: int = 0) -> None:
        if self.speaking and not self.speaking.done():
            self.speaking.cancel()
        self.speaking = asyncio.create_task(self._speak(hz, ms, first, delay_ms))

    async def _speak(self, hz: float, ms: int, first: bool, delay_ms: int) -> None:
        await asyncio.sleep(delay_ms / 1000 / self.script.speed)
        self.turn, self.turns = self.turns, self.turns + 1
        self.turn_id = uuid.uuid4().hex[:12]
        await self.emit({"type": "speech-update", "status": "started", "role": "assistant", "turn": self.turn})
        # the spec types `output` as an object ("a token or tool call"); the shape inside is ours
        await self.emit({"type": "model-output", "output": {"text": "Hello" if first else "Sure"},
                         "turnId": self.turn_id})   # to the server only if serverMessages lists it
        if self.user_stopped_at is not None:
            self.latencies.append(self.turn_latency(time.monotonic() - self.user_stopped_at))
            self.user_stopped_at = None
        started, wall = time.monotonic(), time.time()
        for i, frame in enumerate(self.codec.tone_frames(hz, ms)):
            await self._send_audio(frame)
            target = started + (i + 1) * FRAME_MS / 1000 / self.script.speed
            await asyncio.sleep(max(0.0, target - time.monotonic()))
        self.say_line("bot", "Hello" if first else "Sure", wall)
        await self.emit({"type": "speech-update", "status": "stopped", "role": "assistant", "turn": self.turn})
        await self.conversation_update()

    async def _send_audio(self, frame: bytes) -> None:
        self.sent += frame
        try:
            await self.socket.send_bytes(frame)
        except (WebSocketDisconnect, RuntimeError):
            pass

    # --- the end --------------------------------------------------------------------------------
    async def hang_up(self, reason: str) -> None:
        """Live Call Control's end-call: close the socket; ``run`` then reports the end."""
        self.ended_reason = reason
        try:
            await self.socket.close()
        except (RuntimeError, WebSocketDisconnect):
            pass

    async def end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ended_reason = self.handed_over or self.ended_reason   # the server did what was handed over
        if self.speaking:
            self.speaking.cancel()
        self.call["status"] = "ended"
        self.call["endedReason"] = self.ended_reason
        self.call["endedAt"] = _iso(time.time())
        status = {"type": "status-update", "status": "ended", "endedReason": self.ended_reason}
        await self.send_json(status)
        if self.post is None:
            return
        await self.post(self.envelope(status))
        await self.post(self.envelope(self.report()))

    def turn_latency(self, since_stopped: float) -> dict[str, int]:
        """One ``PerformanceMetrics.turnLatencies`` item (ms): the VAD waited ``VAD_STOP_FRAMES`` of
        silence (endpointing), transcription is instant here, the model takes ``model_latency_ms`` and
        the voice what is left of the time from the decision to the first audio; the turn is all of it."""
        endpointing = VAD_STOP_FRAMES * FRAME_MS
        measured = round(since_stopped * 1000)
        model = min(self.script.model_latency_ms, measured)
        return {"transcriberLatency": 0, "endpointingLatency": endpointing, "modelLatency": model,
                "voiceLatency": measured - model, "turnLatency": endpointing + measured}

    def report(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {"turnLatencies": self.latencies, "numUserInterrupted": self.interruptions,
                                   "numAssistantInterrupted": 0}
        for part in ("model", "voice", "transcriber", "endpointing", "turn"):
            values = [t[f"{part}Latency"] for t in self.latencies]
            metrics[f"{part}LatencyAverage"] = round(sum(values) / len(values), 1) if values else 0
        text = " ".join(f"{'AI' if t['role'] == 'bot' else 'User'}: {t['message']}" for t in self.transcript)
        return {"type": "end-of-call-report", "endedReason": self.ended_reason,
                "startedAt": _iso(self.started), "endedAt": _iso(time.time()), "cost": 0,
                "artifact": {"transcript": text, "messages": self.transcript, "performanceMetrics": metrics},
                "analysis": {"summary": f"Simulated call with {len(self.transcript)} turns."}}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")
