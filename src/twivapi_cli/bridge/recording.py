"""`twivapi fixtures record`: capture the webhooks arriving at the bridge as replayable fixtures.

An ASGI middleware in front of the bridge: for every Twilio or Vapi webhook it writes a step into
``<out>/<CallSid>.json`` (one fixture per call) with the time since the call's first request and
the status the bridge answered. The media stream's caller audio is kept beside it,
``<out>/<CallSid>.caller.wav`` (8 kHz mono, each frame at its Twilio timestamp), with the steps that
play it back in the background on the original timing (``media open``, ``media audio`` with
``background``, ``media stop``). Nothing secret is kept: signatures and auth headers are dropped
(replay signs again), secret-looking fields in bodies are removed, and the CallSid and account SID
become ``{{call_sid}}`` / ``{{account_sid}}``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audio import ulaw_to_pcm16, write_wav
from ..fixtures import TWILIO_WEBHOOKS
from .vapi_hooks import call_ids

SECRET_FIELD = re.compile(r"token|secret|signature|password|api_?key|authorization", re.I)
ROUTES = {path: kind for kind, path in TWILIO_WEBHOOKS.items()}
MEDIA_PATH = "/twilio/media"
MULAW_SILENCE = b"\xff"


def scrub(value: Any, call_sid: str | None, account_sid: str | None) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v, call_sid, account_sid) for k, v in value.items() if not SECRET_FIELD.search(k)}
    if isinstance(value, list):
        return [scrub(v, call_sid, account_sid) for v in value]
    if isinstance(value, str):
        if call_sid:
            value = value.replace(call_sid, "{{call_sid}}")
        if account_sid:
            value = value.replace(account_sid, "{{account_sid}}")
    return value


def fixture_step(path: str, body: bytes, status: int | None) -> tuple[str, dict[str, Any]] | None:
    """One webhook as a fixture step (scrubbed, without its time) and the call it belongs to, or None
    when it names no call. Raises ValueError / UnicodeDecodeError on a malformed body."""
    if path == "/vapi/webhook":
        message = json.loads(body).get("message") or {}
        call_sid, _ = call_ids(message)   # call.transport.callSid, phoneCallProviderId, our metadata
        if not call_sid:
            return None
        message = {k: v for k, v in message.items() if k not in ("phoneNumber", "assistant", "customer")}
        step: dict[str, Any] = {"vapi": scrub(message, call_sid, None)}
    elif path in ROUTES:
        params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        call_sid = params.get("CallSid")
        if not call_sid:
            return None
        step = {"twilio": ROUTES[path], "params": scrub(params, call_sid, params.get("AccountSid"))}
    else:
        return None
    if status is not None:
        step["expect"] = {"status": status}
    return call_sid, step


class RecordWebhooks:
    def __init__(self, app: ASGIApp, out: Path):
        self.app, self.out = app, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.first_seen: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket" and path == MEDIA_PATH:
            return await self.app(scope, CallerAudio(self, receive).receive, send)
        if scope["type"] != "http" or scope.get("method") != "POST" or (path not in ROUTES and path != "/vapi/webhook"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def tee() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, tee, watch)
        try:
            self.record(path, b"".join(chunks), status[0] if status else None)
        except (ValueError, UnicodeDecodeError, OSError):
            pass   # recording must never break the bridge; malformed input is not worth a fixture

    def record(self, path: str, body: bytes, status: int | None, at: float | None = None) -> None:
        found = fixture_step(path, body, status)
        if found is None:
            return
        call_sid, step = found
        now = time.monotonic() if at is None else at
        first = self.first_seen.setdefault(call_sid, now)
        step["at_ms"] = round((now - first) * 1000)
        self._append(call_sid, step)

    def _append(self, call_sid: str, step: dict) -> None:
        self._edit(call_sid, lambda steps: steps.append(step))

    def _edit(self, call_sid: str, change: Callable[[list[dict]], Any]) -> None:
        path = self.out / f"{call_sid}.json"
        fixture: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
            "name": f"recorded-{call_sid[-8:]}", "description": "recorded by twivapi fixtures record", "steps": []}
        change(fixture["steps"])
        tmp = path.with_name(path.name + ".tmp")   # a reader never sees half a file
        tmp.write_text(json.dumps(fixture, indent=2) + "\n")
        os.replace(tmp, path)

    # --- the media stream: the caller's audio --------------------------------------------------
    def stream_opened(self, call_sid: str) -> None:
        """The voice step now captures the TwiML's stream URL, and a media open step follows."""
        def change(steps: list[dict]) -> None:
            for step in steps:
                if step.get("twilio") == "voice":
                    step.setdefault("capture", {})["stream_url"] = "twiml:Connect/Stream/@url"
                    break
            now = time.monotonic()
            steps.append({"media": "open", "at_ms": round((now - self.first_seen.setdefault(call_sid, now)) * 1000)})
        self._edit(call_sid, change)

    def stream_closed(self, call_sid: str, caller: bytes) -> None:
        """The caller's audio (mu-law, by its timestamps) into ``<CallSid>.caller.wav``: played back,
        in the background, from the media open step on, then the stream is stopped."""
        name = f"{call_sid}.caller.wav"
        write_wav(self.out / name, ulaw_to_pcm16(caller))

        def change(steps: list[dict]) -> None:
            opened = next((i for i, step in enumerate(steps) if step.get("media") == "open"), None)
            if opened is None:
                return
            steps.insert(opened + 1, {"media": "audio", "file": name, "background": True,
                                      "at_ms": steps[opened]["at_ms"]})
            now = time.monotonic()
            steps.append({"media": "stop", "at_ms": round((now - self.first_seen.get(call_sid, now)) * 1000)})
        self._edit(call_sid, change)


class CallerAudio:
    """Tees one media socket's messages: its start (which call), the caller's frames placed by their
    ``timestamp`` (a gap filled with mu-law silence), its stop or disconnect."""

    def __init__(self, recorder: RecordWebhooks, receive: Receive):
        self.recorder, self._receive = recorder, receive
        self.call_sid: str | None = None
        self.audio = bytearray()

    async def receive(self) -> Message:
        message = await self._receive()
        try:
            if message["type"] == "websocket.receive" and message.get("text"):
                self.on_text(message["text"])
            elif message["type"] == "websocket.disconnect":
                self.close()
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass   # recording must never break the stream; the bridge itself answers bad input
        return message

    def on_text(self, text: str) -> None:
        data = json.loads(text)
        event = data.get("event")
        if event == "start" and self.call_sid is None:
            self.call_sid = str(data["start"]["callSid"])
            self.recorder.stream_opened(self.call_sid)
        elif event == "media" and self.call_sid is not None:
            media = data["media"]
            if media.get("track", "inbound") != "inbound":
                return
            frame = base64.b64decode(media["payload"])
            at = int(media["timestamp"]) * 8 if media.get("timestamp") is not None else len(self.audio)
            if at > len(self.audio):
                self.audio += MULAW_SILENCE * (at - len(self.audio))
            self.audio[at:at + len(frame)] = frame
        elif event == "stop":
            self.close()

    def close(self) -> None:
        if self.call_sid is not None:
            sid, self.call_sid = self.call_sid, None
            self.recorder.stream_closed(sid, bytes(self.audio))
