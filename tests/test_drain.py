"""Stopping for a deploy: a real `twivapi serve` with live calls gets SIGTERM.

It must say it is draining (/health 503 ``draining``), turn new calls away with the fallback (no
other instance to take them), let a call that ends by itself end normally, end the call still
live at TWIVAPI_DRAIN_TIMEOUT cleanly (its Vapi side too), and exit 0, in bounded time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time

import httpx

from twivapi_cli import signing
from twivapi_cli.bridge.twilio_hooks import FALLBACK_TEXT
from twivapi_cli.models import CallState, Session
from twivapi_cli.sim.twilio_caller import CallerPlan

from .support import TOKEN, VAPI_KEY, VAPI_SECRET, free_port, new_call_sid, place_call, reap, start_serve

DRAIN_S = 3.0


def settle(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def test_sigterm_drains_live_calls_then_ends_the_rest_and_exits_0(sims, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "bridge.db"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant(greeting_ms=20_000), "VAPI_BASE_URL": sims.url,
           "TWIVAPI_PUBLIC_URL": url, "TWIVAPI_STORE": f"sqlite:///{db}", "TWIVAPI_STATE_DIR": str(tmp_path / "s"),
           "TWIVAPI_DRAIN_TIMEOUT": str(DRAIN_S)}

    def session(sid):   # what the bridge committed, read from its file
        with contextlib.closing(sqlite3.connect(db)) as conn:
            row = conn.execute("SELECT data FROM sessions WHERE call_sid = ?", (sid,)).fetchone()
        return Session.from_dict(json.loads(row[0])) if row else None

    def voice(sid):
        params = {"CallSid": sid, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
        sig = signing.twilio_signature(TOKEN, url + "/twilio/voice", params)
        return httpx.post(url + "/twilio/voice", data=params, headers={"X-Twilio-Signature": sig}, timeout=10)

    results: dict[str, object] = {}

    def call(sid, hangup_after_s):
        try:
            results[sid] = place_call(url, CallerPlan(hangup_after_s=hangup_after_s), status_callback=False,
                                      call_sid=sid)
        except Exception as exc:
            results[sid] = exc

    finishing, staying = new_call_sid(), new_call_sid()
    proc = start_serve(env, port)
    try:
        callers = [threading.Thread(target=call, args=(finishing, 2.5), daemon=True),
                   threading.Thread(target=call, args=(staying, None), daemon=True)]   # never hangs up
        for caller in callers:
            caller.start()
        for sid in (finishing, staying):
            settle(lambda sid=sid: (s := session(sid)) and s.state == CallState.ACTIVE)
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        health = settle(lambda: (h := httpx.get(url + "/health", timeout=5)).status_code == 503 and h)
        assert health.json()["status"] == "draining"
        turned_away = voice(new_call_sid())   # a new call while draining, no other instance: the fallback
        assert turned_away.status_code == 200 and FALLBACK_TEXT in turned_away.text
        assert proc.wait(DRAIN_S + 15) == 0, proc.stderr.read()[-2000:]
        took = time.monotonic() - stopped_at
        for caller in callers:
            caller.join(10)
        done = session(finishing)
        assert done.state == CallState.ENDED and done.ended_reason == "twilio-stream-stopped"
        cut = session(staying)
        assert cut.state == CallState.ENDED and cut.ended_reason == "bridge-shutdown"
        assert DRAIN_S - 0.5 <= took, f"stopped after {took:.1f} s, before the drain timeout"
        settle(lambda: sims.ended(cut.vapi_call_id), timeout=15)   # its Vapi call was ended, not left running
        staying_result = results[staying]
        assert not isinstance(staying_result, Exception), staying_result
        assert staying_result.timeline[-1][1] == "ended"   # the caller's stream was closed, not left hanging
    finally:
        reap(proc)
