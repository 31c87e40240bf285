"""serve --record: the two-leg WAV checked sample by sample against what the simulated caller sent
and heard, its JSON of events, 0600 files, incremental writing and the directory's bounds."""

from __future__ import annotations

import json
import os
import stat
import time
import wave

import numpy as np
import pytest

from twivapi_cli import audio
from twivapi_cli.bridge.call_audio import CallAudio, prune
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore

from .polling import wait_for
from .support import VAPI_SECRET, bridge_settings, place_call, running_bridge


def read_stereo(path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    return samples[:, 0], samples[:, 1]


def pcm(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(audio.ulaw_to_pcm16(ulaw), dtype=np.int16)


def heard_channel(right: np.ndarray, meta: dict) -> np.ndarray:
    """The right channel's heard segments, joined (what the JSON says was heard, where)."""
    return np.concatenate([right[round(s["at_ms"] * 8):round(s["at_ms"] * 8) + s["ms"] * 8] for s in meta["heard"]])


def speech(ms_before: int, ms_voice: int, hz: float, ms_after: int = 0) -> bytes:
    return (audio.silence_mulaw(ms_before) + audio.pcm16_to_ulaw(audio.tone(hz, ms_voice, 8000, 0.5))
            + audio.silence_mulaw(ms_after))


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recordings")


def recorded_call(sims, record_dir, plan: CallerPlan, **script):
    assistant = sims.assistant(behavior="answer", **script)
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant, TWIVAPI_RECORD_DIR=str(record_dir))
    with running_bridge(settings, MemoryStore(), public_from_server=True) as bridge:
        sims.vapi("PATCH", f"/assistant/{assistant}", json={"server": {"url": bridge.url + "/vapi/webhook",
                                                                       "headers": {"X-Vapi-Secret": VAPI_SECRET}}})
        result = place_call(bridge.url, plan)
        # the late events (status callback, Vapi's end-of-call report) reach the JSON too
        wait_for(lambda: any(e["type"] == "vapi.report" for e in json.loads(
            (record_dir / f"{result.call_sid}.json").read_text())["events"]), "the report in the JSON", timeout=15)
    assert not result.errors, result.errors
    meta = json.loads((record_dir / f"{result.call_sid}.json").read_text())
    return result, meta, *read_stereo(record_dir / f"{result.call_sid}.wav")


def test_both_legs_sample_by_sample(sims, record_dir):
    # the caller speaks after the greeting (which starts once POST /call answered: up to ~0.7 s in,
    # later on a loaded machine), the assistant replies
    sent = speech(2000, 500, 300.0)
    # the reply ends ~3.6 s in; the hang-up at 5.5 s leaves a loaded machine's lag room to play all of it
    result, meta, left, right = recorded_call(sims, record_dir, CallerPlan(audio=sent, hangup_after_s=5.5),
                                              greeting_ms=600, reply_ms=600)
    frames = round(5.5 / 0.02)
    # left: every frame the caller sent, from sample 0 (its timestamps), then the silence it streamed
    assert np.array_equal(left[:len(sent)], pcm(sent))
    assert not left[len(sent):frames * 160].any()
    # right: exactly what the caller heard (greeting and reply), each played frame once
    assert len(result.heard) >= 8 * 1000
    assert np.array_equal(heard_channel(right, meta), pcm(bytes(result.heard)))
    outside = right.copy()
    for s in meta["heard"]:
        outside[round(s["at_ms"] * 8):round(s["at_ms"] * 8) + s["ms"] * 8] = 0
    assert not outside.any(), "audio in the right channel outside what was heard"
    # the reply came after the caller spoke, on the same clock
    reply_at = [s["at_ms"] for s in meta["heard"] if s["at_ms"] > 2000]
    assert reply_at and reply_at[0] > 2500
    for path in (record_dir / f"{result.call_sid}.wav", record_dir / f"{result.call_sid}.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    kinds = [e["type"] for e in meta["events"]]
    assert kinds.index("twilio.voice") < kinds.index("media.start") < kinds.index("media.first-audio") \
        < kinds.index("media.stop")
    offsets = {e["type"]: e["offset_ms"] for e in meta["events"]}
    assert offsets["twilio.voice"] < 0 <= offsets["media.start"] < 2000
    assert meta["complete"] and meta["duration_ms"] >= 3000


def test_audio_cleared_at_barge_in_is_not_in_the_recording(sims, record_dir):
    # talks at 2.5 s over a 6 s greeting: the greeting starts once POST /call answered (up to ~0.7 s
    # in, later on a loaded machine; at 0.8 s the speech could come before it, and nothing to clear);
    # the hang-up at 5.5 s leaves the reply room
    sent = speech(2500, 600, 300.0, ms_after=1500)
    result, meta, left, right = recorded_call(sims, record_dir, CallerPlan(audio=sent, hangup_after_s=5.5),
                                              greeting_ms=6000)
    assert len(result.clears) == 1
    assert np.array_equal(left[:len(sent)], pcm(sent))
    heard = pcm(bytes(result.heard))
    recorded = heard_channel(right, meta)
    cut = result.clear_positions[0]
    greeting = [s for s in meta["heard"] if s["generation"] == 0]
    greeting_samples = sum(s["ms"] for s in greeting) * 8
    # of the greeting: only what a mark confirmed, a prefix of what was heard, never what was cleared
    assert 0 < greeting_samples <= cut and cut - greeting_samples <= 8 * 300
    assert np.array_equal(recorded[:greeting_samples], heard[:greeting_samples])
    # the reply after the clear: every frame of it
    assert np.array_equal(recorded[greeting_samples:], heard[cut:])
    clear = meta["cleared"][0]
    assert clear["unplayed_ms"] > 0
    after = right[int(clear["at_ms"] * 8):].tobytes()
    assert audio.tone_level_db(after, 440.0, 8000) < audio.tone_level_db(after, 660.0, 8000) - 20
    clears = [e for e in meta["events"] if e["type"] == "media.clear"]
    assert len(clears) == 1 and abs(clears[0]["offset_ms"] - clear["at_ms"]) < 200


def test_written_as_it_goes_and_valid_at_every_moment(tmp_path):
    recording = CallAudio(tmp_path, "CA" + "1" * 32, started=time.monotonic() - 10)
    tone = audio.pcm16_to_ulaw(audio.tone(300.0, 3000, 8000, 0.5))
    for i in range(0, len(tone), 160):
        recording.caller(tone[i:i + 160], i // 8)
    left, _ = read_stereo(tmp_path / ("CA" + "1" * 32 + ".wav"))   # before close: what a crash would leave
    assert len(left) >= 2 * 8000 and np.array_equal(left, pcm(tone)[:len(left)])
    recording.close()
    left, right = read_stereo(tmp_path / ("CA" + "1" * 32 + ".wav"))
    assert np.array_equal(left[:len(tone)], pcm(tone)) and not right.any()


def test_prune_keeps_the_directory_within_its_bounds(tmp_path):
    now = time.time()
    for i, (age_days, size) in enumerate([(10, 100), (3, 400), (2, 400), (1, 400)]):
        for ext in ("wav", "json"):
            path = tmp_path / f"CA{i}.{ext}"
            path.write_bytes(b"x" * (size // 2))
            os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    assert prune(tmp_path, max_bytes=900, max_age_s=7 * 86400, now=now) == ["CA0", "CA1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CA2.json", "CA2.wav", "CA3.json", "CA3.wav"]
