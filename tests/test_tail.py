"""`twivapi tail` and the admin endpoints: a real bridge and simulators, calls in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from twivapi_cli import tail as lib
from twivapi_cli.bridge.admin import create_admin_app
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.cli import app
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.ui import tail_view

from .sims import running_sims
from .support import PUBLIC, TOKEN, VAPI_KEY, VAPI_SECRET, bridge_settings, new_call_sid, reap, running_bridge

ADMIN_TOKEN = "admin-token-for-tests"
runner = CliRunner()


@pytest.fixture(scope="module")
def sims():
    with running_sims() as running:
        running.assistant_id = running.assistant()
        yield running


@pytest.fixture
def bridge(sims):
    with running_bridge(bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant_id), MemoryStore()) as b:
        admin = start_in_thread(create_admin_app(b.app, ADMIN_TOKEN))
        b.admin_url = admin.url
        yield b
        admin.stop()


def place_calls(bridge, n=3):
    sids = [new_call_sid() for _ in range(n)]
    for sid in sids:
        assert bridge.voice(sid, From="+15551234567").status_code == 200
    deadline = time.monotonic() + 5
    while not all(bridge.session(s).vapi_call_id for s in sids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return sids


def tail_json(bridge, *args):
    return runner.invoke(app, ["tail", "--url", bridge.admin_url, "--token", ADMIN_TOKEN, "--json", "--once", *args])


def test_tail_json_sees_every_event_in_order(bridge):
    sids = place_calls(bridge)
    bridge.status(sids[0], "completed")
    result = tail_json(bridge)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    stored = bridge.events()
    assert [e["seq"] for e in events] == [e.seq for e in stored]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {"twilio.voice", "vapi.call-created", "state", "twilio.status"} <= {e["type"] for e in events}


def test_filters_by_call_and_type(bridge):
    sids = place_calls(bridge, 2)
    only = tail_json(bridge, "--call", sids[1], "--type", "state")
    events = [json.loads(line) for line in only.stdout.splitlines()]
    assert events and all(e["call_sid"] == sids[1] and e["type"].startswith("state") for e in events)


def test_phone_numbers_and_secrets_are_masked_unless_asked(bridge):
    place_calls(bridge, 1)
    masked = tail_json(bridge).stdout
    assert "+15551234567" not in masked and "+1555***4567" in masked
    shown = tail_json(bridge, "--show-numbers").stdout
    assert "+15551234567" in shown
    assert lib.mask({"auth_token": "x", "nested": {"X-Twilio-Signature": "abc"}}) == \
        {"auth_token": "***", "nested": {"X-Twilio-Signature": "***"}}


def test_live_stream_delivers_new_events(bridge):
    async def go():
        seen = []
        target = lib.Target(bridge.admin_url, ADMIN_TOKEN)
        agen = lib.follow(target, lib.Filters(type="twilio.voice"))
        async for item in agen:
            if isinstance(item, lib.Notice):
                await asyncio.to_thread(place_calls, bridge, 2)
                continue
            seen.append(item)
            if len(seen) == 2:
                break
        await agen.aclose()
        return seen
    seen = asyncio.run(go())
    assert [e["type"] for e in seen] == ["twilio.voice", "twilio.voice"]


def test_snapshot_renders_rows_and_figures(bridge):
    sids = place_calls(bridge, 2)
    snap = asyncio.run(lib.snapshot(lib.Target(bridge.admin_url, ADMIN_TOKEN)))
    assert {s["call_sid"] for s in snap["sessions"]} >= set(sids)
    assert snap["latency"]["vapi setup"]["count"] >= 2
    console = Console(record=True, width=160)
    console.print(tail_view(snap, []))
    text = console.export_text()
    assert sids[0][-12:] in text and "vapi setup" in text and "webhook ack /twilio/voice" in text


def test_once_renders_a_snapshot_through_the_cli(bridge):
    place_calls(bridge, 1)
    result = runner.invoke(app, ["tail", "--url", bridge.admin_url, "--token", ADMIN_TOKEN, "--once"],
                           env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "active calls" in result.output and "latency (ms)" in result.output


def test_admin_endpoints_need_the_token_and_are_not_on_the_public_port(bridge):
    for path in ("/events", "/sessions", "/latency", "/metrics"):
        assert httpx.get(bridge.url + path).status_code == 404          # public port
        assert httpx.get(bridge.admin_url + path).status_code == 401    # admin port, no token


def test_metrics_in_prometheus_format(bridge):
    place_calls(bridge, 2)
    text = httpx.get(bridge.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    assert 'twivapi_latency_ms_bucket{figure="vapi setup"' in text
    assert 'twivapi_http_responses_total{route="/twilio/voice",status="200"}' in text
    assert "twivapi_active_sessions" in text


def test_histogram_quantiles_are_close():
    h = lib.Histogram()
    for v in range(1, 1001):
        h.add(float(v))
    assert abs(h.quantile(0.5) - 500) / 500 < 0.03
    assert abs(h.quantile(0.99) - 990) / 990 < 0.03
    assert h.sparkline()


def test_no_bridge_running_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["tail", "--once"])
    assert result.exit_code == 3 and "twivapi serve" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_records_admin_address_0600_and_tail_reconnects_after_a_restart(tmp_path, sims):
    state = tmp_path / "state"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant_id, "VAPI_BASE_URL": sims.url, "TWIVAPI_PUBLIC_URL": PUBLIC,
           "TWIVAPI_STATE_DIR": str(state), "TWIVAPI_ADMIN_PORT": str(_free_port()),
           "TWIVAPI_STORE": f"sqlite:///{tmp_path}/t.db"}
    twivapi = str(Path(sys.executable).with_name("twivapi"))

    def start():
        proc = subprocess.Popen([twivapi, "serve", "--port", "0", "--log-level", "warning"], env=env,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 45   # a bound, not a goal: a loaded 2-core machine starts serve slowly
        while not (state / "bridge.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        return proc

    proc = start()
    assert (state / "bridge.json").stat().st_mode & 0o777 == 0o600
    target = lib.discover(state)
    assert target is not None and target.token

    async def follow_across_restart():
        nonlocal proc
        notices = []
        agen = lib.follow(target, lib.Filters(), retry_max=0.3, rediscover=lambda: lib.discover(state))
        async for item in agen:
            if isinstance(item, lib.Notice):
                notices.append(item.kind)
                # the first connection (a loaded machine may refuse an attempt or two before it):
                # restart the bridge under it; the next connection is to the new process
                if item.kind == "connected" and notices.count("connected") == 1:
                    await asyncio.to_thread(reap, proc, signal.SIGTERM)
                    proc = await asyncio.to_thread(start)
                elif notices.count("connected") == 2:
                    break
        await agen.aclose()
        return notices

    try:
        notices = asyncio.run(asyncio.wait_for(follow_across_restart(), 120))
    finally:
        reap(proc, signal.SIGTERM)
    first = notices.index("connected")
    assert "disconnected" in notices[first:] and notices[-1] == "connected", notices
    assert not (state / "bridge.json").exists()   # removed on a clean exit
