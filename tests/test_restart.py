"""One bridge (SQLite) killed with SIGKILL in the middle of calls, then restarted: no acknowledged
event is lost, and every live session is either resumed or ended with a reason."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time

import httpx

from twivapi_cli import signing
from twivapi_cli.models import CallState, Session
from twivapi_cli.sim.twilio_caller import CallerPlan

from .support import TOKEN, VAPI_KEY, VAPI_SECRET, free_port, new_call_sid, place_call, reap, start_serve


def settle(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def test_sigkill_mid_call_then_restart_resumes_or_ends_every_session(sims, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "bridge.db"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant(greeting_ms=1500), "VAPI_BASE_URL": sims.url,
           "TWIVAPI_PUBLIC_URL": url, "TWIVAPI_STORE": f"sqlite:///{db}", "TWIVAPI_STATE_DIR": str(tmp_path / "s"),
           # the ready call's stream comes only after the restart: however slow this machine, not "never"
           "TWIVAPI_STREAM_START_TIMEOUT": "300"}

    def session(sid):   # what the bridge committed, read from its file
        with contextlib.closing(sqlite3.connect(db)) as conn:
            row = conn.execute("SELECT data FROM sessions WHERE call_sid = ?", (sid,)).fetchone()
        return Session.from_dict(json.loads(row[0])) if row else None

    def voice(sid):
        params = {"CallSid": sid, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
        sig = signing.twilio_signature(TOKEN, url + "/twilio/voice", params)
        return httpx.post(url + "/twilio/voice", data=params, headers={"X-Twilio-Signature": sig})

    def call_into(sid, hangup_after_s, into: list):
        try:
            into.append(place_call(url, CallerPlan(hangup_after_s=hangup_after_s), status_callback=False,
                                   call_sid=sid))
        except Exception as exc:   # the bridge died under it
            into.append(exc)

    in_call, ready, mid_setup = new_call_sid(), new_call_sid(), new_call_sid()
    proc = start_serve(env, port)
    try:
        first: list = []
        caller = threading.Thread(target=call_into, args=(in_call, 30, first), daemon=True)
        caller.start()
        settle(lambda: (s := session(in_call)) and s.state == CallState.ACTIVE and s.stream_sid)
        assert voice(ready).status_code == 200
        settle(lambda: (s := session(ready)) and s.state == CallState.READY)
        sims.slow_calls(20, count=1)           # this one's POST /call is in flight when the bridge dies
        assert voice(mid_setup).status_code == 200
        settle(lambda: (s := session(mid_setup)) and s.state == CallState.SETTING_UP)
        reap(proc)
        caller.join(10)
        sims.clear_faults()
        acknowledged = {(r[0], r[1]) for r in _rows(db, "SELECT type, call_sid FROM events")}

        proc = start_serve(env, port)
        ended = settle(lambda: (s := session(in_call)) and s.state.terminal and s)
        assert ended.ended_reason == "bridge-restarted"            # its media socket died with the process
        settle(lambda: sims.ended(ended.vapi_call_id), timeout=15)   # and its Vapi call was ended
        failed = session(mid_setup)
        assert failed.state == CallState.FAILED and failed.ended_reason == "bridge-restarted-during-setup"
        assert session(ready).state == CallState.READY             # resumed: its media can still come
        second: list = []
        call_into(ready, 2.0, second)                             # ...and does, to the new process
        result = second[0]
        assert not isinstance(result, Exception) and len(result.heard) > 1600, result
        settle(lambda: session(ready).state == CallState.ENDED)
        assert httpx.get(url + "/health").json()["active_sessions"] == 0
        after = {(r[0], r[1]) for r in _rows(db, "SELECT type, call_sid FROM events")}
        assert acknowledged <= after                                 # nothing acknowledged was lost
        assert ("twilio.voice", in_call) in acknowledged and ("twilio.voice", mid_setup) in acknowledged
        recovered = [r for r in _rows(db, "SELECT data FROM events WHERE type='bridge.recovered'")]
        assert recovered and json.loads(recovered[0][0]) == {"resumed": 1, "ended": 2}
    finally:
        reap(proc)


def _rows(db, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()
