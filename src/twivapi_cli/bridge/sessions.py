"""Per-call coordination: Vapi call setup in the background, in-order message processing per call,
messages parked until their session exists, listeners (the media socket), and TTL expiry.

Design notes (the seed's patterns, done per call):
- Setup runs on a bounded queue served by a fixed pool of workers. When the queue is full, or a job
  waited past its deadline, the caller gets the fallback instead of waiting minutes behind others.
- Each call has its own FIFO and at most one task draining it: in order within a call, concurrent
  across calls, nothing shared between calls.
- A message for a call we do not know yet is parked (bounded per call and in total, expiring) and
  replayed the moment the session appears or its Vapi id is linked.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..config import Settings
from ..errors import TwivapiError, VapiApiError
from ..models import CallState, IllegalTransition, Session
from ..store import Store, write_behind
from .events import Recorder

log = logging.getLogger("twivapi.bridge")

SETUP_WORKERS = 16          # concurrent POST /call; httpx's pool gets slower per request past ~20
SETUP_DEADLINE = 8.0        # seconds a setup may wait in the queue before the caller gets the fallback
PARK_PER_CALL = 64          # messages parked per unknown call
PARK_CALLS = 5_000          # unknown calls parked at once
PARK_TTL = 30.0             # seconds a parked message waits for its session
SWEEP_INTERVAL = 5.0
HEARTBEAT_TTL = 6.0         # an instance whose heartbeat is older than this is gone; its calls end

Listener = Callable[[str, dict], Awaitable[None]]
Job = Callable[[], Awaitable[None]]


@dataclass
class _Parked:
    created: float = field(default_factory=time.monotonic)
    jobs: list[Job] = field(default_factory=list)


class CallRegistry:
    def __init__(self, settings: Settings, store: Store, recorder: Recorder, vapi: Any):
        self.settings, self.store, self.recorder, self.vapi = settings, store, recorder, vapi
        self._setup_queue: asyncio.Queue[tuple[str, float]] = asyncio.Queue(settings.setup_queue_limit)
        self._ready: dict[str, asyncio.Event] = {}
        self._fifo: dict[str, collections.deque[Job]] = {}
        self._parked: dict[str, _Parked] = {}
        self._listeners: dict[str, set[Listener]] = {}
        self._tasks: list[asyncio.Task] = []
        self.setups_inflight = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        lane = getattr(self.vapi, "lane", lambda: self.vapi)
        self._tasks = [asyncio.create_task(self._setup_worker(lane()), name=f"setup-{i}")
                       for i in range(SETUP_WORKERS)]
        self._tasks.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        if hasattr(self.store, "signals"):   # several instances: hear the others' signals, say we live
            self._tasks.append(asyncio.create_task(self._relay_signals(), name="signals"))
            self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def stats(self) -> dict[str, int]:
        return {"setup_queue": self._setup_queue.qsize(), "setups_inflight": self.setups_inflight,
                "parked_calls": len(self._parked), "busy_calls": len(self._fifo)}

    # --- state changes ----------------------------------------------------------------------------
    async def move(self, call_sid: str, to: CallState, *, reason: str | None = None) -> Session | None:
        """Transition and record it; an illegal move is recorded and returns None."""
        try:
            session = await self.store.transition(call_sid, to, reason=reason)
        except IllegalTransition as exc:
            await self.recorder.record("state.rejected", call_sid, current=exc.current.value, wanted=to.value,
                                       reason=reason)
            return None
        except KeyError:
            return None
        await self.recorder.record("state", call_sid, state=to.value, reason=reason)
        if to in (CallState.READY, CallState.ACTIVE) or to.terminal:
            self._ready_event(call_sid).set()
        return session

    async def end(self, call_sid: str, reason: str) -> bool:
        """End a call once: state, Vapi side, listeners. False if it had already ended."""
        session = await self.move(call_sid, CallState.ENDED, reason=reason)
        if session is None:
            return False
        await self.signal(call_sid, "end", {"reason": reason})
        if session.vapi_call_id and session.control_url:
            asyncio.create_task(self._end_vapi(session))
        self._ready.pop(call_sid, None)
        return True

    async def _end_vapi(self, session: Session) -> None:
        try:
            await self.vapi.end_call({"monitor": {"controlUrl": session.control_url}})
        except VapiApiError as exc:
            if exc.status in (400, 404):
                return  # already ended (e.g. its socket closed first) or gone: nothing to end
            await self.recorder.record("vapi.end-failed", session.call_sid, error=str(exc))

    # --- Vapi call setup (stream mode) ----------------------------------------------------------------
    def request_setup(self, call_sid: str) -> bool:
        """Queue the Vapi call creation; False when the queue is full (answer the fallback)."""
        try:
            self._setup_queue.put_nowait((call_sid, time.monotonic()))
        except asyncio.QueueFull:
            return False
        return True

    async def _setup_worker(self, vapi: Any) -> None:
        write_behind()  # setup acknowledges nothing to anyone: don't wait on each commit
        while True:
            call_sid, queued_at = await self._setup_queue.get()
            self.setups_inflight += 1
            try:
                await self._setup(call_sid, queued_at, vapi)
            except Exception:  # one bad call must not kill the worker
                log.exception("setup of %s failed unexpectedly", call_sid)
                await self.move(call_sid, CallState.FAILED, reason="setup-error")
            finally:
                self.setups_inflight -= 1

    async def _setup(self, call_sid: str, queued_at: float, vapi: Any) -> None:
        if time.monotonic() - queued_at > SETUP_DEADLINE:
            await self.move(call_sid, CallState.FAILED, reason="setup-deadline-exceeded")
            await self.signal(call_sid, "end", {"reason": "setup-deadline-exceeded"})
            return
        if await self.move(call_sid, CallState.SETTING_UP) is None:
            return  # hung up before we started: nothing to create
        started = time.monotonic()
        try:
            call = await vapi.create_websocket_call(
                self.settings.vapi_assistant_id, self.settings.audio_format,
                metadata={"twilioCallSid": call_sid}, timeout=SETUP_DEADLINE)
        except TwivapiError as exc:
            await self.recorder.record("vapi.setup-failed", call_sid, error=str(exc))
            await self.move(call_sid, CallState.FAILED, reason="vapi-setup-failed")
            await self.signal(call_sid, "end", {"reason": "vapi-setup-failed"})
            return
        setup_ms = (time.monotonic() - started) * 1000
        await self.attach_vapi_call(call_sid, call, setup_ms=setup_ms)

    async def attach_vapi_call(self, call_sid: str, call: dict, *, setup_ms: float | None = None) -> None:
        """Link a created Vapi call to its session; if the caller already hung up, end it at once."""
        transport = call.get("transport") or {}
        session = await self.store.update_session(
            call_sid, vapi_call_id=call["id"], websocket_call_url=transport.get("websocketCallUrl"),
            control_url=(call.get("monitor") or {}).get("controlUrl"))
        await self.recorder.record("vapi.call-created", call_sid, vapi_call_id=call["id"], setup_ms=setup_ms)
        if session is None:
            return
        if session.state.terminal:
            # The seed's race: Twilio's hang-up won. Close the Vapi side we just opened.
            await self.recorder.record("race.hangup-before-ready", call_sid, vapi_call_id=call["id"])
            await self._end_vapi(session)
            return
        if session.state in (CallState.RINGING, CallState.SETTING_UP):
            await self.move(call_sid, CallState.READY)
        await self.release(call["id"])

    def _ready_event(self, call_sid: str) -> asyncio.Event:
        event = self._ready.get(call_sid)
        if event is None:
            event = self._ready[call_sid] = asyncio.Event()
        return event

    async def wait_ready(self, call_sid: str, timeout: float) -> Session | None:
        """The session once its Vapi call exists (or it ended); None on timeout."""
        session = await self.store.get_session(call_sid)
        if session is None or session.state in (CallState.RINGING, CallState.SETTING_UP):
            try:
                await asyncio.wait_for(self._ready_event(call_sid).wait(), timeout)
            except asyncio.TimeoutError:
                return None
            session = await self.store.get_session(call_sid)
        return session

    # --- per-call ordered processing and parking ------------------------------------------------
    def submit(self, key: str, job: Job) -> None:
        """Run ``job`` after every earlier job for the same call; calls run concurrently."""
        fifo = self._fifo.get(key)
        if fifo is not None:
            fifo.append(job)
            return
        self._fifo[key] = collections.deque([job])
        asyncio.create_task(self._drain(key))

    async def _drain(self, key: str) -> None:
        fifo = self._fifo[key]
        while fifo:
            job = fifo.popleft()
            try:
                await job()
            except Exception:
                log.exception("processing a message for %s failed", key)
        del self._fifo[key]

    def park(self, key: str, job: Job) -> bool:
        """Hold a job until ``release(key)``; False (dropped, counted) when over a bound."""
        parked = self._parked.get(key)
        if parked is None:
            if len(self._parked) >= PARK_CALLS:
                self.recorder.count("parked.dropped")
                return False
            parked = self._parked[key] = _Parked()
        if len(parked.jobs) >= PARK_PER_CALL:
            self.recorder.count("parked.dropped")
            return False
        parked.jobs.append(job)
        return True

    async def release(self, *keys: str) -> int:
        released = 0
        for key in keys:
            parked = self._parked.pop(key, None) if key else None
            if parked:
                for job in parked.jobs:
                    self.submit(key, job)
                released += len(parked.jobs)
        return released

    # --- listeners (the media socket) ---------------------------------------------------------
    def listen(self, call_sid: str, listener: Listener) -> None:
        self._listeners.setdefault(call_sid, set()).add(listener)

    def unlisten(self, call_sid: str, listener: Listener) -> None:
        listeners = self._listeners.get(call_sid)
        if listeners:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[call_sid]

    async def signal(self, call_sid: str, kind: str, data: dict) -> None:
        """Tell whoever holds the call's media socket: here, and on every other instance."""
        await self._deliver(call_sid, kind, data)
        if hasattr(self.store, "publish_signal"):
            try:
                await self.store.publish_signal(call_sid, kind, data, self.recorder.instance)
            except TwivapiError as exc:
                log.warning("could not publish %s for %s: %s", kind, call_sid, exc)

    async def _deliver(self, call_sid: str, kind: str, data: dict) -> None:
        for listener in list(self._listeners.get(call_sid, ())):
            try:
                await listener(kind, data)
            except Exception:
                log.exception("listener for %s failed on %s", call_sid, kind)

    async def _relay_signals(self) -> None:
        async for message in self.store.signals():
            if message.get("origin") != self.recorder.instance and message.get("call_sid") in self._listeners:
                await self._deliver(message["call_sid"], message["kind"], message.get("data") or {})

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.store.heartbeat(self.recorder.instance, HEARTBEAT_TTL)
            except TwivapiError:
                pass   # Redis down: /health says so; we try again
            await asyncio.sleep(HEARTBEAT_TTL / 3)

    # --- expiry ---------------------------------------------------------------------------------
    async def _end_orphans(self) -> int:
        """Calls whose instance is gone (no heartbeat): end and clean them up, saying why."""
        ended = 0
        alive: dict[str, bool] = {self.recorder.instance: True}
        for session in await self.store.active_sessions():
            owner = session.instance
            if not owner or owner == self.recorder.instance:
                continue
            if owner not in alive:
                alive[owner] = await self.store.alive(owner)
            if not alive[owner] and await self.end(session.call_sid, "instance-lost"):
                ended += 1
        return ended

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except TwivapiError as exc:   # store down: try again next round
                log.warning("sweep skipped: %s", exc)

    async def sweep(self, now: float | None = None) -> int:
        """Expire idle sessions and stale parked messages; returns sessions expired."""
        wall = now or time.time()
        expired = 0
        for session in await self.store.expired_sessions(wall - self.settings.session_ttl):
            if await self.end(session.call_sid, "expired-ttl"):
                expired += 1
        if hasattr(self.store, "alive"):
            expired += await self._end_orphans()
        mono = time.monotonic()
        for key in [k for k, p in self._parked.items() if mono - p.created > PARK_TTL]:
            dropped = self._parked.pop(key)
            self.recorder.count("parked.expired", len(dropped.jobs))
            await self.recorder.record("parked.expired", None, key=key, messages=len(dropped.jobs))
        return expired
