"""Reliability: Vapi faults during call setup (stream and bypass mode) and a store that cannot write.

Each fault is injected through the Vapi simulator's fault rules on ``POST /call`` and a real
simulated caller places the call through the bridge. The outcome asserted for each:

- a fault the bridge cannot absorb (5xx, 429, a hang, an answer past the deadline, garbage) gives
  the caller the fallback message within a bound, never silence, and leaves the session in a
  terminal state with a reason and out of ``active_sessions``; the Vapi call is never retried but
  on a 429 (it created nothing), and then only with backoff, after Retry-After and inside the
  deadline (no retry storm), and nothing of Vapi's reaches the caller;
- a fault it can absorb (slow, but inside the deadline) is invisible to the caller.

The store part: SQLite locked by another connection, and a full disk (a full tmpfs when this
machine lets us mount one; a file-size limit on a bridge subprocess everywhere): every webhook gets
a 503 ``store_unavailable`` JSON error in bounded time, never a 500 or a hang, and the bridge
recovers, /health included, once the lock is released or space is freed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from twivapi_cli import signing
from twivapi_cli.bridge import setup as bridge_setup
from twivapi_cli.bridge.twilio_hooks import FALLBACK_TEXT
from twivapi_cli.models import CallState, Trigger
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store import sqlite as sqlite_store
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.store.sqlite import SQLiteStore

from .polling import wait_for
from .support import PUBLIC, TOKEN, VAPI_SECRET, bridge_settings, new_call_sid, place_call, running_bridge

# the simulated POST /call takes 300-600 ms, as Vapi's does (sim/latency.py): the deadlines leave it room
SETUP_DEADLINE = 2.0      # stream mode: the bridge's POST /call deadline, shortened from 8 s for the test
BYPASS_TIMEOUT = 2.0      # bypass mode: TWIVAPI_BYPASS_TIMEOUT
CALLER_HEARS_UNTIL = 2.5  # a call that works: the caller stays this long (setup, a retry, then the greeting)
CALLER_HANGS_UP_AT = 6.0  # a caller left in silence would hang up here; every fallback must come first


@pytest.fixture(scope="module")
def sims(sims):
    sims.assistant_id = sims.assistant(greeting_ms=500)
    sims.phone_number_id = sims.phone_number()
    return sims


@pytest.fixture
def clean_faults(sims):
    sims.clear_faults()
    yield sims
    sims.clear_faults()


@pytest.fixture
def settled(stream_bridge, bypass_bridge):
    """No setup of an earlier test still running on either bridge: a late retry of its POST /call
    (Vapi answers in hundreds of ms) would reach this test's fault rule and count as this call's."""
    def idle() -> bool:
        return all(b.deps.setup.inflight == 0 and b.deps.setup.waiting == 0 for b in (stream_bridge, bypass_bridge))
    wait_for(idle, timeout=20, what="earlier setups to finish")


@pytest.fixture(scope="module")
def short_setup_deadline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bridge_setup, "SETUP_DEADLINE", SETUP_DEADLINE)
        yield


def settings_for(sims, mode: str, **extra):
    return bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant_id, VAPI_PHONE_NUMBER_ID=sims.phone_number_id,
                           TWIVAPI_MODE=mode, TWIVAPI_BYPASS_TIMEOUT=str(BYPASS_TIMEOUT), **extra)


@pytest.fixture(scope="module")
def stream_bridge(sims, short_setup_deadline):
    with running_bridge(settings_for(sims, "stream"), MemoryStore(), public_from_server=True) as b:
        yield b


@pytest.fixture(scope="module")
def bypass_bridge(sims):
    with running_bridge(settings_for(sims, "bypass"), MemoryStore(), public_from_server=True) as b:
        yield b


def active_sids(bridge) -> set[str]:
    return {s.call_sid for s in bridge.server.run(lambda: bridge.deps.store.active_sessions())}


# --- Vapi faults on POST /call ------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    name: str
    rule: dict                       # a Faults.add() rule on POST /call
    fallback: bool = True            # the caller must get the fallback (else: the call must work)
    error: str = ""                  # regex the recorded vapi.setup-failed error must match (stream mode)
    bypass_error: str = "vapi-error"  # the bypass-mode failure reason


FAULTS = [
    Fault("slow-inside-deadline", {"kind": "latency", "delay": 0.4}, fallback=False),
    Fault("slow-past-deadline", {"kind": "latency", "delay": 3.0}, error="timed out", bypass_error="vapi-timeout"),
    Fault("hang", {"kind": "hang", "delay": 10.0}, error="timed out", bypass_error="vapi-timeout"),
    Fault("500", {"kind": "status", "status": 500}, error="HTTP 500"),
    Fault("502-html", {"kind": "garbage", "status": 502}, error="HTTP 502 .non-JSON"),
    Fault("503", {"kind": "status", "status": 503, "headers": {"Retry-After": "1"}}, error="HTTP 503"),
    # Retry-After (2 s) is past the deadline: no retry
    Fault("429", {"kind": "status", "status": 429, "headers": {"Retry-After": "2"},
                  "body": {"statusCode": 429, "message": "Too Many Requests", "error": "Too Many Requests"}},
          error="HTTP 429: Too Many Requests"),
    Fault("garbage-200-html", {"kind": "garbage"}, error="non-JSON body"),
    Fault("garbage-200-text", {"kind": "status", "status": 200, "body": "OK"}, error="non-JSON body"),
    Fault("garbage-json-list", {"kind": "status", "status": 201, "body": [1, 2, 3]}, error="without a call id"),
    Fault("garbage-json-no-id", {"kind": "status", "status": 201, "body": {"status": "queued"}},
          error="without a call id"),
    Fault("garbage-json-wrong-types", {"kind": "status", "status": 201,
                                       "body": {"id": {"x": 1}, "transport": "websocket", "monitor": [],
                                                "phoneCallProviderDetails": "twiml"}},
          error="without a call id"),
    # the shape of a call, but nothing to connect to: no transport URL / no TwiML
    Fault("garbage-json-no-transport", {"kind": "status", "status": 201,
                                        "body": {"id": "call-without-transport", "status": "queued"}},
          error="websocketCallUrl"),
    Fault("garbage-json-twiml-no-id", {"kind": "status", "status": 201, "body": {
        "phoneCallProviderDetails": {"twiml": "<Response><Hangup/></Response>"}}}, error="without a call id"),
    Fault("garbage-json-bad-twiml", {"kind": "status", "status": 201,
                                     "body": {"id": "call-bad-twiml", "transport": {"websocketCallUrl": 42},
                                              "phoneCallProviderDetails": {"twiml": "<Response><Connect>"}}},
          error="websocketCallUrl"),
]


def _apply(sims, fault: Fault):
    return sims.running.vapi_faults.add(path="/call", method="POST", **fault.rule)


def _check_fallback(result, said_by: float):
    assert FALLBACK_TEXT in result.said, (result.said, result.timeline, result.errors)
    said_at = next(t for t, kind, _ in result.timeline if kind == "say")
    assert said_at < said_by, f"the fallback came {said_at:.2f} s into the call (bound {said_by} s)"
    assert result.status == "completed" and result.timeline[-1][1] == "ended"
    assert not result.heard, "the caller heard audio although setup failed"
    assert not result.errors, result.errors


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_stream_mode_setup_fault(fault, stream_bridge, clean_faults, settled):
    sims, bridge = clean_faults, stream_bridge
    rule = _apply(sims, fault)
    result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HEARS_UNTIL if not fault.fallback else CALLER_HANGS_UP_AT))
    sid = result.call_sid
    assert rule.fired == 1, "POST /call was retried (or never made)"
    events = bridge.events(sid)
    types = [e.type for e in events]
    session = bridge.session(sid)
    assert result.webhook_ms[0] < 1000, "the voice webhook waited on Vapi"
    if not fault.fallback:
        assert not result.errors and FALLBACK_TEXT not in result.said
        assert len(result.heard) >= 8 * 300, "the greeting was not heard"
        assert "vapi.call-created" in types and "vapi.setup-failed" not in types
        assert session.state == CallState.ENDED and session.ended_reason
    else:
        _check_fallback(result, said_by=SETUP_DEADLINE + 1.5)
        failed = [e for e in events if e.type == "vapi.setup-failed"]
        assert len(failed) == 1 and re.search(fault.error, failed[0].data["error"]), failed
        assert session.state == CallState.FAILED and session.ended_reason == "vapi-setup-failed"
        # the media stream was refused or ended, with a reason
        stream_end = [e for e in events if e.type in ("media.refused", "media.stop")]
        assert stream_end and all(e.data.get("reason") for e in stream_end), types
        after = [e for e in events if e.type == "twilio.after-stream"]
        assert after and after[0].data["state"] == "failed"
    assert sid not in active_sids(bridge)
    assert [e.data["state"] for e in events if e.type == "state"].count(session.state.value) == 1


TOO_MANY = {"kind": "status", "status": 429,
            "body": {"statusCode": 429, "message": "Too Many Requests", "error": "Too Many Requests"}}


def test_stream_mode_retries_a_transient_429_and_the_call_works(stream_bridge, clean_faults, settled):
    sims, bridge = clean_faults, stream_bridge
    rule = sims.running.vapi_faults.add(path="/call", method="POST", count=1, **TOO_MANY)
    result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HEARS_UNTIL))
    assert rule.fired == 1 and len(sims.calls_for(result.call_sid)) == 1   # refused once, then created once
    assert not result.errors and FALLBACK_TEXT not in result.said
    assert len(result.heard) >= 8 * 300, "the greeting was not heard"
    assert "vapi.setup-failed" not in [e.type for e in bridge.events(result.call_sid)]


def test_stream_mode_429_without_retry_after_backs_off_until_the_deadline(stream_bridge, clean_faults, settled):
    sims, bridge = clean_faults, stream_bridge
    rule = sims.running.vapi_faults.add(path="/call", method="POST", **TOO_MANY)
    result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HANGS_UP_AT))
    _check_fallback(result, said_by=SETUP_DEADLINE + 1.5)
    # retried, but backing off: 200 ms doubling, jittered, inside a 2 s deadline is a handful of tries
    assert 2 <= rule.fired <= 12, rule.fired
    failed = [e for e in bridge.events(result.call_sid) if e.type == "vapi.setup-failed"]
    assert len(failed) == 1 and "429" in failed[0].data["error"]
    assert bridge.session(result.call_sid).ended_reason == "vapi-setup-failed"


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_bypass_mode_setup_fault(fault, bypass_bridge, clean_faults, settled):
    sims, bridge = clean_faults, bypass_bridge
    rule = _apply(sims, fault)
    started = time.monotonic()
    result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HEARS_UNTIL if not fault.fallback else CALLER_HANGS_UP_AT))
    sid = result.call_sid
    assert rule.fired == 1, "POST /call was retried (or never made)"
    assert result.webhook_ms[0] < BYPASS_TIMEOUT * 1000 + 500, "the voice webhook outlived the bypass timeout"
    session = bridge.session(sid)
    events = bridge.events(sid)
    if not fault.fallback:
        assert not result.errors and FALLBACK_TEXT not in result.said
        assert len(result.heard) >= 8 * 300, "the greeting was not heard"
        assert session.vapi_call_id and session.state == CallState.ENDED and session.ended_reason
    else:
        _check_fallback(result, said_by=BYPASS_TIMEOUT + 1.0)
        assert time.monotonic() - started < BYPASS_TIMEOUT + 2.0
        assert session.state == CallState.FAILED and session.ended_reason == fault.bypass_error
        assert [e.type for e in events].count("vapi.setup-failed") == 1
        # Twilio's retry of the webhook: the same fallback, no second POST /call
        retry = bridge.twilio("/twilio/voice", {"CallSid": sid, "From": "+15551230001", "To": "+15551230002"},
                              signed_url=bridge.url + "/twilio/voice")
        assert retry.status_code == 200 and FALLBACK_TEXT in retry.text, retry.text
        assert rule.fired == 1
    assert sid not in active_sids(bridge)


@pytest.mark.parametrize("mode", ["stream", "bypass"])
def test_a_call_vapi_created_but_the_bridge_cannot_use_is_ended(mode, stream_bridge, bypass_bridge, clean_faults):
    """POST /call created a call (it has an id and a control URL) but without a transport URL or
    with TwiML Twilio cannot run: the caller gets the fallback and the call is ended, not left running."""
    sims = clean_faults
    bridge = stream_bridge if mode == "stream" else bypass_bridge
    control = sims.running.vapi_faults.add("status", "/call/created-unusable/control", method="POST",
                                           status=200, body={})
    body = {"id": "created-unusable", "monitor": {"controlUrl": sims.url + "/call/created-unusable/control"}}
    if mode == "stream":
        body["transport"] = {"provider": "vapi.websocket"}
    else:
        body["phoneCallProviderDetails"] = {"twiml": "not TwiML"}
    sims.running.vapi_faults.add("status", "/call", method="POST", status=201, body=body, count=1)
    result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HANGS_UP_AT))
    _check_fallback(result, said_by=SETUP_DEADLINE + 1.5)
    assert control.fired == 1, "the unusable Vapi call was not ended through its control URL"
    assert bridge.session(result.call_sid).state == CallState.FAILED


def test_the_bridge_serves_calls_again_once_vapi_recovers(stream_bridge, bypass_bridge, clean_faults):
    sims = clean_faults
    sims.failing_calls(503)
    for bridge in (stream_bridge, bypass_bridge):
        assert FALLBACK_TEXT in place_call(bridge.url, CallerPlan(hangup_after_s=3.0)).said
    sims.clear_faults()
    for bridge in (stream_bridge, bypass_bridge):
        result = place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HEARS_UNTIL))
        assert FALLBACK_TEXT not in result.said and len(result.heard) >= 8 * 300 and not result.errors


def test_faults_on_many_concurrent_setups_each_get_the_fallback(stream_bridge, clean_faults):
    """Half the setups fail (seeded): each failed call gets the fallback, each other call works."""
    sims, bridge = clean_faults, stream_bridge
    sims.running.vapi_faults.add("status", "/call", method="POST", status=500, probability=0.5)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: place_call(bridge.url, CallerPlan(hangup_after_s=CALLER_HEARS_UNTIL)), range(8)))
    for result in results:
        session = bridge.session(result.call_sid)
        if session.state == CallState.FAILED:
            assert FALLBACK_TEXT in result.said and not result.heard
        else:
            assert session.state == CallState.ENDED and FALLBACK_TEXT not in result.said and result.heard
    assert {bridge.session(r.call_sid).state for r in results} == {CallState.FAILED, CallState.ENDED}
    assert not active_sids(bridge) & {r.call_sid for r in results}


# --- the store cannot write ---------------------------------------------------------------------------

class Webhooks:
    """Signed webhooks for any bridge URL (in this process or a subprocess)."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=20)

    def twilio(self, path: str, params: dict, token: str | None = None) -> httpx.Response:
        headers = {"X-Twilio-Signature": signing.twilio_signature(TOKEN, PUBLIC + path, params)}
        if token:
            headers["I-Twilio-Idempotency-Token"] = token
        return self.http.post(path, data=params, headers=headers)

    def voice(self, sid: str, token: str | None = None) -> httpx.Response:
        return self.twilio("/twilio/voice", {"CallSid": sid, "From": "+15551112222", "To": "+15553334444",
                                             "CallStatus": "ringing"}, token)

    def status(self, sid: str, status: str = "completed", token: str | None = None) -> httpx.Response:
        return self.twilio("/twilio/status", {"CallSid": sid, "CallStatus": status}, token)

    def after_stream(self, sid: str) -> httpx.Response:
        return self.twilio("/twilio/after-stream", {"CallSid": sid})

    def vapi(self, message: dict) -> httpx.Response:
        body = json.dumps({"message": message}).encode()
        return self.http.post("/vapi/webhook", content=body,
                              headers={"content-type": "application/json", **signing.sign_vapi(VAPI_SECRET, body)})

    def health(self) -> httpx.Response:
        return self.http.get("/health")

    def close(self) -> None:
        self.http.close()


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:300])
    assert response.json()["error"]["code"] == "store_unavailable"


def every_webhook(hooks: Webhooks, sid: str, *, vapi_call_id: str = "vapi-x") -> dict[str, httpx.Response]:
    """One of each webhook for ``sid`` (a new call, with and without Twilio's idempotency token)."""
    return {"voice": hooks.voice(sid),
            "voice-with-token": hooks.voice(sid[:-4] + "beef", token="tok-" + sid),
            "status": hooks.status(sid, "in-progress", token="st-" + sid),
            "after-stream": hooks.after_stream(sid),
            "vapi": hooks.vapi({"type": "status-update", "status": "in-progress",
                                "call": {"id": vapi_call_id, "assistantOverrides": {"metadata": {"twilioCallSid": sid}}}})}


def check_outage(hooks: Webhooks, sid: str, bound_s: float) -> None:
    """While the store cannot write: every webhook 503 store_unavailable within ``bound_s``; /health 503."""
    started = time.monotonic()
    answers = every_webhook(hooks, sid)
    elapsed = time.monotonic() - started
    for name, response in answers.items():
        assert response.status_code != 500, (name, response.text)
        assert_store_unavailable(response)
    assert elapsed < bound_s * len(answers), f"the webhooks took {elapsed:.1f} s"
    health = hooks.health()
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert sid not in health.text


def check_recovered(hooks: Webhooks, sid: str, ready, timeout: float = 5.0) -> None:
    """Once the store writes again: /health 200 by itself, Twilio's retry of the refused call works."""
    wait_for(lambda: hooks.health().status_code == 200, timeout=timeout, what="/health back to 200 by itself")
    retry = hooks.voice(sid)   # Twilio retries the webhook we refused with a 503
    assert retry.status_code == 200 and "<Stream" in retry.text, retry.text
    wait_for(lambda: ready(sid), timeout=timeout, what=f"the retried call {sid} set up")
    fresh = new_call_sid()
    assert hooks.voice(fresh).status_code == 200
    wait_for(lambda: ready(fresh), timeout=timeout, what="a new call set up")
    assert hooks.status(sid, "completed").status_code == 204
    assert hooks.status(fresh, "completed").status_code == 204


def disk_sessions(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(path, timeout=5)
    try:
        return dict(conn.execute("SELECT call_sid, state FROM sessions"))
    finally:
        conn.close()


@contextlib.contextmanager
def sqlite_bridge(sims, path: Path, **store_options):
    store = SQLiteStore(path, **store_options)
    with running_bridge(settings_for(sims, "stream"), store) as bridge:
        hooks = Webhooks(bridge.url)
        try:
            yield bridge, hooks
        finally:
            hooks.close()


def _ready(bridge):
    def ready(sid: str) -> bool:
        session = bridge.session(sid)
        return session is not None and session.state == CallState.READY and bool(session.vapi_call_id)
    return ready


@pytest.mark.parametrize("busy_timeout", [0.2, 5.0], ids=["busy-0.2s", "busy-5s-default"])
def test_sqlite_locked_answers_503_then_recovers(busy_timeout, clean_faults, tmp_path):
    sims = clean_faults
    path = tmp_path / "locked.db"
    with sqlite_bridge(sims, path, busy_timeout=busy_timeout) as (bridge, hooks):
        before = new_call_sid()
        assert hooks.voice(before).status_code == 200
        wait_for(lambda: _ready(bridge)(before), what="a call before the lock")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")   # another process holds the write lock
        refused = new_call_sid()
        try:
            if busy_timeout < 1:
                check_outage(hooks, refused, bound_s=2 * busy_timeout + 1.0)
            else:   # the default: one webhook, answered inside Twilio's 15 s
                started = time.monotonic()
                assert_store_unavailable(hooks.voice(refused))
                assert time.monotonic() - started < 2 * busy_timeout + 1.0 < 15
        finally:
            other.execute("ROLLBACK")
            other.close()
        check_recovered(hooks, refused, _ready(bridge))
    on_disk = disk_sessions(path)
    assert on_disk.get(refused) == "ended", "the retried call never reached the file"


def test_sqlite_locked_under_concurrent_webhooks_never_waits_unbounded(clean_faults, tmp_path):
    """Webhooks keep arriving while the lock is held: each is answered 503 within two busy timeouts."""
    sims, busy = clean_faults, 0.3
    path = tmp_path / "locked-load.db"
    with sqlite_bridge(sims, path, busy_timeout=busy) as (bridge, hooks):
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            def one(i: int):
                time.sleep(i * 0.05)
                started = time.monotonic()
                response = Webhooks(bridge.url).voice(new_call_sid())
                return response.status_code, time.monotonic() - started
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(one, range(20)))
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert {status for status, _ in answers} == {503}
        worst = max(seconds for _, seconds in answers)
        assert worst < 2 * busy + 1.0, f"a webhook waited {worst:.2f} s on the lock"
        wait_for(lambda: hooks.health().status_code == 200, what="/health back to 200")


def test_a_status_callback_refused_during_the_lock_is_processed_when_twilio_retries(clean_faults, tmp_path):
    """The 503'd ``completed`` callback is retried with the same idempotency token: it must end the
    call then (not be taken for a duplicate of the refused one), and end the Vapi side."""
    sims = clean_faults
    path = tmp_path / "retry.db"
    with sqlite_bridge(sims, path, busy_timeout=0.2) as (bridge, hooks):
        sid = new_call_sid()
        assert hooks.voice(sid, token="v-" + sid).status_code == 200
        wait_for(lambda: _ready(bridge)(sid), what="call set up")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            assert_store_unavailable(hooks.status(sid, "completed", token="s-" + sid))
            assert_store_unavailable(hooks.voice(sid, token="v-" + sid))   # a late retry of the voice webhook
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert hooks.status(sid, "completed", token="s-" + sid).status_code == 204
        session = bridge.session(sid)
        assert session.state == CallState.ENDED and session.ended_reason == "twilio-completed"
        wait_for(lambda: sims.ended(session.vapi_call_id), what="the Vapi call ended")
        types = [e.type for e in bridge.events(sid)]
        assert types.count("twilio.status") == 1 and "twilio.status.duplicate" not in types
        assert hooks.status(sid, "completed", token="s-" + sid).status_code == 204   # now a real duplicate
        assert [e.type for e in bridge.events(sid)].count("twilio.status.duplicate") == 1
    assert disk_sessions(path)[sid] == "ended"


STORE_WRITES = {
    "create_session": lambda store: store.create_session(_session("CA-new")),
    "update_session": lambda store: store.update_session("CA-live", vapi_call_id="vapi-2", stream_sid="MZ-2"),
    "transition": lambda store: store.transition("CA-live", Trigger.END, reason="twilio-completed"),
    "apply_status_sequence": lambda store: store.apply_status_sequence("CA-live", 7),
    "claim": lambda store: store.claim("twilio:status:tok", 60),
    "append": lambda store: store.append(_event()),
}


def _session(sid: str):
    from twivapi_cli.models import Session
    return Session(call_sid=sid, mode="stream")


def _event():
    from twivapi_cli.models import Event
    return Event(type="twilio.status", call_sid="CA-live", data={"status": "completed"})


async def _snapshot(store) -> tuple:
    return ({s.call_sid: s.to_dict() for s in [await store.get_session("CA-live"), await store.get_session("CA-new")]
             if s is not None},
            await store.find_session(vapi_call_id="vapi-2"), await store.find_session(stream_sid="MZ-2"),
            [e.seq for e in await store.events(0)], dict(store._claims))


@pytest.mark.parametrize("write", list(STORE_WRITES))
async def test_a_write_refused_by_a_locked_file_is_undone_in_memory_and_can_be_retried(write, tmp_path):
    """What a 503 told the sender (nothing happened) is what the store holds, so the retry is
    processed as a first delivery; after the lock, the same write succeeds and reaches the file."""
    from twivapi_cli.errors import StoreError
    path = tmp_path / "undo.db"
    store = SQLiteStore(path, busy_timeout=0.1)
    await store.open()
    await store.create_session(_session("CA-live"))
    await store.update_session("CA-live", vapi_call_id="vapi-1")
    await store.transition("CA-live", Trigger.VAPI_CALL_CREATED)
    before = await _snapshot(store)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            await STORE_WRITES[write](store)
        assert await _snapshot(store) == before, "the refused write is still visible in memory"
    finally:
        other.execute("ROLLBACK")
        other.close()
    result = await STORE_WRITES[write](store)   # the retry: a first delivery
    assert result not in (False, None), result
    assert (await store.health())["ok"] is True
    sessions, _, _, seqs, claims = await _snapshot(store)
    await store.close()
    assert _on_disk(path) == (sessions, seqs, set(claims)), "memory and file disagree after the retry"


def _on_disk(path: Path) -> tuple:
    conn = sqlite3.connect(path)
    try:
        sessions = {sid: json.loads(data) for sid, data in conn.execute("SELECT call_sid, data FROM sessions")}
        seqs = [seq for (seq,) in conn.execute("SELECT seq FROM events ORDER BY seq")]
        claims = {key for (key,) in conn.execute("SELECT key FROM claims WHERE expires_at > ?", (time.time(),))}
    finally:
        conn.close()
    return sessions, seqs, claims


async def test_the_undo_bookkeeping_is_forgotten_with_the_calls(tmp_path):
    store = SQLiteStore(tmp_path / "prune.db")
    await store.open()
    for sid in ("CA-old", "CA-live"):
        await store.create_session(_session(sid))
    await store.transition("CA-old", Trigger.END, reason="twilio-completed")
    assert await store.prune(time.time() + 1) == 1
    assert set(store._changes) == {"CA-live"}
    await store.close()


async def test_health_recovers_by_itself_once_the_lock_is_released(tmp_path):
    """No write after the lock: /health must still come back (a load balancer sends no webhooks
    to an instance it marked down)."""
    from twivapi_cli.errors import StoreError
    path = tmp_path / "health.db"
    store = SQLiteStore(path, busy_timeout=0.1)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            await store.append(_event())
        started = time.monotonic()
        assert (await store.health())["ok"] is False
        assert time.monotonic() - started < 1.0, "health waited on the lock"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await store.health())["ok"] is True
    await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    assert not reopened._claims and not await reopened.events(0), "the probe left data behind"
    await reopened.close()


# --- disk full: a real full filesystem (tmpfs) --------------------------------------------------------

@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "2m"):
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("disk full on tmpfs: needs root to mount one (the RLIMIT_FSIZE test covers it portably)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"disk full on tmpfs: cannot mount one here ({done.stderr.strip() or done.returncode}); "
                    "the RLIMIT_FSIZE test covers it portably")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left (unbuffered: nothing pending on close)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_disk_full_on_a_real_filesystem_answers_503_then_recovers(clean_faults, tmp_path, monkeypatch):
    sims = clean_faults
    # No background checkpoint during the test: after one, the WAL is rewritten from its start in
    # space the file already has, and on a full disk those writes rightly succeed. Without it every
    # write appends, so the first write after the fill needs space, as the outage check assumes.
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_S", 1e6)
    with tiny_tmpfs(tmp_path / "tmpfs") as mount:
        path = mount / "full.db"
        with sqlite_bridge(sims, path, busy_timeout=0.2) as (bridge, hooks):
            before = new_call_sid()
            assert hooks.voice(before).status_code == 200
            filler = fill(mount)
            refused = new_call_sid()
            check_outage(hooks, refused, bound_s=2.0)
            filler.unlink()   # space freed
            check_recovered(hooks, refused, _ready(bridge))
        assert disk_sessions(path).get(refused) == "ended"


# --- disk full, portably: a file-size limit on a bridge subprocess ------------------------------------

FSIZE_BRIDGE = textwrap.dedent("""
    import json, os, resource, sys
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from twivapi_cli.bridge.app import create_app
    from twivapi_cli.bridge.server import _config, bind
    from twivapi_cli.cluster.local import LocalCluster
    from twivapi_cli.config import load_settings
    from twivapi_cli.store import sqlite as sqlite_store
    from twivapi_cli.store.sqlite import SQLiteStore
    from twivapi_cli.vapi_api import VapiClient
    import uvicorn

    env = json.loads(sys.argv[1])
    path = sys.argv[2]
    # no background checkpoint (see the tmpfs test): every write appends, so "full" refuses the next one
    sqlite_store.CHECKPOINT_EVERY_S = 1e6

    async def disk(request):
        # "full": no file may grow past its current size; "free": no limit
        action = request.path_params["action"]
        if action == "full":
            sizes = [os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)]
            resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), resource.RLIM_INFINITY))
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return JSONResponse({"limit": resource.getrlimit(resource.RLIMIT_FSIZE)[0]})

    settings = load_settings({}, environ=env, env_file=None)
    app = create_app(settings, SQLiteStore(path, busy_timeout=0.2), LocalCluster(),
                     VapiClient(settings.vapi_base_url, settings.vapi_api_key.reveal()),
                     extra_routes=[Route("/_test/disk/{action}", disk, methods=["POST"])])
    sock = bind()
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(_config(app, "127.0.0.1", sock.getsockname()[1], "warning")).run(sockets=[sock])
""")


def test_disk_full_by_file_size_limit_answers_503_then_recovers(clean_faults, tmp_path):
    sims = clean_faults
    path = tmp_path / "fsize.db"
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": "test-vapi-key", "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant_id, "TWIVAPI_PUBLIC_URL": PUBLIC, "VAPI_BASE_URL": sims.url}
    proc = subprocess.Popen([sys.executable, "-c", FSIZE_BRIDGE, json.dumps(env), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        hooks = Webhooks(f"http://127.0.0.1:{port}")
        wait_for(lambda: _get_ok(hooks), timeout=10, what="the subprocess bridge up")

        def ready(sid: str) -> bool:   # read the subprocess's state from its file
            return disk_sessions(path).get(sid) == "ready"

        before = new_call_sid()
        assert hooks.voice(before).status_code == 200
        wait_for(lambda: ready(before), what="a call before the disk filled")
        assert hooks.http.post("/_test/disk/full").status_code == 200
        refused = new_call_sid()
        check_outage(hooks, refused, bound_s=2.0)
        assert proc.poll() is None, "the bridge died when the disk filled"
        assert hooks.http.post("/_test/disk/free").status_code == 200
        check_recovered(hooks, refused, ready)
        wait_for(lambda: disk_sessions(path).get(refused) == "ended", what="the retried call on disk")
        hooks.close()
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert "store unavailable on /twilio/voice: SQLite write failed" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "internal_error" not in stderr and "unexpected error" not in stderr, stderr[-3000:]


def _get_ok(hooks: Webhooks) -> bool:
    try:
        return hooks.health().status_code == 200
    except httpx.HTTPError:
        return False
