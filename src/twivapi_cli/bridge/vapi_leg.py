"""One call's socket to Vapi's WebSocket transport (``websocketCallUrl``): caller audio out as binary
frames, assistant audio and control messages (JSON text) in.

Caller audio (and the digits the caller presses: POST /call takes hundreds of ms, a digit pressed
meanwhile must not be lost) that arrives before the socket is open waits in a buffer of
``EARLY_AUDIO_FRAMES`` (10 s) and is flushed in order when it opens; past the bound the oldest item
is dropped and counted (``media.early_dropped``).

The socket is aiohttp's WebSocket client (``VapiSockets``: one session for the bridge): its frame
reader, writer and masking are compiled. On loopback a 160-byte frame sent and its echo received
cost ~18 µs of CPU against ~30-38 µs with the ``websockets`` client; at 50 frames a second each way
per call, the bare relay of ``benchmarks/bench_bridge.py`` costs 7.2 ms of CPU per call-second on
it against 8.2 on ``websockets`` (100 calls)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp

from ..models import EventType
from .events import Recorder

VAPI_CONNECT_TIMEOUT = 10.0
EARLY_AUDIO_FRAMES = 500         # 10 s of caller audio held until Vapi's socket opens
RELAY_SAMPLE_EVERY = 50          # one media.relay event per 50 frames (1 s), not one per frame
HEARTBEAT_S = 20.0               # a ping this often; no pong within half of it: the socket is dead
CLOSE_TIMEOUT_S = 10.0           # for Vapi's answer to our close frame
# what a send on a socket that went away raises (aiohttp: ClientConnectionResetError, a ConnectionError)
SEND_FAILED = (ConnectionError, aiohttp.ClientError)


class VapiSockets:
    """The bridge's aiohttp session for its calls' sockets to Vapi, opened on first use (in the
    event loop that serves them) and closed with the bridge."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: a socket holds its connection for the whole call, and aiohttp's default of
            # 100 would make the 101st concurrent call wait for one to end; trust_env: HTTPS_PROXY
            # and NO_PROXY as httpx (the Vapi REST client) honours them
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=True)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class VapiLeg:
    def __init__(self, recorder: Recorder, api_key: str, sockets: VapiSockets):
        self.recorder, self._api_key, self._sockets = recorder, api_key, sockets
        self.call_sid: str | None = None
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.frames_in = 0       # caller frames relayed to Vapi
        self.early: collections.deque[bytes | str] = collections.deque()   # audio frames, JSON texts
        self.early_dropped = 0
        self._last_relay_s: float | None = None   # the newest caller frame's time through the bridge

    async def open(self, url: str) -> bool:
        """Connect; False (recorded) if Vapi's socket could not be opened."""
        try:
            async with asyncio.timeout(VAPI_CONNECT_TIMEOUT):
                self.socket = await self._sockets.session().ws_connect(
                    url, headers={"Authorization": f"Bearer {self._api_key}"}, max_msg_size=2**20,
                    heartbeat=HEARTBEAT_S, timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S))
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:   # ValueError: not a ws(s) URL
            await self.recorder.record(EventType.MEDIA_VAPI_CONNECT_FAILED, self.call_sid, error=type(exc).__name__)
            return False
        return True

    async def relay(self, frame: bytes, received: float) -> None:
        """A caller frame: sent, or held until the socket opens."""
        if self.socket is not None and not self.early:   # (frames that waited go first: flush_early)
            return await self.send_audio(frame, received)
        self._hold(frame)

    def _hold(self, item: bytes | str) -> None:
        if len(self.early) >= EARLY_AUDIO_FRAMES:
            self.early.popleft()
            self.early_dropped += 1
            self.recorder.count("media.early_dropped")
        self.early.append(item)

    async def flush_early(self) -> int:
        """Send what waited for the socket, in order; how many audio frames that was."""
        flushed = 0
        while self.early:
            item = self.early.popleft()
            if isinstance(item, bytes):
                flushed += 1
                await self.send_audio(item, time.monotonic())
            else:
                await self._send_text(item)
        return flushed

    async def send_audio(self, frame: bytes, received: float) -> None:
        """Relay one caller frame (received at ``received``, monotonic); one in 50 is timed."""
        assert self.socket is not None
        try:
            await self.socket.send_bytes(frame)
        except SEND_FAILED:
            return
        self.frames_in += 1
        self._last_relay_s = time.monotonic() - received   # rounded only when read: 50 a second per call
        if self.frames_in % RELAY_SAMPLE_EVERY == 0:
            # a latency sample: the relay never waits on the disk for it (durable=False)
            await self.recorder.record(EventType.MEDIA_RELAY, self.call_sid, durable=False,
                                       direction="caller->vapi", ms=self.last_relay_ms)

    @property
    def last_relay_ms(self) -> float | None:
        """The newest caller frame's time through the bridge (parsed to sent to Vapi), in ms."""
        return None if self._last_relay_s is None else round(self._last_relay_s * 1000, 3)

    async def send_json(self, message: dict) -> None:
        if self.socket is not None:
            await self._send_text(json.dumps(message))

    async def _send_text(self, text: str) -> None:
        assert self.socket is not None
        try:
            await self.socket.send_str(text)
        except SEND_FAILED:
            pass

    async def send_dtmf(self, digit: str) -> None:
        # Vapi's transport has no DTMF frame; a documented control message carries it instead.
        message = {"type": "add-message", "triggerResponseEnabled": True,
                   "message": {"role": "user", "content": f"The caller pressed {digit}."}}
        if self.socket is None or self.early:   # pressed before Vapi's socket opened: in order, after the audio
            self._hold(json.dumps(message))
        else:
            await self.send_json(message)

    async def receive(self, on_audio: Callable[[bytes], None],
                      on_control: Callable[[str], Awaitable[None]]) -> None:
        """Until Vapi closes its socket (or it fails): audio to ``on_audio``, control messages to
        ``on_control``."""
        assert self.socket is not None
        async for message in self.socket:   # ends at a close frame or a closed connection
            if message.type is aiohttp.WSMsgType.BINARY:
                on_audio(message.data)
            elif message.type is aiohttp.WSMsgType.TEXT:
                await on_control(message.data)
            elif message.type is aiohttp.WSMsgType.ERROR:   # a protocol error, a frame over max_msg_size
                break

    async def close(self) -> None:
        if self.socket is not None and not self.socket.closed:
            await self.send_json({"type": "end-call"})
            await self.socket.close()


def control_event(text: str) -> tuple[str, str | None] | None:
    """What one of Vapi's control messages on the transport means for the media stream:
    ``("interrupt" | "caller-started" | "caller-stopped" | "assistant-started" | "assistant-stopped"
    | "ended", detail)``, or None for anything else (unknown types, bad JSON).

    Only ``user-interrupted`` is an ``interrupt``: Vapi decides what interrupts the assistant
    (``stopSpeakingPlan``: ``numWords``, ``voiceSeconds``, acknowledgement phrases such as "okay"),
    and reports speech it does not treat as one as a plain ``speech-update`` (``caller-started``);
    clearing on that too is the media stream's opt-in (``TWIVAPI_BARGE_IN=speech``)."""
    try:
        message = json.loads(text)
        kind = message.get("type")
    except (ValueError, AttributeError, RecursionError):
        return None
    role, status = message.get("role"), message.get("status")
    if kind == "user-interrupted":
        return "interrupt", None
    if kind == "speech-update" and status in ("started", "stopped") and role in ("user", "assistant"):
        return ("caller" if role == "user" else "assistant") + "-" + status, None
    if kind == "status-update" and status == "ended":
        return "ended", str(message.get("endedReason") or "vapi-ended")
    return None
