"""The bridge's HTTP routes over real uvicorn, real HTTP and real SQLite."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from twivapi_cli.models import CallState, Trigger
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.store.sqlite import SQLiteStore

from .support import PUBLIC, TOKEN, bridge_settings, in_process_bridge, new_call_sid, running_bridge


@pytest.fixture(scope="module")
def sims(sims):
    sims.assistant_id = sims.assistant()
    sims.phone_number_id = sims.phone_number()
    return sims


@pytest.fixture
def vapi(sims):
    sims.clear_faults()
    yield sims
    sims.clear_faults()


def settings_for(sims, **extra):
    return bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant_id,
                           VAPI_PHONE_NUMBER_ID=sims.phone_number_id, **extra)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def bridge(vapi, tmp_path):
    with running_bridge(settings_for(vapi), SQLiteStore(tmp_path / "b.db")) as b:
        yield b


@pytest.fixture
def quick(vapi, tmp_path):
    """The same bridge called in-process: for the cases where no socket matters."""
    with in_process_bridge(settings_for(vapi), SQLiteStore(tmp_path / "q.db")) as b:
        yield b


def test_stream_mode_answers_connect_stream_and_creates_the_vapi_call(bridge, vapi):
    sid = new_call_sid()
    response = bridge.voice(sid)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert '<Stream url="wss://bridge.example.test/twilio/media">' in response.text
    assert f'<Parameter name="callSid" value="{sid}" />' in response.text
    session = wait_for(lambda: (s := bridge.session(sid)) and s.state == CallState.READY and s)
    assert session.vapi_call_id
    created = vapi.calls_for(sid)
    assert created[0]["id"] == session.vapi_call_id
    assert created[0]["transport"]["audioFormat"] == {"format": "mulaw", "container": "raw", "sampleRate": 8000}


def test_a_ready_call_that_no_socket_waits_for_keeps_no_wait_state(bridge, vapi):
    """Only a media socket that waits has a ready event: a call whose stream never opens (or has not
    yet) keeps nothing per call until it ends, and a socket that comes later still sees it ready."""
    sid = new_call_sid()
    assert bridge.voice(sid).status_code == 200
    wait_for(lambda: bridge.session(sid).state == CallState.READY)
    assert not bridge.deps.signals.waiting(sid)
    session = bridge.server.run(lambda: bridge.deps.signals.wait_ready(sid, 1.0))
    assert session is not None and session.state == CallState.READY


def test_a_move_while_the_socket_reads_its_session_still_wakes_it(monkeypatch):
    """A store whose read waits (Redis): the call becomes ready while a media socket's first read is
    on its way and comes back stale. The socket's ready event exists before that read, so the move
    sets it and the socket looks again at once, not after the poll (made an hour here)."""
    from twivapi_cli.bridge import signals as signals_module
    from twivapi_cli.cluster.local import LocalCluster
    from twivapi_cli.models import Session
    from twivapi_cli.store.memory import MemoryStore
    monkeypatch.setattr(signals_module, "READY_POLL_S", 3600.0)

    class SlowFirstRead(MemoryStore):
        reads = 0
        moved: asyncio.Event

        async def get_session(self, call_sid):
            stale = await super().get_session(call_sid)   # what the read sees...
            self.reads += 1
            if self.reads == 1:
                await self.moved.wait()                    # ...and gives back after the move
            return stale

    async def go():
        store = SlowFirstRead()
        store.moved = moved = asyncio.Event()
        signals = signals_module.Signals(store, LocalCluster())
        await store.create_session(Session("CA1", "stream", state=CallState.SETTING_UP))
        waiter = asyncio.create_task(signals.wait_ready("CA1", timeout=60))
        await asyncio.sleep(0)                             # one turn: the socket's first read is under way
        assert store.reads == 1 and not waiter.done()
        await store.transition("CA1", Trigger.VAPI_CALL_CREATED)
        await signals.state_changed("CA1", CallState.READY)
        moved.set()
        session = await asyncio.wait_for(waiter, 10)
        return session.state, signals.waiting("CA1")

    assert asyncio.run(go()) == (CallState.READY, True)   # it still waits for the call's end to forget it


def test_the_collector_is_tuned_for_the_bridge():
    """serve's start: start-up's objects frozen out of every collection, young collections far rarer
    than CPython's 700 allocations, full ones rarer than its 10 middle ones (in a fresh interpreter:
    the thresholds are process-wide)."""
    import subprocess
    import sys

    from twivapi_cli.bridge.server import GC_FULL_EVERY, GC_YOUNG
    script = ("import gc, json; from twivapi_cli.bridge.server import tune_gc; before = gc.get_threshold(); "
              "tune_gc(); print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))")
    before, after, frozen = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                                      text=True, check=True).stdout)
    assert after == [GC_YOUNG, before[1], GC_FULL_EVERY]
    assert after[0] >= 10 * before[0] and after[2] > before[2] and frozen > 10_000


def test_voice_webhook_answers_before_vapi_does(bridge, vapi):
    vapi.slow_calls(4.0)
    sid = new_call_sid()
    started = time.monotonic()
    response = bridge.voice(sid)
    assert response.status_code == 200 and "<Connect" in response.text
    assert time.monotonic() - started < 3.0  # did not wait for the 4 s Vapi call (a margin for a slow machine)
    assert bridge.session(sid).state != CallState.READY
    wait_for(lambda: bridge.session(sid).state == CallState.READY, timeout=15)


def test_bad_signature_is_403_with_reason_logged_and_never_the_expected_signature(quick, caplog):
    sid = new_call_sid()
    with caplog.at_level(logging.WARNING, "twivapi.bridge"):
        response = quick.twilio("/twilio/voice", {"CallSid": sid}, token="wrong-token")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "bad_signature"
    assert "wrong TWILIO_AUTH_TOKEN" in caplog.text
    assert quick.session(sid) is None


def test_missing_signature_is_403(quick):
    response = quick.http.post(quick.url + "/twilio/voice", data={"CallSid": new_call_sid()})
    assert response.status_code == 403


def test_url_mismatch_is_diagnosed_but_still_refused(quick, caplog):
    sid = new_call_sid()
    local_url = quick.url + "/twilio/voice"  # what a naive app would validate against
    with caplog.at_level(logging.WARNING, "twivapi.bridge"):
        response = quick.twilio("/twilio/voice", {"CallSid": sid}, signed_url=local_url)
    assert response.status_code == 403
    assert f"signature is valid for {local_url}" in caplog.text
    assert "TWIVAPI_PUBLIC_URL" in caplog.text


def test_forwarded_host_mismatch_is_diagnosed(quick, caplog):
    params = {"CallSid": new_call_sid()}
    with caplog.at_level(logging.WARNING, "twivapi.bridge"):
        response = quick.twilio("/twilio/voice", params, signed_url="https://other.ngrok.app/twilio/voice",
                                 headers={"X-Forwarded-Host": "other.ngrok.app", "X-Forwarded-Proto": "https"})
    assert response.status_code == 403
    assert "valid for https://other.ngrok.app/twilio/voice" in caplog.text


def test_json_body_with_body_sha256_is_accepted(quick):
    from twivapi_cli import signing

    sid = new_call_sid()
    body = json.dumps({"CallSid": sid, "From": "+15550001111"}).encode()
    url, sig = signing.sign_twilio_json(TOKEN, PUBLIC + "/twilio/voice", body)
    path_qs = url[len(PUBLIC):]
    ok = quick.http.post(quick.url + path_qs, content=body,
                    headers={"X-Twilio-Signature": sig, "content-type": "application/json"})
    assert ok.status_code == 200 and "<Connect" in ok.text
    tampered = quick.http.post(quick.url + path_qs, content=body.replace(b"+1555", b"+1666"),
                          headers={"X-Twilio-Signature": sig, "content-type": "application/json"})
    assert tampered.status_code == 403


@pytest.mark.parametrize("params, code", [
    ({"From": "+1555"}, "missing_field"),
    ({"CallSid": "not-a-sid"}, "invalid_field"),
])
def test_malformed_voice_webhooks_are_4xx(quick, params, code):
    response = quick.twilio("/twilio/voice", params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_oversized_and_non_utf8_bodies_are_4xx(quick):
    huge = quick.http.post(quick.url + "/twilio/voice", content=b"a=" + b"x" * (1024 * 1024 + 10),
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    garbage = quick.http.post(quick.url + "/twilio/voice", content=b"\xff\xfe=\x80",
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert garbage.status_code == 400
    assert quick.url and quick.http.get(quick.url + "/health").status_code == 200


def test_status_completed_ends_session_and_closes_vapi_side(bridge, vapi):
    sid = new_call_sid()
    bridge.voice(sid)
    session = wait_for(lambda: (s := bridge.session(sid)) and s.state == CallState.READY and s)
    assert bridge.status(sid, "completed").status_code == 204
    ended = bridge.session(sid)
    assert ended.state == CallState.ENDED and ended.ended_reason == "twilio-completed"
    wait_for(lambda: vapi.ended(session.vapi_call_id))


@pytest.mark.parametrize("status", ["busy", "no-answer", "canceled", "failed"])
def test_every_terminal_status_ends_the_session(bridge, status):
    sid = new_call_sid()
    bridge.voice(sid)
    bridge.status(sid, status)
    assert bridge.session(sid).state == CallState.ENDED


def test_out_of_order_status_callbacks_do_not_resurrect_a_call(bridge):
    sid = new_call_sid()
    bridge.voice(sid)
    assert bridge.status(sid, "completed", sequence=3).status_code == 204
    assert bridge.status(sid, "in-progress", sequence=1).status_code == 204
    assert bridge.session(sid).state == CallState.ENDED
    types = [e.type for e in bridge.events(sid)]
    assert "twilio.status.stale" in types


def test_retried_status_callback_is_processed_once(bridge):
    sid = new_call_sid()
    bridge.voice(sid)
    token = "idem-" + sid
    for _ in range(3):
        assert bridge.status(sid, "completed", **{"I-Twilio-Idempotency-Token": token}).status_code == 204
    types = [e.type for e in bridge.events(sid)]
    assert types.count("twilio.status") == 1
    assert types.count("twilio.status.duplicate") == 2
    assert [e.data.get("state") for e in bridge.events(sid) if e.type == "state"].count("ended") == 1


def test_hangup_before_vapi_is_ready_closes_the_late_vapi_call(bridge, vapi):
    vapi.slow_calls(0.5)
    sid = new_call_sid()
    bridge.voice(sid)
    bridge.status(sid, "completed")  # caller hangs up while POST /call is in flight
    events = wait_for(lambda: [e for e in bridge.events(sid) if e.type == "race.hangup-before-ready"])
    vapi_id = events[0].data["vapi_call_id"]
    wait_for(lambda: vapi.ended(vapi_id))
    assert bridge.session(sid).state == CallState.ENDED


def test_vapi_failure_gives_failed_session_and_fallback_after_stream(bridge, vapi):
    vapi.failing_calls(500)
    sid = new_call_sid()
    bridge.voice(sid)
    wait_for(lambda: bridge.session(sid).state == CallState.FAILED)
    after = bridge.twilio("/twilio/after-stream", {"CallSid": sid})
    assert "<Say>" in after.text and "<Hangup />" in after.text


def test_concurrent_calls_do_not_share_state(bridge):
    import concurrent.futures

    sids = [new_call_sid() for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(bridge.voice, sids))
    bridge.status(sids[0], "completed")
    wait_for(lambda: all(bridge.session(s).state == CallState.READY for s in sids[1:]))
    assert bridge.session(sids[0]).state == CallState.ENDED
    vapi_ids = {bridge.session(s).vapi_call_id for s in sids[1:]}
    assert len(vapi_ids) == len(sids) - 1


def test_health_reports_active_sessions_without_call_data(bridge):
    sid = new_call_sid()
    bridge.voice(sid)
    health = httpx.get(bridge.url + "/health").json()
    assert health["status"] == "ok" and health["active_sessions"] >= 1
    assert sid not in json.dumps(health) and TOKEN not in json.dumps(health)


def test_unknown_route_and_method_use_the_json_error_shape(bridge):
    assert httpx.get(bridge.url + "/nope").json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert httpx.get(bridge.url + "/twilio/voice").json()["error"]["code"] == "method_not_allowed"


# --- bypass and native modes --------------------------------------------------------------------

def test_bypass_mode_returns_vapis_twiml(vapi, tmp_path):
    with running_bridge(settings_for(vapi, TWIVAPI_MODE="bypass"), MemoryStore()) as b:
        sid = new_call_sid()
        response = b.voice(sid)
        call = vapi.calls_for(sid)[0]
        assert response.status_code == 200
        assert response.text == call["phoneCallProviderDetails"]["twiml"] and "<Connect><Stream" in response.text
        assert call["phoneCallProviderBypassEnabled"] is True and call["customer"] == {"number": "+15551112222"}
        retry = b.voice(sid)  # Twilio's retry: same answer, no second Vapi call
        assert retry.text == response.text
        assert len(vapi.calls_for(sid)) == 1


def test_bypass_mode_times_out_into_fallback(vapi):
    vapi.slow_calls(2.0)
    settings = settings_for(vapi, TWIVAPI_MODE="bypass", TWIVAPI_BYPASS_TIMEOUT="0.3")
    with running_bridge(settings, MemoryStore()) as b:
        sid = new_call_sid()
        started = time.monotonic()
        response = b.voice(sid)
        assert time.monotonic() - started < 1.5
        assert response.status_code == 200 and "<Say>" in response.text and "<Hangup />" in response.text
        assert b.session(sid).state == CallState.FAILED


def test_native_mode_answers_a_notice(vapi):
    with running_bridge(settings_for(vapi, TWIVAPI_MODE="native"), MemoryStore()) as b:
        response = b.voice(new_call_sid())
        assert response.status_code == 200 and "<Say>" in response.text and "<Connect" not in response.text


def test_setup_queue_bound_answers_fallback_instead_of_queueing_forever(vapi):
    vapi.slow_calls(1.0)
    settings = settings_for(vapi, TWIVAPI_SETUP_QUEUE_LIMIT="1")
    with running_bridge(settings, MemoryStore()) as b:
        import concurrent.futures
        sids = [new_call_sid() for _ in range(40)]  # 16 workers busy + 1 queued, the rest refused
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(b.voice, sids))
        fallbacks = [r for r in answers if "<Say>" in r.text]
        assert fallbacks, "past the bound callers must get the fallback"
        assert all(r.status_code == 200 for r in answers)


@pytest.mark.parametrize("base, sid", [("https://bridge.example/", "CA" + "a" * 32),
                                       ('https://a&b.example/p?x="1"', 'CA"<&>\'')])
def test_the_cached_stream_twiml_is_what_the_twiml_builder_writes(base, sid):
    from twilio.twiml.voice_response import VoiceResponse

    from twivapi_cli.bridge.twilio_hooks import stream_twiml
    from twivapi_cli.signing import STREAM_TOKEN_PARAM, stream_token
    from twivapi_cli.twilio_media import ws_url
    response = VoiceResponse()
    connect = response.connect(action=base.rstrip("/") + "/twilio/after-stream", method="POST")
    stream = connect.stream(url=ws_url(base.rstrip("/")) + "/twilio/media")
    stream.parameter(name="callSid", value=sid)
    stream.parameter(name=STREAM_TOKEN_PARAM, value=stream_token("tok", sid))
    for _ in range(2):   # built once, filled in each time
        assert stream_twiml(base, sid, "tok") == str(response)
