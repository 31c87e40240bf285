"""Several bridge instances sharing one Redis: webhooks for one call spread across them, barge-in
from another instance, concurrent moves of one call, a lost instance, and Redis going away."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid

import httpx
import pytest

from twivapi_cli import audio
from twivapi_cli.models import CallState, Session
from twivapi_cli.sim.twilio_caller import CallerPlan, SimulatedCaller
from twivapi_cli.store.redis import RedisStore

from .sims import running_sims
from .support import TOKEN, bridge_settings, new_call_sid, running_bridge
from .test_store import redis_available

pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379 (scripts/ensure-redis.sh)")]
URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def sims():
    with running_sims() as running:
        yield running


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
        assert b.status(sid, "in-progress", sequence=1).status_code == 204
        assert a.status(sid, "completed", sequence=3).status_code == 204
        assert b.status(sid, "ringing", sequence=0).status_code == 204     # stale, on yet another path
        assert a.session(sid).state == CallState.ENDED and b.session(sid).state == CallState.ENDED
        types = [e.type for e in a.events(sid)]
        assert types == [e.type for e in b.events(sid)]   # one shared, merged event log
        assert "twilio.status.stale" in types


def test_barge_in_webhook_on_one_instance_clears_the_media_on_another(sims, prefix):
    assistant = sims.assistant(greeting_ms=4000)
    a_ctx, b_ctx = two_bridges(sims, prefix, assistant, public_from_server=True)
    with a_ctx as a, b_ctx as b:
        caller = SimulatedCaller(TOKEN)
        sid = new_call_sid()

        async def call():
            try:
                return await caller.call(a.url + "/twilio/voice", plan=CallerPlan(hangup_after_s=2.0), call_sid=sid)
            finally:
                await caller.aclose()

        async def interrupt_via_b():
            await asyncio.sleep(1.0)
            return await asyncio.to_thread(b.vapi, {"type": "user-interrupted", "turnId": "t",
                                                    "call": {"phoneCallProviderId": sid}})

        async def both():
            return await asyncio.gather(call(), interrupt_via_b())

        result, response = asyncio.run(both())
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
            try:
                await store.transition("CA1", CallState.ENDED, reason=reason)
                return reason
            except Exception:
                return None
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
        ended = a.server.run(lambda: a.app.state.registry.sweep())
        assert ended >= 1
        session = a.session(sid)
        assert session.state == CallState.ENDED and session.ended_reason == "instance-lost"
        assert not [s for s in a.server.run(lambda: a.app.state.store.active_sessions()) if s.call_sid == sid]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_down_gives_503_quickly_and_the_bridge_recovers(sims, tmp_path):
    port = _free_port()
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant())
    with running_bridge(settings, RedisStore(f"redis://127.0.0.1:{port}/0", prefix="outage:")) as bridge:
        started = time.monotonic()
        refused = bridge.voice(new_call_sid())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 3
        health = httpx.get(bridge.url + "/health")
        assert health.status_code == 503 and health.json()["store"]["ok"] is False
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        try:
            settle(lambda: httpx.get(bridge.url + "/health").status_code == 200, timeout=10)
            assert bridge.voice(new_call_sid()).status_code == 200   # recovered by itself
        finally:
            server.terminate()
            server.wait(5)
