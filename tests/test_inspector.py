"""twivapi inspect: the page in headless Chromium (Debian's package, driven by Playwright) over a
real recorded call with a barge-in; the token on every request; the per-turn latency budget in
the page, /metrics and `tail --json`; `inspect --print-url`.

One bridge, one call and one browser for the module. ``UPDATE_SCREENSHOTS=1`` writes the
call page's screenshot to docs/inspector.png (the README shows it)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from twivapi_cli import audio
from twivapi_cli.bridge.admin import create_admin_app
from twivapi_cli.bridge.server import start_in_thread, write_bridge_file
from twivapi_cli.cli import app as cli_app
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.memory import MemoryStore

from .polling import wait_for
from .support import VAPI_SECRET, bridge_settings, place_call, running_bridge

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN_TOKEN = "inspector-test-token-0123456789"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed "
                                                                       "(./scripts/test installs it)")


class Setup:
    def __init__(self, bridge, admin, record_dir, call_sid, result):
        self.bridge, self.admin, self.record_dir, self.call_sid, self.result = bridge, admin, record_dir, call_sid, result

    def url(self, path: str = "/inspect", token: str | None = ADMIN_TOKEN) -> str:
        return self.admin.url + path + (f"?token={token}" if token else "")


@pytest.fixture(scope="module")
def setup(sims, tmp_path_factory):
    record_dir = tmp_path_factory.mktemp("recordings")
    # the caller talks at 2 s over a 5 s greeting: it starts once POST /call answered (up to ~0.7 s in,
    # later on a loaded machine), so it is playing then and the barge-in has something to clear
    assistant = sims.assistant(behavior="answer", greeting_ms=5000, reply_ms=600)
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant, TWIVAPI_RECORD_DIR=str(record_dir))
    with running_bridge(settings, MemoryStore(), public_from_server=True) as bridge:
        sims.vapi("PATCH", f"/assistant/{assistant}", json={"server": {"url": bridge.url + "/vapi/webhook",
                                                                       "headers": {"X-Vapi-Secret": VAPI_SECRET}}})
        admin = start_in_thread(create_admin_app(bridge.app, ADMIN_TOKEN))
        try:
            spoken = (audio.silence_mulaw(2000) + audio.pcm16_to_ulaw(audio.tone(300.0, 600, 8000, 0.5))
                      + audio.silence_mulaw(1600))
            result = place_call(bridge.url, CallerPlan(audio=spoken, hangup_after_s=4.2))
            assert not result.errors and len(result.clears) == 1, result.timeline
            wait_for(lambda: any(e.type == "vapi.report" for e in bridge.events(result.call_sid)), "Vapi's report",
                     timeout=15)
            yield Setup(bridge, admin, record_dir, result.call_sid, result)
        finally:
            admin.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    # the page's CSP has no 'unsafe-eval'; Playwright's waits evaluate strings, so it is lifted for them
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def off_loop(fn, *args):
    """Run ``fn`` on a thread of its own: Playwright's event loop holds this one (asyncio.run fails here)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(60)


def envelope(channel: np.ndarray, columns: int = 200) -> list[int]:
    """As the page computes it: the peak |sample| of each of 200 equal spans."""
    n = len(channel)
    return [int(np.abs(channel[i * n // columns:(i + 1) * n // columns].astype(np.int32)).max(initial=0))
            for i in range(columns)]


def read_legs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    return samples[:, 0], samples[:, 1]


def test_a_tokenless_request_and_the_public_port_get_nothing(setup, page):
    sid = setup.call_sid
    paths = ["/inspect", "/inspect/static/app.js", "/calls", f"/calls/{sid}", f"/calls/{sid}/recording.wav",
             f"/calls/{sid}/fixture", "/events?once=1", "/metrics"]
    with httpx.Client() as client:
        for path in paths:
            for token in (None, "wrong-token"):
                answer = client.get(setup.admin.url + path, params={"token": token} if token else None)
                assert answer.status_code == 401, path
                assert sid not in answer.text and "RIFF" not in answer.text
            assert client.get(setup.bridge.url + path.split("?")[0]).status_code in (404, 405), path
            assert client.get(setup.bridge.url + path.split("?")[0], params={"token": ADMIN_TOKEN}).status_code \
                in (404, 405)
        assert client.post(setup.admin.url + f"/calls/{sid}/resend", json={"index": 0}).status_code == 401
    assert page.goto(setup.url(token=None)).status == 401
    assert page.goto(setup.bridge.url + f"/inspect?token={ADMIN_TOKEN}").status == 404


def test_the_call_list_and_a_calls_page(setup, page):
    sid = setup.call_sid
    assert page.goto(setup.url()).status == 200
    row = page.locator(f'#calls tr[data-call-sid="{sid}"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == sid and cells[1] == "ended" and cells[2] == "stream"
    assert cells[4] == "+1555***0001"   # masked as tail masks it
    assert cells[6] == "1"               # the barge-in
    row.locator("a").click()
    page.locator("#call-sid").wait_for()
    assert page.locator("#call-sid").inner_text() == sid

    # the timeline: its events by their event-log names, with acks, setup, first audio and barge-in marked
    page.wait_for_function("document.querySelector('#wave-caller').dataset.envelope !== undefined")
    types = set(page.locator("#timeline g.ev").evaluate_all("gs => gs.map(g => g.dataset.type)"))
    assert {"twilio.voice", "state", "vapi.call-created", "media.start", "media.vapi-open", "media.first-audio",
            "media.clear", "media.stop", "vapi.report"} <= types
    assert page.locator("#timeline g.ev.barge-in").count() == 1
    assert page.locator("#timeline g.ev.first-audio").count() >= 1
    assert page.locator("#timeline g.ev.setup rect").count() == 1
    assert page.locator("#timeline g.ev.ack").count() >= 3
    assert "media.clear" in page.locator("#events").inner_text()

    # both waveforms drawn from the real recording: the envelope the page computed is the WAV's
    left, right = read_legs(setup.record_dir / f"{sid}.wav")
    for canvas, leg in (("#wave-caller", left), ("#wave-heard", right)):
        data = page.locator(canvas).evaluate("c => ({envelope: c.dataset.envelope, samples: c.dataset.samples})")
        assert int(data["samples"]) == len(leg)
        assert [int(v) for v in data["envelope"].split(",")] == envelope(leg)

    def drawn(canvas: str, at_ms: float) -> bool:
        """Whether the page painted the pixel column of ``at_ms`` (the channel's own colour)."""
        return page.evaluate("""([id, ms]) => {
            const c = document.querySelector(id), v = window.inspector.view;
            const px = Math.round(window.inspector.x(ms));
            const d = c.getContext('2d').getImageData(px, 0, 1, c.height).data;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
            return false; }""", [canvas, at_ms])
    assert drawn("#wave-caller", 2300) and not drawn("#wave-caller", 1000)   # the caller spoke at 2.0-2.6 s
    greeting_ms = next(s for s in json.loads((setup.record_dir / f"{sid}.json").read_text())["heard"])
    assert drawn("#wave-heard", greeting_ms["at_ms"] + 50)

    # the audio element loads the WAV, as long as the recording
    page.wait_for_function("document.querySelector('#player').readyState >= 1", timeout=10_000)
    duration = page.evaluate("document.querySelector('#player').duration")
    assert abs(duration - len(left) / 8000) < 0.05
    assert page.locator("#download").get_attribute("href").endswith(f"/calls/{sid}/recording.wav?token={ADMIN_TOKEN}")

    # the per-turn latency table
    turns = page.locator("#turns tbody tr")
    assert turns.count() >= 1
    assert all(cell for cell in turns.first.locator("td").all_inner_texts()[:11])

    # zoom: the same recording, twice as wide
    width = page.locator("#wave-caller").evaluate("c => c.width")
    page.locator("#zoom").fill("400")
    assert page.locator("#wave-caller").evaluate("c => c.width") > width * 1.5

    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        page.locator("#zoom").fill("200")
        page.screenshot(path=str(ROOT / "docs" / "inspector.png"), full_page=True)

    # actions: copy as fixture (what fixtures record writes), re-send a webhook
    page.locator("#copy-fixture").click()
    page.locator("#fixture-out").wait_for()
    fixture = json.loads(page.locator("#fixture-out").inner_text())
    assert fixture["steps"][0]["twilio"] == "voice" and fixture["steps"][0]["params"]["CallSid"] == "{{call_sid}}"
    assert sid not in page.locator("#fixture-out").inner_text()
    kinds = page.locator("#webhooks tbody tr td:nth-child(4)").all_inner_texts()
    page.locator("#webhooks button.resend").nth(kinds.index("status")).click()
    page.wait_for_function("document.querySelector('#resend-out').textContent.startsWith('re-sent')")
    assert page.locator("#resend-out").inner_text() in ("re-sent /twilio/status: 204", "re-sent /twilio/status: 200")
    assert not page.problems, page.problems


def test_the_page_follows_new_calls_live(setup, page):
    page.goto(setup.url())
    page.locator(f'#calls tr[data-call-sid="{setup.call_sid}"]').wait_for()
    assert page.locator("#live").inner_text() == "live" or page.wait_for_function(
        "document.querySelector('#live').textContent === 'live'")
    second = off_loop(place_call, setup.bridge.url, CallerPlan(hangup_after_s=0.5))
    page.locator(f'#calls tr[data-call-sid="{second.call_sid}"]').wait_for(timeout=10_000)
    assert not page.problems, page.problems


def test_the_latency_budget_in_metrics_and_tail_json(setup):
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        detail = client.get(setup.admin.url + f"/calls/{setup.call_sid}").json()
        metrics = client.get(setup.admin.url + "/metrics").text
    turn = detail["turns"][0]
    for key in ("relay_in_ms", "vapi_ms", "relay_out_ms", "pacing_ms", "vapi_turn_ms", "vapi_endpointing_ms",
                "vapi_model_ms", "heard_ms"):
        assert isinstance(turn[key], (int, float)), (key, turn)
    assert turn["vapi_endpointing_ms"] == 300 and turn["vapi_model_ms"] == 150
    assert turn["heard_ms"] == pytest.approx(turn["vapi_turn_ms"] + turn["relay_in_ms"] + turn["relay_out_ms"]
                                             + turn["pacing_ms"])
    for figure in ("turn: relay in", "turn: pacing", "turn: vapi model", "turn: vapi endpointing"):
        assert f'twivapi_latency_ms_count{{figure="{figure}"}}' in metrics, figure
    out = off_loop(CliRunner().invoke, cli_app, ["tail", "--json", "--once", "--url", setup.admin.url, "--token", ADMIN_TOKEN,
                                       "--call", setup.call_sid])
    assert out.exit_code == 0, out.output
    budgets = [json.loads(line) for line in out.stdout.splitlines() if '"turn-budget"' in line]
    assert budgets and budgets[-1]["turns"][0]["vapi_model_ms"] == 150


def test_inspect_print_url(setup, tmp_path, monkeypatch):
    state = tmp_path / "state"
    write_bridge_file(state, setup.admin.url, ADMIN_TOKEN, setup.bridge.server.port)
    monkeypatch.setenv("TWIVAPI_STATE_DIR", str(state))
    out = CliRunner().invoke(cli_app, ["inspect", "--print-url", "--call", setup.call_sid])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == f"{setup.admin.url}/inspect?token={ADMIN_TOKEN}#call={setup.call_sid}"
    assert httpx.get(out.stdout.strip().split("#")[0]).status_code == 200
    bad = CliRunner().invoke(cli_app, ["inspect", "--print-url", "--call", "nope"])
    assert bad.exit_code == 2 and "CallSid" in bad.output
