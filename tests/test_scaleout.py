"""Several bridge instances sharing one Redis: webhooks for one call spread across them, barge-in
from another instance, concurrent moves of one call, a lost instance, and Redis going away."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount

from twivapi_cli import signing
from twivapi_cli import tail as tail_lib
from twivapi_cli.bridge.admin import create_admin_app
from twivapi_cli.models import CallState, Session, Trigger
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.redis import RedisStore

from .support import (
    TOKEN,
    VAPI_KEY,
    VAPI_SECRET,
    bridge_settings,
    dial,
    free_port,
    new_call_sid,
    place_call,
    reap,
    running_bridge,
    start_serve,
)
from .test_store import redis_available

pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379 (scripts/ensure-redis.sh)")]
URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix():
    value = f"twivapi-test:{uuid.uuid4().hex[:8]}:"
    yield value
    async def clean():
        store = RedisStore(URL, prefix=value)
        await store.delete_all()
        await store.close()
    asyncio.run(clean())


def settle(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def two_bridges(sims, prefix, assistant, *, public_from_server=False):
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant)
    return (running_bridge(settings, RedisStore(URL, prefix=prefix), public_from_server=public_from_server),
            running_bridge(settings, RedisStore(URL, prefix=prefix), public_from_server=public_from_server))


def test_webhooks_for_one_call_alternate_across_instances(sims, prefix):
    a_ctx, b_ctx = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a, b_ctx as b:
        sid = new_call_sid()
        assert a.voice(sid).status_code == 200
        settle(lambda: b.session(sid) is not None and b.session(sid).state == CallState.READY)
        assert b.voice(sid).status_code == 200      # Twilio's retry lands on the other instance
        assert len(sims.calls_for(sid)) == 1          # ...and creates nothing twice
        assert a.status(sid, "in-progress", sequence=1).status_code == 204
        assert b.status(sid, "completed", sequence=3).status_code == 204
        assert a.status(sid, "ringing", sequence=0).status_code == 204     # stale, on yet another path
        assert a.session(sid).state == CallState.ENDED and b.session(sid).state == CallState.ENDED
        # A set the call up; B ended it: A forgets its wait state for the call all the same
        settle(lambda: not a.deps.signals.waiting(sid))
        types = [e.type for e in a.events(sid)]
        assert types == [e.type for e in b.events(sid)]   # one shared, merged event log
        assert "twilio.status.stale" in types


def _call_on_a_interrupted_via_b(a, b, sid: str, *, hangup_after_s: float, interrupt_after_s: float):
    """A simulated call whose media socket is on A, and a `user-interrupted` webhook sent to B while
    it plays: (the caller's result, B's answer to the webhook)."""
    async def interrupt_via_b():
        await asyncio.sleep(interrupt_after_s)
        return await asyncio.to_thread(b.vapi, {"type": "user-interrupted", "turnId": "t",
                                                "call": {"phoneCallProviderId": sid}})

    async def both():
        return await asyncio.gather(
            dial(a.url, CallerPlan(hangup_after_s=hangup_after_s), status_callback=False, call_sid=sid),
            interrupt_via_b())
    return asyncio.run(both())


def test_barge_in_webhook_on_one_instance_clears_the_media_on_another(sims, prefix):
    assistant = sims.assistant(greeting_ms=4000)
    a_ctx, b_ctx = two_bridges(sims, prefix, assistant, public_from_server=True)
    with a_ctx as a, b_ctx as b:
        sid = new_call_sid()
        result, response = _call_on_a_interrupted_via_b(a, b, sid, hangup_after_s=3.0, interrupt_after_s=2.0)
        assert response.status_code == 200
        assert len(result.clears) == 1, result.timeline
        clears = [e for e in a.events(sid) if e.type == "media.clear"]
        assert clears and clears[0].data["source"] == "webhook"


def test_concurrent_transitions_from_two_instances_one_wins(prefix):
    async def run():
        one, two = RedisStore(URL, prefix=prefix), RedisStore(URL, prefix=prefix)
        await one.open()
        await two.open()
        await one.create_session(Session("CA1", "stream"))

        async def end(store, reason):
            return reason if (await store.transition("CA1", Trigger.END, reason=reason)).moved else None
        winners = [w for w in await asyncio.gather(*(end(one if i % 2 else two, f"r{i}") for i in range(40))) if w]
        session = await one.get_session("CA1")
        await one.close()
        await two.close()
        return winners, session
    winners, session = asyncio.run(run())
    assert len(winners) == 1 and session.ended_reason == winners[0]


def test_calls_of_a_lost_instance_are_ended_with_the_reason(sims, prefix):
    a_ctx, _ = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a:
        sid = new_call_sid()

        async def orphan():
            store = RedisStore(URL, prefix=prefix)
            await store.open()
            await store.create_session(Session(sid, "stream", instance="ghost-instance"))   # no heartbeat: gone
            await store.close()
        asyncio.run(orphan())
        ended = a.server.run(lambda: a.deps.sweeper.sweep())
        assert ended >= 1
        session = a.session(sid)
        assert session.state == CallState.ENDED and session.ended_reason == "instance-lost"
        assert not [s for s in a.server.run(lambda: a.deps.store.active_sessions()) if s.call_sid == sid]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_down_gives_503_quickly_and_the_bridge_recovers(sims, tmp_path):
    port = free_port()
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant())

    def start_redis():
        return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)

    with running_bridge(settings, RedisStore(f"redis://127.0.0.1:{port}/0", prefix="outage:")) as bridge:
        # down from the start: the bridge still starts and says so
        started = time.monotonic()
        refused = bridge.voice(new_call_sid())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 3
        health = httpx.get(bridge.url + "/health")
        assert health.status_code == 503 and health.json()["store"]["ok"] is False
        server = start_redis()
        try:
            settle(lambda: httpx.get(bridge.url + "/health").status_code == 200, timeout=10)
            live = new_call_sid()
            assert bridge.voice(live).status_code == 200   # recovered by itself
            # restarted mid-run (it keeps nothing on disk): 503s while down, then serving again
            server.terminate()
            server.wait(5)
            started = time.monotonic()
            assert bridge.status(live, "in-progress", sequence=1).status_code == 503
            assert time.monotonic() - started < 3
            server = start_redis()
            settle(lambda: httpx.get(bridge.url + "/health").status_code == 200, timeout=10)
            assert bridge.voice(new_call_sid()).status_code == 200
            assert bridge.vapi({"type": "hang", "call": {"phoneCallProviderId": live}}).status_code == 200
        finally:
            server.terminate()
            server.wait(5)


def _ready_call(bridge) -> tuple[str, str]:
    sid = new_call_sid()
    assert bridge.voice(sid).status_code == 200
    settle(lambda: (s := bridge.session(sid)) is not None and s.state == CallState.READY)
    return sid, bridge.session(sid).vapi_call_id


def _listen(bridge, sid, listener) -> None:
    async def add():
        bridge.deps.signals.listen(sid, listener)
    bridge.server.run(add)


def test_one_calls_messages_are_applied_in_order_across_instances(sims, prefix):
    a_ctx, b_ctx = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a, b_ctx as b:
        sid, vapi_id = _ready_call(a)
        heard: list[int] = []

        async def slow_media_socket(kind, data):   # the media socket's side, on A, slower than the webhooks
            if kind == "speech":
                heard.append(data["turn"])
                await asyncio.sleep(0.01)

        _listen(a, sid, slow_media_socket)
        for turn in range(40):   # as Vapi sends them: one after another, each acknowledged first
            bridge = a if turn % 2 else b
            response = bridge.vapi({"type": "speech-update", "role": "assistant", "status": "started",
                                    "turn": turn, "call": {"id": vapi_id}})
            assert response.status_code == 200
        settle(lambda: len(heard) == 40, timeout=10)
        assert heard == list(range(40))
        settle(lambda: all(e.processed_at for e in a.events(sid) if e.type == "vapi.speech-update"))
        updates = [e for e in a.events(sid) if e.type == "vapi.speech-update"]
        processed = [e.processed_at for e in updates]
        assert processed == sorted(processed)   # applied in the order they were acknowledged


def test_a_message_parked_on_one_instance_is_applied_when_the_call_appears_on_another(sims, prefix):
    a_ctx, b_ctx = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a, b_ctx as b:
        sid = new_call_sid()
        early = b.vapi({"type": "status-update", "status": "ended", "endedReason": "early-bird",
                        "call": {"id": uuid.uuid4().hex, "phoneCallProviderId": sid}})
        assert early.status_code == 200 and a.session(sid) is None
        assert a.voice(sid).status_code == 200     # the session appears on the other instance
        settle(lambda: (s := a.session(sid)) is not None and s.state == CallState.ENDED)
        assert a.session(sid).ended_reason == "early-bird"
        assert "vapi.parked" in [e.type for e in a.events(sid)]


def test_media_socket_on_one_instance_voice_webhook_on_another(sims, prefix):
    """Twilio's voice webhook reaches B (which sets up the Vapi call); the media socket reaches A,
    which learns from B that the call is ready, relays audio, and hears B's barge-in."""
    a_ctx, _ = two_bridges(sims, prefix, sims.assistant(greeting_ms=4000), public_from_server=True)
    with a_ctx as a:
        settings_b = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(greeting_ms=4000),
                                     TWIVAPI_PUBLIC_URL=a.url)   # B's TwiML sends the stream to A
        with running_bridge(settings_b, RedisStore(URL, prefix=prefix)) as b:
            sid = new_call_sid()
            # B gets the voice webhook and sets up the Vapi call (slowly); Twilio's retry of the same
            # webhook reaches A, whose media socket then waits for B's setup.
            sims.slow_calls(0.8, count=1)
            params = {"CallSid": sid, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
            assert b.twilio("/twilio/voice", params, signed_url=a.url + "/twilio/voice").status_code == 200
            # the interruption comes well after the slow setup (0.8 s + POST /call's own hundreds of ms)
            result, response = _call_on_a_interrupted_via_b(a, b, sid, hangup_after_s=3.5, interrupt_after_s=2.5)
            assert response.status_code == 200
            assert len(result.heard) > 1600 and not result.errors, result.timeline   # greeting heard (200 ms+)
            assert len(result.clears) == 1, result.timeline
            events = a.events(sid)
            assert [e.data["source"] for e in events if e.type == "media.clear"] == ["webhook"]
            assert [e for e in events if e.type == "vapi.call-created"][0].data["setup_ms"] is not None
            assert len(sims.calls_for(sid)) == 1


def test_tail_against_either_instance_shows_one_merged_live_view(sims, prefix):
    a_ctx, b_ctx = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a, b_ctx as b:
        # the admin app on A's own event loop, as `serve` runs it (a Redis client belongs to one loop)
        a.app.router.routes.append(Mount("/admin", create_admin_app(a.app, "tok")))
        admin_url = a.url + "/admin"
        sids = [new_call_sid() for _ in range(4)]

        async def watch():
            seen: list[dict] = []
            agen = tail_lib.follow(tail_lib.Target(admin_url, "tok"), tail_lib.Filters(type="twilio.voice"))
            async for item in agen:
                if isinstance(item, tail_lib.Notice):
                    for i, sid in enumerate(sids):   # live, after tail connected, half of them on B
                        await asyncio.to_thread((b if i % 2 else a).voice, sid)
                    continue
                seen.append(item)
                if len(seen) == len(sids):
                    break
            await agen.aclose()
            return seen
        seen = asyncio.run(asyncio.wait_for(watch(), 15))
        assert [e["call_sid"] for e in seen] == sids
        assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)


def _serve(port: int, prefix: str, sims, public: str, state: Path) -> subprocess.Popen:
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant(greeting_ms=30000), "VAPI_BASE_URL": sims.url,
           "TWIVAPI_PUBLIC_URL": public, "TWIVAPI_STORE": URL, "TWIVAPI_REDIS_PREFIX": prefix,
           "TWIVAPI_STATE_DIR": str(state)}
    return start_serve(env, port)


def test_an_instance_killed_mid_call_its_calls_end_with_the_reason_and_the_other_answers(sims, prefix, tmp_path):
    port_a, port_b = (free_port(), free_port())
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    proc_a = _serve(port_a, prefix, sims, url_a, tmp_path / "a")
    proc_b = _serve(port_b, prefix, sims, url_b, tmp_path / "b")
    sid = new_call_sid()

    def read(what):
        async def go():
            store = RedisStore(URL, prefix=prefix)
            try:
                return await what(store)
            finally:
                await store.close()
        return asyncio.run(go())

    def session():
        return read(lambda store: store.get_session(sid))

    def run_call():
        try:
            outcome.append(place_call(url_a, CallerPlan(hangup_after_s=30), status_callback=False, call_sid=sid))
        except Exception as exc:   # its next webhook to the dead instance fails: expected
            outcome.append(exc)

    outcome: list = []
    caller = threading.Thread(target=run_call, daemon=True)
    try:
        caller.start()
        settle(lambda: (s := session()) is not None and s.state == CallState.ACTIVE and s.stream_sid, timeout=15)
        owner = session().instance
        proc_a.send_signal(signal.SIGKILL)    # the instance holding the media socket dies
        proc_a.wait(5)
        caller.join(10)
        assert outcome and not caller.is_alive()   # the caller's socket went down with it
        params = {"CallSid": sid, "CallStatus": "in-progress", "SequenceNumber": "5"}
        answer = httpx.post(url_b + "/twilio/status", data=params,
                            headers={"X-Twilio-Signature": signing.twilio_signature(TOKEN, url_b + "/twilio/status",
                                                                                    params)})
        assert answer.status_code == 204          # B keeps answering for the call
        settle(lambda: session().state == CallState.ENDED, timeout=25)   # heartbeat TTL + a sweep
        ended = session()
        assert ended.ended_reason == "instance-lost" and ended.instance == owner
        assert sid not in [s.call_sid for s in read(lambda store: store.active_sessions())]
        settle(lambda: sims.ended(ended.vapi_call_id), timeout=5)   # the Vapi side was ended too
    finally:
        for proc in (proc_a, proc_b):
            reap(proc)


def test_a_vapi_retry_on_the_other_instance_is_applied_once(sims, prefix):
    a_ctx, b_ctx = two_bridges(sims, prefix, sims.assistant())
    with a_ctx as a, b_ctx as b:
        sid, vapi_id = _ready_call(a)
        heard: list[str] = []

        async def listener(kind, data):
            heard.append(kind)

        _listen(a, sid, listener)
        message = {"type": "user-interrupted", "turnId": "t1", "timestamp": 1724000001000,
                   "call": {"id": vapi_id, "phoneCallProviderId": sid}}
        assert a.vapi(message).status_code == 200 and b.vapi(message).status_code == 200
        settle(lambda: "vapi.duplicate" in [e.type for e in a.events(sid)])
        time.sleep(0.1)
        assert heard == ["interrupt"]
