"""`serve --workers N`: several bridge processes on one port, sharing Redis; refused (exit 2, saying
why) on a store the workers cannot share."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from twivapi_cli import signing
from twivapi_cli.cli import app
from twivapi_cli.sim.twilio_caller import CallerPlan
from twivapi_cli.store.redis import RedisStore

from .support import TOKEN, VAPI_KEY, VAPI_SECRET, free_port, new_call_sid, place_call, start_serve
from .test_store import redis_available

URL = "redis://127.0.0.1:6379/0"


@pytest.mark.redis
@pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379 (scripts/ensure-redis.sh)")
def test_two_workers_on_redis_serve_webhooks_and_a_media_call(sims, tmp_path):
    prefix = f"twivapi-test:{uuid.uuid4().hex[:8]}:"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": sims.assistant(behavior="echo"), "VAPI_BASE_URL": sims.url,
           "TWIVAPI_PUBLIC_URL": url, "TWIVAPI_STORE": URL, "TWIVAPI_REDIS_PREFIX": prefix,
           "TWIVAPI_STATE_DIR": str(tmp_path / "state"), "TWIVAPI_DRAIN_TIMEOUT": "1"}
    proc = start_serve(env, port, "--workers", "2", timeout=30)
    try:
        # both workers answer on the one port: new connections are spread over them by the kernel
        instances: set[str] = set()
        for _ in range(40):
            with httpx.Client() as fresh:   # a new connection (a new source port) each time
                instances.add(fresh.get(url + "/health").json()["instance"])
            if len(instances) == 2:
                break
        assert len(instances) == 2, f"one worker served every connection: {instances}"

        # a media call end to end (its webhook on one worker, its stream perhaps on the other)
        audio = bytes([0x55]) * 160 * 50   # 1 s
        result = place_call(url, CallerPlan(audio=audio, hangup_after_s=2.5))
        assert not result.errors, result.errors
        assert result.stream_sid is not None
        assert bytes(audio[1600:1920]) in bytes(result.heard)   # the echo came back through the bridge
        sid = result.call_sid
        assert len(sims.calls_for(sid)) == 1

        # Twilio's webhook again (its retry), over a fresh connection: the shared store says it exists
        params = {"CallSid": sid, "From": "+15551112222", "To": "+15553334444", "CallStatus": "ringing"}
        for _ in range(4):
            with httpx.Client() as fresh:
                again = fresh.post(url + "/twilio/voice", data=params, headers={
                    "X-Twilio-Signature": signing.twilio_signature(TOKEN, url + "/twilio/voice", params)})
            assert again.status_code == 200
        assert len(sims.calls_for(sid)) == 1   # created once, whichever worker answered
        other = new_call_sid()
        params["CallSid"] = other
        with httpx.Client() as fresh:
            assert fresh.post(url + "/twilio/voice", data=params, headers={
                "X-Twilio-Signature": signing.twilio_signature(TOKEN, url + "/twilio/voice", params)}).status_code == 200

        proc.send_signal(signal.SIGTERM)   # the supervisor passes it on: each worker drains and exits
        assert proc.wait(30) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()

        async def clean() -> None:
            store = RedisStore(URL, prefix=prefix)
            await store.delete_all()
            await store.close()
        asyncio.run(clean())


@pytest.mark.parametrize("store, named", [("sqlite:///x.db", "SQLite store"), ("memory://", "memory store")])
def test_workers_on_a_store_they_cannot_share_exit_2_saying_why(store, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": "asst", "TWIVAPI_STORE": store}
    result = CliRunner().invoke(app, ["serve", "--workers", "2", "--port", str(free_port())], env=env)
    assert result.exit_code == 2, result.output
    assert named in result.output and "--workers 2" in result.output and "redis://" in result.output
    assert not (tmp_path / "x.db").exists()   # nothing was started
