"""`fixtures record` keeps the caller's audio beside the webhooks; `replay` plays it back on the
original timing: a real call, recorded through the bridge, replayed against it, echoed back."""

from __future__ import annotations

import asyncio
import contextlib
import time

from twivapi_cli import audio
from twivapi_cli import fixtures as fx
from twivapi_cli.bridge.app import create_app
from twivapi_cli.bridge.recording import RecordWebhooks
from twivapi_cli.bridge.server import bind, start_in_thread
from twivapi_cli.replay import Credentials, Runner
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.vapi_api import VapiClient

from .polling import wait_for
from .support import TOKEN, VAPI_SECRET, bridge_settings, cluster_for, place_call


@contextlib.contextmanager
def recording_bridge(sims, out):
    """A bridge with `fixtures record`'s middleware in front, on real uvicorn (its URL is public)."""
    sock = bind()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(behavior="echo"), TWIVAPI_PUBLIC_URL=url)
    store = MemoryStore()
    app = create_app(settings, store, cluster_for(store), VapiClient(settings.vapi_base_url, "test-vapi-key"))
    app.add_middleware(RecordWebhooks, out=out)
    server = start_in_thread(app, sock=sock)
    try:
        yield url
    finally:
        server.stop()


def test_a_recorded_call_replays_with_its_audio_on_the_original_timing(sims, tmp_path):
    spoken = (audio.silence_mulaw(300) + audio.pcm16_to_ulaw(audio.tone(437.0, 700, 8000, 0.5))
              + audio.silence_mulaw(200))
    with recording_bridge(sims, tmp_path) as url:
        result = place_call(url, CallerPlan(audio=spoken, hangup_after_s=1.6))
        assert not result.errors, result.errors
        fixture_path = tmp_path / f"{result.call_sid}.json"
        fixture = wait_for(lambda: (lambda f: f if any(s.twilio == "status" for s in f.steps) else None)(
            fx.load(fixture_path)), "the status callback recorded")
        kinds = [(s.twilio or s.media or "vapi") for s in fixture.steps]
        assert kinds[:4] == ["voice", "open", "audio", "stop"] and "status" in kinds
        voice, opened, played, stop = fixture.steps[:4]
        assert voice.capture == {"stream_url": "twiml:Connect/Stream/@url"}
        assert played.background and played.at_ms == opened.at_ms and stop.at_ms >= opened.at_ms + 1400
        # the caller's audio, every frame at its timestamp
        pcm, rate = audio.read_wav(str(tmp_path / played.file))
        assert rate == 8000 and audio.pcm16_to_ulaw(pcm)[:len(spoken)] == spoken
        assert len(pcm) // 2 >= 8 * 1500
        assert result.call_sid not in fixture_path.read_text().replace(fixture_path.stem, "")

        # played back against the bridge (an echo assistant): the recorded audio comes back, in real time
        stop.expect.media = fx.MediaExpect(min_audio_ms=500)
        async def replay():
            runner = Runner(url, Credentials(TOKEN, VAPI_SECRET), base_dir=tmp_path)
            try:
                started = time.monotonic()
                outcome = await runner.run(fixture, str(fixture_path))
                return outcome, time.monotonic() - started
            finally:
                await runner.aclose()
        outcome, seconds = asyncio.run(replay())
    assert all(step.ok for step in outcome.steps), [(s.label, s.problems) for s in outcome.steps]
    assert seconds >= 1.5   # the audio took its own time, not a burst
