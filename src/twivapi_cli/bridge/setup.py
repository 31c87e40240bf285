"""Stream mode's Vapi call setup in the background: concurrency that follows the load.

``POST /call`` takes hundreds of milliseconds at Vapi, so by Little's law a burst of R calls/s
keeps R x latency setups in flight (100/s at 800 ms: 80). Each setup gets a task of its own, at
most ``TWIVAPI_SETUP_CONCURRENCY`` at once (the Vapi client's one connection pool is sized to
match); the rest wait, at most ``TWIVAPI_SETUP_QUEUE_LIMIT`` of them. Past that limit, or once a
setup waited ``SETUP_DEADLINE``, the caller gets the fallback rather than waiting behind others.
A 429 from Vapi means the call was not created: it is tried again after a jittered backoff (or
Vapi's Retry-After), while the deadline allows; any other failure is final (a second attempt could
create a second call).

Setup acknowledges nothing to anyone, so its writes are queued in order without waiting for each
commit (``durable=False``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from ..config import Settings
from ..errors import TwivapiError, VapiApiError
from ..models import EventType, Trigger
from ..store import Store
from .calls import Calls
from .drain import Drainer
from .events import Recorder

log = logging.getLogger("twivapi.bridge")

SETUP_DEADLINE = 8.0        # seconds a setup may wait before the caller gets the fallback; and POST /call's
BACKOFF_FIRST_S = 0.2       # after a 429: then doubling, capped, each a random part of it (full jitter)
BACKOFF_MAX_S = 2.0


class SetupPool:
    def __init__(self, settings: Settings, store: Store, calls: Calls, drainer: Drainer, recorder: Recorder,
                 vapi: Any):
        self.settings, self.store, self.calls, self.drainer = settings, store, calls, drainer
        self.recorder, self.vapi = recorder, vapi
        self._slots = asyncio.Semaphore(settings.setup_concurrency)
        self._tasks: set[asyncio.Task] = set()
        self.waiting = 0
        self.inflight = 0

    def request(self, call_sid: str) -> bool:
        """Set the call up in the background; False when too many wait already (answer the fallback)."""
        if self.waiting >= self.settings.setup_queue_limit:
            return False
        self.waiting += 1
        task = asyncio.create_task(self._run(call_sid, time.monotonic()), name=f"setup-{call_sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def stats(self) -> dict[str, int]:
        return {"setup_queue": self.waiting, "setups_inflight": self.inflight}

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, call_sid: str, queued_at: float) -> None:
        waiting = True
        try:
            async with self._slots:
                self.waiting, waiting = self.waiting - 1, False
                self.inflight += 1
                try:
                    await self._setup(call_sid, queued_at)
                except Exception:  # one bad call must not take others with it
                    log.exception("setup of %s failed unexpectedly", call_sid)
                    await self.calls.move(call_sid, Trigger.FAIL, reason="setup-error", durable=False)
                finally:
                    self.inflight -= 1
        finally:
            if waiting:   # cancelled while waiting for a slot
                self.waiting -= 1

    async def _setup(self, call_sid: str, queued_at: float) -> None:
        if time.monotonic() - queued_at > SETUP_DEADLINE:
            await self.calls.fail(call_sid, "setup-deadline-exceeded", durable=False)
            return
        if not (await self.calls.move(call_sid, Trigger.SETUP_STARTED, durable=False)).moved:
            return  # hung up before we started: nothing to create
        started = time.monotonic()
        try:
            call = await self._create(call_sid, started + SETUP_DEADLINE)
        except TwivapiError as exc:
            await self.recorder.record(EventType.VAPI_SETUP_FAILED, call_sid, durable=False, error=str(exc))
            await self.calls.fail(call_sid, "vapi-setup-failed", durable=False)
            return
        await self.attach(call_sid, call, setup_ms=(time.monotonic() - started) * 1000, durable=False)

    async def _create(self, call_sid: str, deadline: float) -> dict:
        """POST /call, again after a 429 while the deadline allows."""
        backoff, refused = BACKOFF_FIRST_S, None
        while True:
            try:
                return await self.vapi.create_websocket_call(
                    self.settings.vapi_assistant_id, self.settings.audio_format,
                    metadata={"twilioCallSid": call_sid}, timeout=max(0.1, deadline - time.monotonic()))
            except VapiApiError as exc:
                if refused is not None and exc.status is None:
                    # the deadline cut a retry short (POST /call takes hundreds of ms): the 429 is why
                    raise VapiApiError(f"{refused} (the retry inside the deadline did not finish: {exc})",
                                       status=429, retry_after=refused.retry_after) from None
                if exc.status == 429:
                    refused = exc
                # Vapi's Retry-After, if it gave one, else a random part of the backoff (full jitter:
                # a burst of refused setups must not come back all at once)
                pause = max(random.uniform(0, backoff), exc.retry_after or 0.0)
                if exc.status != 429 or time.monotonic() + pause >= deadline:
                    raise
            self.recorder.count("vapi.setup_retried")
            await asyncio.sleep(pause)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def attach(self, call_sid: str, call: dict, *, setup_ms: float | None = None,
                     durable: bool = True) -> None:
        """Link a created Vapi call to its session; if the caller already hung up, end it at once."""
        transport = call.get("transport") or {}
        session = await self.store.update_session(
            call_sid, durable=durable, vapi_call_id=call["id"], websocket_call_url=transport.get("websocketCallUrl"),
            control_url=(call.get("monitor") or {}).get("controlUrl"))
        await self.recorder.record(EventType.VAPI_CALL_CREATED, call_sid, durable=durable, vapi_call_id=call["id"],
                                   setup_ms=setup_ms)
        if session is None:
            return
        change = await self.calls.move(call_sid, Trigger.VAPI_CALL_CREATED, durable=durable)
        if change.session is not None and change.session.state.terminal:
            # The seed's race: Twilio's hang-up won. Close the Vapi side we just opened.
            await self.recorder.record(EventType.RACE_HANGUP_BEFORE_READY, call_sid, durable=durable,
                                       vapi_call_id=call["id"])
            await self.calls.end_vapi_call(call_sid, call)
            return
        await self.drainer.release(call["id"])
