"""Assistant audio on its way to the caller: framing, the queue, pacing, marks and barge-in.

Vapi's audio is cut into 20 ms mu-law frames (a partial frame waits for the next chunk: never padded
mid-utterance, never dropped; at the end of an utterance it is padded with silence), queued, and
paced so Twilio never holds more than ``LEAD_MS`` of it unplayed. A ``mark`` named
``<generation>:<ms sent>`` follows the end of what was queued, once no more audio has come for a
frame's time (a source at real time empties the queue after every frame: that is not a mark each);
its echo tells when the caller has heard it all. While a recording taps the call (``serve
--record``), a mark also follows every ``MARK_EVERY`` frames: the recording keeps only what Twilio
confirmed played, so it needs the position to 100 ms. Nothing else reads the position between ends,
and every mark costs two messages (ours and Twilio's echo).

An interruption drops the queue, resets the outbound resampler and moves the generation on, so the
marks and late frames of the interrupted turn are ignored; until Vapi's next turn starts (or a gap
of ``STALE_AUDIO_GAP`` in its audio), what it still sends of the old turn is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from .. import twilio_media
from ..audio import Framer

FRAME_MS = 20
MULAW_FRAME = 160                # 20 ms of mu-law at 8 kHz
MULAW_SILENCE = b"\xff"
LEAD_MS = 120                    # most assistant audio Twilio may hold unplayed
STALE_AUDIO_GAP = 0.3            # after barge-in, Vapi audio this long after the last frame is a new turn
MARK_EVERY = 5                   # while recording, a mark per 100 ms of audio: the position to 100 ms
MARK_AFTER_QUIET_S = FRAME_MS / 1000   # the queue empty this long: what was sent is the end, marked
PLAY_OUT_S = 1.5                 # at most this long, when a call ends, for what is queued to reach the caller
TWILIO_ENDS = "twilio-"          # end reasons meaning the caller's side is gone: nothing left to play to

SendText = Callable[[str], Awaitable[None]]


class Converter(Protocol):
    """audio.py's per-call converters (Vapi's format -> mu-law): stateful, resettable at barge-in."""
    def convert(self, data: bytes) -> bytes: ...
    def reset(self) -> None: ...


class Outbound:
    """One call's assistant audio: ``push`` chunks in, ``pace`` sends them to Twilio."""

    _playing_out = False   # an end is waiting for the queued audio to be played (``play_out``)
    _caller_left = False   # ... and the caller's side went away meanwhile: stop waiting

    def __init__(self, converter: Converter, send: SendText):
        self.converter, self.send = converter, send   # converter: Vapi's format -> mu-law (audio.py)
        self.stream_sid: str | None = None
        self.framer = Framer(MULAW_FRAME)
        self.queue: collections.deque[bytes] = collections.deque()
        self.ready = asyncio.Event()
        self.generation = 0
        self.sent_ms = 0           # audio sent to Twilio in this generation
        self.played_ms = 0         # ... and confirmed played by an echoed mark
        self.frames_out = 0
        self.muted = False         # dropping the rest of an interrupted turn
        self.unmarked = False      # frames went out since the last mark
        self._play_clock: float | None = None
        self._last_audio = 0.0
        self.speech_ended_at: float | None = None   # the caller stopped speaking: first audio is timed from it
        self.on_first_audio: Callable[[float], Awaitable[None]] | None = None
        self.tap: Callable[[int, int, bytes], None] | None = None   # (generation, sent ms, frame): a recording

    @property
    def playing(self) -> bool:
        return bool(self.queue) or self.sent_ms > self.played_ms

    # --- from Vapi ------------------------------------------------------------------------------------
    def push(self, chunk: bytes) -> bool:
        """Queue a chunk of assistant audio; False if it was the stale tail of an interrupted turn."""
        now = time.monotonic()
        if self.muted:
            if now - self._last_audio < STALE_AUDIO_GAP:
                self._last_audio = now
                return False
            self.muted = False
        self._last_audio = now
        self.queue.extend(self.framer.push(self.converter.convert(chunk)))
        self.ready.set()
        return True

    def end_of_utterance(self) -> None:
        tail = self.framer.flush()
        if tail:  # the last partial frame is padded with silence
            self.queue.append(tail + MULAW_SILENCE * (MULAW_FRAME - len(tail)))
            self.ready.set()

    def new_turn(self) -> None:
        self.muted = False

    # --- from Twilio ---------------------------------------------------------------------------------
    def played(self, mark_name: str) -> None:
        generation, _, played = mark_name.partition(":")
        if generation == str(self.generation) and played.isdigit():   # else: an interrupted turn's
            self.played_ms = max(self.played_ms, int(played))

    # --- barge-in ------------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Drop what is queued and move the generation on; True if anything was playing (then send
        ``clear``). The rest of the interrupted turn is muted either way."""
        was_playing = self.playing
        self.muted = True
        if not was_playing:
            return False  # already cleared by the other channel, or the assistant was silent
        self.queue.clear()
        self.framer.clear()
        self.converter.reset()
        self.generation += 1
        self.sent_ms = self.played_ms = 0
        self._play_clock = None
        self.unmarked = False   # what was sent is cleared: nothing to mark
        return True

    # --- pacing --------------------------------------------------------------------------------------
    async def pace(self) -> None:
        """Send queued frames so Twilio holds at most LEAD_MS of unplayed audio; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.ready.clear()
                if self.unmarked:   # the end of what was sent: marked unless audio follows within a frame
                    timer = loop.call_later(MARK_AFTER_QUIET_S, self.ready.set)
                    try:
                        await self.ready.wait()
                    finally:
                        timer.cancel()
                    if not self.queue and self.unmarked:
                        await self._mark()
                    continue
                await self.ready.wait()
                continue
            now = time.monotonic()
            if self._play_clock is None or now > self._play_clock + self.sent_ms / 1000:
                self._play_clock = now - self.sent_ms / 1000  # Twilio's buffer ran dry: playback restarts now
            ahead_ms = self.sent_ms - (now - self._play_clock) * 1000
            if ahead_ms >= LEAD_MS:
                await asyncio.sleep((ahead_ms - LEAD_MS + FRAME_MS) / 1000)
                continue
            await self._send_frame(self.queue.popleft())

    async def _send_frame(self, frame: bytes) -> None:
        generation = self.generation
        await self.send(twilio_media.media_frame(self.stream_sid, frame))
        if generation != self.generation:
            return  # interrupted while sending
        self.sent_ms += FRAME_MS
        self.frames_out += 1
        self.unmarked = True
        if self.tap is not None:
            self.tap(generation, self.sent_ms, frame)
            if self.frames_out % MARK_EVERY == 0:   # the recording's playback position
                await self._mark()
        if self.speech_ended_at is not None and self.on_first_audio is not None:
            ended, self.speech_ended_at = self.speech_ended_at, None
            await self.on_first_audio(ended)

    async def _mark(self) -> None:
        self.unmarked = False
        await self.send(twilio_media.serialize(twilio_media.Mark(self.stream_sid, f"{self.generation}:{self.sent_ms}")))

    # --- the end: what is queued is still heard -----------------------------------------------------
    def playing_out(self, reason: str) -> bool:
        """Whether an end is already playing out the queue; an end of Twilio's (the caller left)
        stops that wait, since nobody is listening any more."""
        if self._playing_out and reason.startswith(TWILIO_ENDS):
            self._caller_left = True
        return self._playing_out

    async def play_out(self, reason: str, gone: Callable[[], bool], timeout: float = PLAY_OUT_S) -> bool:
        """Before a call ends for ``reason``: unless Twilio ended it, let the pacer send what is queued
        now (the end of a goodbye Vapi sent before ending the call) and wait until Twilio's echoed
        marks say it was played, at most ``timeout`` seconds, or until ``gone()`` (Twilio's socket
        closed), a barge-in or an end of Twilio's. Audio arriving meanwhile is not waited for. True
        when everything queued was played."""
        if reason.startswith(TWILIO_ENDS):
            return False
        self.end_of_utterance()   # the last partial frame too, padded
        generation, target = self.generation, self.sent_ms + FRAME_MS * len(self.queue)
        if self.played_ms >= target:
            return True
        self._playing_out = True
        deadline = time.monotonic() + timeout

        def waiting() -> bool:
            return self.generation == generation and self.played_ms < target
        while waiting() and not (gone() or self._caller_left) and time.monotonic() < deadline:
            await asyncio.sleep(FRAME_MS / 1000)
        return self.generation == generation and self.played_ms >= target
