"""Stream mode's Vapi setup pool: its concurrency follows the load, bounded by the setting.

Real bridge on uvicorn, the product's Vapi simulator with ``POST /call`` made slow (its latency
fault), a burst of signed voice webhooks at once. Asserted: who got a Vapi call, who got the
fallback, and how many setups were in flight at once (sampled on the bridge's own loop); no timings.
"""

from __future__ import annotations

import asyncio
import threading
import time

from twivapi_cli import net, signing
from twivapi_cli.models import CallState
from twivapi_cli.store.memory import MemoryStore

from .support import PUBLIC, TOKEN, bridge_settings, new_call_sid, running_bridge


def burst(bridge, count: int) -> list[str]:
    """``count`` voice webhooks at once; their TwiML answers."""
    async def go() -> list[str]:
        client = net.async_client(timeout=30)
        try:
            async def one() -> str:
                params = {"CallSid": new_call_sid(), "From": "+15551112222", "To": "+15553334444",
                          "CallStatus": "ringing"}
                signature = signing.twilio_signature(TOKEN, PUBLIC + "/twilio/voice", params)
                response = await client.post(bridge.url + "/twilio/voice", data=params,
                                             headers={"X-Twilio-Signature": signature})
                assert response.status_code == 200
                return params["CallSid"] + " " + response.text
            return await asyncio.gather(*(one() for _ in range(count)))
        finally:
            await client.aclose()
    return asyncio.run(go())


class InflightSampler:
    """The bridge's setups in flight, read on its own loop every few ms while a burst is served."""

    def __init__(self, bridge):
        self.bridge, self.peak, self._stop = bridge, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def read() -> int:
            return self.bridge.deps.setup.inflight
        while not self._stop.is_set():
            self.peak = max(self.peak, self.bridge.server.run(read))
            time.sleep(0.005)

    def __enter__(self) -> InflightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def set_up_all(bridge, sims, answers: list[str]) -> list[str]:
    """Wait until every call of the burst left setup; the CallSids that got a Vapi call."""
    sids = [a.split(" ", 1)[0] for a in answers]
    deadline = time.monotonic() + 60
    while any((s := bridge.session(sid)) is None or s.state in (CallState.RINGING, CallState.SETTING_UP)
              for sid in sids):
        assert time.monotonic() < deadline, "setups never finished"
        time.sleep(0.05)
    return [sid for sid in sids if sims.calls_for(sid)]


def test_a_burst_is_set_up_concurrently_well_past_a_fixed_pool(sims):
    sims.clear_faults()
    sims.slow_calls(1.0)   # Vapi at a real latency: 48 calls at once need 48 in flight to answer in time
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant())
    try:
        with running_bridge(settings, MemoryStore()) as bridge, InflightSampler(bridge) as sampler:
            answers = burst(bridge, 48)
            created = set_up_all(bridge, sims, answers)
    finally:
        sims.clear_faults()
    assert all("<Stream" in a for a in answers), "a caller got the fallback"
    assert len(created) == 48
    assert sampler.peak > 16, f"at most {sampler.peak} setups in flight: a fixed pool, not the load"


def test_setup_concurrency_is_bounded_by_the_setting(sims):
    sims.clear_faults()
    sims.slow_calls(0.3)
    settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=sims.assistant(), TWIVAPI_SETUP_CONCURRENCY="4")
    try:
        with running_bridge(settings, MemoryStore()) as bridge, InflightSampler(bridge) as sampler:
            answers = burst(bridge, 16)
            created = set_up_all(bridge, sims, answers)
    finally:
        sims.clear_faults()
    assert len(created) == 16                 # all of them, four at a time (16 x 0.3 s / 4 is well inside 8 s)
    assert 1 <= sampler.peak <= 4, sampler.peak
