"""Two-leg call recording (``serve --record DIR``): what the caller said and what the caller heard,
on one clock, as ``DIR/<CallSid>.wav`` with ``DIR/<CallSid>.json`` beside it.

The WAV is stereo 16-bit PCM at 8 kHz; sample 0 is the stream's ``start``.

- Left, the caller as received: each inbound frame at its Twilio ``timestamp`` (ms from the
  stream's start; a frame without one at its arrival time).
- Right, what the caller actually heard: assistant frames are held when sent to Twilio and written
  only once Twilio echoes a mark after them (its playback reached it), ending at the echo's time.
  Frames cleared at barge-in before a mark confirmed them are never written, so audio Twilio
  dropped unplayed is not in the recording (what played after the last echoed mark, at most one
  mark interval, 100 ms, is dropped with it: the recording never claims more than was heard).

Written incrementally: the samples live in a window of at most a second that is written out (and
the header's sizes patched, so the file is a valid WAV at every moment) as it fills; a crash loses
at most that second. Late audio for a part already written is patched into the file in place.
Files are created 0600. ``prune`` keeps the directory within a size and an age.

The JSON has the call's events (the event log's, as ``tail`` shows them) with ``offset_ms`` into
the audio, what was heard when (``heard``) and each clear (``cleared``); it is rewritten as events
arrive, including the late ones after the stream ends (status callback, end-of-call report).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import ulaw_to_pcm16
from ..models import Event

log = logging.getLogger("twivapi.bridge")

RATE = 8000
CHANNELS = 2
BYTES_PER_FRAME = 2 * CHANNELS          # one stereo sample
HEADER = 44
WINDOW = RATE                           # at most a second of audio is held in memory
HOLD = RATE // 4                        # ... the newest 250 ms of it stays there for audio still to be placed
PENDING_FRAMES = 500                    # 10 s sent and never confirmed (no marks echoed): the oldest go
LATE_EVENTS_S = 30.0                    # events after the stream's end still go into the JSON this long
MODE = 0o600


def wav_header(frames: int) -> bytes:
    data = frames * BYTES_PER_FRAME
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, CHANNELS, RATE, RATE * BYTES_PER_FRAME, BYTES_PER_FRAME, 16)
            + b"data" + struct.pack("<I", data))


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class CallAudio:
    """One call's recording; the media call feeds it at a few points (``caller``, ``sent``,
    ``played``, ``cleared``) and the recorder gives it the call's events (``event``)."""

    def __init__(self, directory: Path, call_sid: str, started: float | None = None):
        self.directory, self.call_sid = Path(directory), call_sid
        self.started = time.monotonic() if started is None else started   # sample 0
        self.started_at = time.time() - (time.monotonic() - self.started)  # the same moment, epoch
        self.wav_path = self.directory / f"{call_sid}.wav"
        self.json_path = self.directory / f"{call_sid}.json"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.wav_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, MODE)
        os.write(self.fd, wav_header(0))
        self.base = 0                      # samples already in the file
        self.window = np.zeros((WINDOW * 2, CHANNELS), dtype=np.int16)
        self.end = 0                       # samples placed so far (the file's length, once flushed)
        self.generation = 0
        self.pending: list[tuple[int, bytes]] = []   # (sent ms at its end, mu-law frame) not yet confirmed
        self.confirmed_ms = 0              # of the current generation
        self.right_end = 0                 # sample after the last heard frame
        self.heard: list[dict[str, Any]] = []
        self.cleared_at: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._events_changed = False

    def offset_ms(self, at: float | None = None) -> float:
        return round(((time.monotonic() if at is None else at) - self.started) * 1000, 1)

    # --- the caller (left) ----------------------------------------------------------------------
    def caller(self, payload: bytes, timestamp_ms: int | None) -> None:
        if self.closed:
            return
        at = timestamp_ms * RATE // 1000 if timestamp_ms is not None else self._now_sample()
        self._place(at, 0, ulaw_to_pcm16(payload))

    # --- the assistant (right): sent, then confirmed by an echoed mark ---------------------------
    def sent(self, generation: int, sent_ms: int, frame: bytes) -> None:
        if generation != self.generation:   # a new generation after a barge-in: what was held is gone
            self.generation, self.pending, self.confirmed_ms = generation, [], 0
        self.pending.append((sent_ms, frame))
        if len(self.pending) > PENDING_FRAMES:   # nobody echoes marks: what is held stays bounded
            del self.pending[0]

    def played(self, generation: int, played_ms: int) -> None:
        """Twilio's playback reached ``played_ms`` of ``generation``: what it confirms ends now."""
        if self.closed or generation != self.generation or played_ms <= self.confirmed_ms:
            return
        self.confirmed_ms = played_ms
        done = [frame for end, frame in self.pending if end <= played_ms]
        self.pending = [(end, frame) for end, frame in self.pending if end > played_ms]
        if not done:
            return
        pcm = ulaw_to_pcm16(b"".join(done))
        start = max(self.right_end, self._now_sample() - len(pcm) // 2)
        self._place(start, 1, pcm)
        self.right_end = start + len(pcm) // 2
        self.heard.append({"at_ms": start * 1000 / RATE, "ms": len(pcm) // 2 * 1000 // RATE,   # exact: 1/8 ms
                           "generation": generation})

    def cleared(self) -> None:
        """Barge-in: Twilio drops what it holds; the frames no mark confirmed were never heard."""
        unplayed = sum(len(frame) for _, frame in self.pending) * 1000 // RATE
        self.cleared_at.append({"at_ms": self.offset_ms(), "unplayed_ms": unplayed})
        self.pending = []

    # --- events (the JSON) ----------------------------------------------------------------------
    def event(self, event: Event) -> None:
        self.events.append({"seq": event.seq, "type": event.type,
                            "offset_ms": round((event.received_at - self.started_at) * 1000, 1),
                            "data": event.data})
        self._events_changed = True
        if self.closed:
            self.write_json()

    def write_json(self) -> None:
        meta = {"call_sid": self.call_sid, "started_at": round(self.started_at, 3), "sample_rate": RATE,
                "channels": ["caller", "heard"], "duration_ms": self.end * 1000 // RATE, "complete": self.closed,
                "wav": self.wav_path.name, "heard": self.heard, "cleared": self.cleared_at,
                "events": sorted(self.events, key=lambda e: (e["offset_ms"], e["seq"] or 0))}
        try:
            _write_private(self.json_path, json.dumps(meta, default=str, separators=(",", ":")) + "\n")
        except OSError as exc:   # a full disk loses the sidecar, never the call
            log.warning("recording %s: could not write %s: %s", self.call_sid, self.json_path.name, exc)
        self._events_changed = False

    # --- the file ---------------------------------------------------------------------------------
    def _now_sample(self) -> int:
        return max(0, int((time.monotonic() - self.started) * RATE))

    def _place(self, at: int, channel: int, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype=np.int16)
        if at < self.base:   # late for what is already in the file: patch it there
            head = min(len(samples), self.base - at)
            self._patch(at, channel, samples[:head])
            samples, at = samples[head:], self.base
            if not len(samples):
                return
        stop = at + len(samples)
        if stop - self.base > len(self.window):
            self._flush(keep=0)
            if stop - self.base > len(self.window):   # a jump ahead (a gap in the timestamps): silence
                self._grow(stop - self.base)
        self.window[at - self.base:stop - self.base, channel] = samples
        self.end = max(self.end, stop)
        if self.end - self.base >= WINDOW:
            self._flush(keep=HOLD)

    def _grow(self, size: int) -> None:
        bigger = np.zeros((size, CHANNELS), dtype=np.int16)
        bigger[:len(self.window)] = self.window
        self.window = bigger

    def _flush(self, keep: int) -> None:
        """Write out the window but its newest ``keep`` samples, and patch the header's sizes."""
        count = max(0, self.end - self.base - keep)
        if count:
            try:
                os.pwrite(self.fd, self.window[:count].tobytes(), HEADER + self.base * BYTES_PER_FRAME)
                os.pwrite(self.fd, wav_header(self.base + count), 0)
            except OSError as exc:
                log.warning("recording %s: write failed: %s", self.call_sid, exc)
            rest = self.window[count:self.end - self.base].copy()
            self.window[:] = 0
            self.window[:len(rest)] = rest
            self.base += count
        if self._events_changed:
            self.write_json()

    def _patch(self, at: int, channel: int, samples: np.ndarray) -> None:
        offset = HEADER + at * BYTES_PER_FRAME
        try:
            block = np.frombuffer(os.pread(self.fd, len(samples) * BYTES_PER_FRAME, offset), dtype=np.int16)
            block = block.reshape(-1, CHANNELS).copy()
            block[:len(samples), channel] = samples[:len(block)]
            os.pwrite(self.fd, block.tobytes(), offset)
        except OSError as exc:
            log.warning("recording %s: write failed: %s", self.call_sid, exc)

    def close(self) -> None:
        """The stream ended: the audio up to now is written out; events keep coming into the JSON
        for LATE_EVENTS_S (the caller detaches the recording from the event log then)."""
        if self.closed:
            return
        self.end = max(self.end, self._now_sample())
        self.closed = True
        self._flush(keep=0)
        os.close(self.fd)
        self.write_json()


async def fill_in(recording: CallAudio, store: Any, max_bytes: float, max_age_s: float) -> None:
    """What a new recording does off the media path (its stream is not held up by it): prune the
    directory to its bounds (in a thread) and add the call's events from before its stream."""
    await asyncio.to_thread(prune, recording.directory, max_bytes, max_age_s, keep=recording.call_sid)
    seen = {event["seq"] for event in recording.events}
    for event in await store.events(0, call_sid=recording.call_sid, limit=10_000):
        if event.seq not in seen:
            recording.event(event)
    recording.write_json()


def prune(directory: Path, max_bytes: float, max_age_s: float, now: float | None = None,
          keep: str | None = None) -> list[str]:
    """Delete recordings (a ``.wav`` and its ``.json``) older than ``max_age_s``, then the oldest
    until the rest fit in ``max_bytes`` (never ``keep``'s, the one just started); the CallSids deleted."""
    now = time.time() if now is None else now
    calls: dict[str, list[Path]] = {}
    for path in directory.glob("*.wav"):
        calls.setdefault(path.stem, []).append(path)
    for path in directory.glob("*.json"):
        calls.setdefault(path.stem, []).append(path)
    entries = []
    calls.pop(keep or "", None)
    for sid, paths in calls.items():
        try:
            stats = [p.stat() for p in paths]
        except OSError:
            continue
        entries.append((max(s.st_mtime for s in stats), sum(s.st_size for s in stats), sid, paths))
    entries.sort()
    total = sum(size for _, size, _, _ in entries)
    deleted = []
    for mtime, size, sid, paths in entries:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        for path in paths:
            path.unlink(missing_ok=True)
        total -= size
        deleted.append(sid)
    return deleted
