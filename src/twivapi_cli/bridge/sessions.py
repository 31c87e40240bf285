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
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

from ..config import Settings
from ..errors import TwivapiError, VapiApiError
from ..models import CallState, IllegalTransition, Session
from ..store import Store, write_behind
from ..store.queues import LocalQueues
from .events import Recorder

log = logging.getLogger("twivapi.bridge")

SETUP_WORKERS = 16          # concurrent POST /call; httpx's pool gets slower per request past ~20
SETUP_DEADLINE = 8.0        # seconds a setup may wait in the queue before the caller gets the fallback
PARK_PER_CALL = 64          # messages parked per unknown call
PARK_CALLS = 5_000          # unknown calls parked at once
PARK_TTL = 30.0             # seconds a parked message waits for its session
READY_POLL_S = 0.25         # a media socket re-reads its session this often while waiting for Vapi
QUEUE_LIMIT = 10_000        # messages queued for one known call
ENDED_KEPT_S = 3600.0       # an ended call stays in memory this long (late webhooks still find it)
STALE_QUEUE_S = 2.0         # a queue non-empty this long may have lost its drainer: the sweep tries it
SWEEP_INTERVAL = 5.0
HEARTBEAT_TTL = 6.0         # an instance whose heartbeat is older than this is gone; its calls end

Listener = Callable[[str, dict], Awaitable[None]]


class Processor(Protocol):
    """What the registry applies queued messages with (``bridge/vapi_hooks.py``)."""
    async def known(self, item: dict) -> bool: ...
    async def apply(self, item: dict) -> bool:
        """Apply the message to its call; False (nothing done) when the call is not known yet."""


class CallRegistry:
    def __init__(self, settings: Settings, store: Store, recorder: Recorder, vapi: Any):
        self.settings, self.store, self.recorder, self.vapi = settings, store, recorder, vapi
        self._setup_queue: asyncio.Queue[tuple[str, float]] = asyncio.Queue(settings.setup_queue_limit)
        self._ready: dict[str, asyncio.Event] = {}
        # several instances share the store: its queues, and every signal goes through it
        self.shared = hasattr(store, "call_queues")
        self.queues = store.call_queues(recorder.instance) if self.shared else LocalQueues()
        self.processor: Processor | None = None
        self._drains: set[asyncio.Task] = set()
        self._deliveries: dict[str, asyncio.Task] = {}   # each call's latest signal delivery
        self._listeners: dict[str, set[Listener]] = {}
        self._tasks: list[asyncio.Task] = []
        self.setups_inflight = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        lane = getattr(self.vapi, "lane", lambda: self.vapi)
        self._tasks = [asyncio.create_task(self._setup_worker(lane()), name=f"setup-{i}")
                       for i in range(SETUP_WORKERS)]
        self._tasks.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        if self.shared:   # several instances: hear the signals, say we live
            self._tasks.append(asyncio.create_task(self._relay_signals(), name="signals"))
            self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))

    async def recover(self) -> dict[str, int]:
        """After a restart of a single bridge (SIGKILL, crash): every live session in the store was
        left by the previous process. A call whose media socket was open cannot be resumed (Twilio's
        socket died with the process): it is ended. One caught mid-setup (stream mode's background
        setup, or bypass mode's webhook, which was never answered) is failed: its POST /call may or
        may not have gone out. A stream-mode call still ringing gets its setup queued again, one that
        was ready waits for its media socket as before, and a native-mode call needs nothing from
        us: they resume."""
        outcome = {"resumed": 0, "ended": 0}
        if self.shared:
            return outcome   # the other instances' sweep owns a lost instance's calls (heartbeats)
        for session in await self.store.active_sessions():
            sid = session.call_sid
            if session.stream_sid:
                ended = await self.end(sid, "bridge-restarted")
            elif session.state == CallState.SETTING_UP or (session.state == CallState.RINGING
                                                            and session.mode == "bypass"):
                ended = await self.move(sid, CallState.FAILED, reason="bridge-restarted-during-setup") is not None
            elif session.state == CallState.RINGING and session.mode == "stream":
                ended = not self.request_setup(sid) and await self.move(
                    sid, CallState.FAILED, reason="overloaded") is not None
            else:
                ended = False
            outcome["ended" if ended else "resumed"] += 1
        if any(outcome.values()):
            await self.recorder.record("bridge.recovered", None, **outcome)
        return outcome

    async def stop(self) -> None:
        tasks = self._tasks + list(self._drains) + list(self._deliveries.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    def stats(self) -> dict[str, int]:
        queues = self.queues.stats() if hasattr(self.queues, "stats") else {}
        return {"setup_queue": self._setup_queue.qsize(), "setups_inflight": self.setups_inflight,
                "draining_calls": len(self._drains), **queues}

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
            # waiters hold the event; once the call is over nothing waits on it again
            event = self._ready.pop(call_sid, None) if to.terminal else self._ready_event(call_sid)
            if event is not None:
                event.set()
            if self.shared:   # a media socket waiting on another instance
                await self.signal(call_sid, "ready", {"state": to.value})
        return session

    async def end(self, call_sid: str, reason: str) -> bool:
        """End a call once: state, Vapi side, listeners. False if it had already ended."""
        session = await self.move(call_sid, CallState.ENDED, reason=reason)
        if session is None:
            return False
        await self.signal(call_sid, "end", {"reason": reason})
        if session.vapi_call_id and session.control_url:
            asyncio.create_task(self._end_vapi(session))
        return True

    async def _end_vapi(self, session: Session) -> None:
        await self.end_vapi_call(session.call_sid, {"monitor": {"controlUrl": session.control_url}})

    async def end_vapi_call(self, call_sid: str, call: dict) -> None:
        """End a Vapi call through its control URL; one that had already ended is not an error."""
        try:
            await self.vapi.end_call(call)
        except VapiApiError as exc:
            if exc.status in (400, 404):
                return  # already ended (e.g. its socket closed first) or gone: nothing to end
            await self.recorder.record("vapi.end-failed", call_sid, error=str(exc))

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
        deadline = time.monotonic() + timeout
        while True:
            session = await self.store.get_session(call_sid)
            if session is not None and session.state not in (CallState.RINGING, CallState.SETTING_UP):
                return session
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:   # woken by our own move or another instance's "ready"; the poll is the backstop
                await asyncio.wait_for(self._ready_event(call_sid).wait(), min(left, READY_POLL_S))
            except asyncio.TimeoutError:
                pass

    # --- per-call ordered processing and parking ------------------------------------------------
    async def submit(self, key: str, item: dict, *, parked: bool = False) -> bool:
        """Queue a message for its call; it is applied after every earlier one for the same call, on
        whichever instance holds the call's lease. ``parked``: its session does not exist yet, so it
        waits (bounded per call and in total) until ``release(key)``. False: dropped, counted."""
        accepted, lease = await self.queues.push(key, item, limit=PARK_PER_CALL if parked else QUEUE_LIMIT,
                                                 max_keys=PARK_CALLS if parked else 0)
        if not accepted:
            self.recorder.count("parked.dropped")
            return False
        if lease:
            self._spawn_drain(key)
        return True

    def _spawn_drain(self, key: str, *, expire_unknown: bool = False) -> None:
        task = asyncio.create_task(self._drain(key, expire_unknown), name=f"drain-{key}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, key: str, expire_unknown: bool = False) -> None:
        """Apply the call's queued messages in order while we hold its lease."""
        try:
            held, item = await self.queues.head(key)
            while held:
                if item is None:   # emptied meanwhile: give the lease back, unless more arrived
                    if await self.queues.finish(key):
                        return
                    held, item = await self.queues.head(key)
                    continue
                try:
                    applied = await self.processor.apply(item)
                except TwivapiError:
                    raise
                except Exception:
                    log.exception("processing a message for %s failed", key)
                    applied = True   # a bad message must not block the call's queue
                if not applied:   # its session does not exist (yet)
                    if expire_unknown:
                        dropped = await self.queues.drop(key)
                        self.recorder.count("parked.expired", dropped)
                        await self.recorder.record("parked.expired", None, key=key, messages=dropped)
                        return
                    await self.queues.pause(key)
                    # its session may have appeared while we held the lease (release() could not take it)
                    if await self.processor.known(item) and await self.queues.acquire(key):
                        held, item = await self.queues.head(key)
                        continue
                    return
                held, item = await self.queues.advance(key)
                if item is None:
                    return   # empty: advance gave the lease back (or we had lost it)
        except TwivapiError as exc:   # store down: the lease expires, the sweep drains it later
            log.warning("draining messages of %s stopped: %s", key, exc)

    async def release(self, *keys: str) -> int:
        """A session appeared (or got its Vapi id): drain what was parked for it."""
        started = 0
        for key in keys:
            if key and await self.queues.acquire(key):
                self._spawn_drain(key)
                started += 1
        return started

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
        """Tell whoever holds the call's media socket. With a shared store every signal, ours too,
        goes through it, so a listener hears one call's signals in the order they were sent even
        when consecutive messages were processed on different instances."""
        if self.shared:
            try:
                await self.store.publish_signal(call_sid, kind, data, self.recorder.instance)
                return
            except TwivapiError as exc:
                log.warning("could not publish %s for %s: %s (delivered here only)", kind, call_sid, exc)
        await self._deliver(call_sid, kind, data)

    async def _deliver(self, call_sid: str, kind: str, data: dict) -> None:
        if kind == "ready":
            if call_sid in self._ready:
                self._ready[call_sid].set()
                if data.get("state") in (CallState.ENDED.value, CallState.FAILED.value):
                    del self._ready[call_sid]   # ended on another instance: nothing waits here again
            return
        for listener in list(self._listeners.get(call_sid, ())):
            try:
                await listener(kind, data)
            except Exception:
                log.exception("listener for %s failed on %s", call_sid, kind)

    async def _relay_signals(self) -> None:
        """Signals from the shared channel: in order within a call, one call never waiting on another
        (each call's deliveries are chained on a task of their own)."""
        async for message in self.store.signals():
            call_sid = message.get("call_sid")
            if call_sid in self._listeners or call_sid in self._ready:
                self._chain(call_sid, message["kind"], message.get("data") or {})

    def _chain(self, call_sid: str, kind: str, data: dict) -> None:
        before = self._deliveries.get(call_sid)

        async def deliver() -> None:
            if before is not None:
                await asyncio.wait([before])
            await self._deliver(call_sid, kind, data)

        task = asyncio.create_task(deliver(), name=f"signal-{call_sid}")
        self._deliveries[call_sid] = task
        task.add_done_callback(lambda done: self._deliveries.pop(call_sid, None)
                               if self._deliveries.get(call_sid) is done else None)

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
        await self._drain_stale_queues()
        if hasattr(self.store, "prune"):   # one process's memory: forget calls over for a while
            await self.store.prune(time.time() - ENDED_KEPT_S)
        return expired

    async def _drain_stale_queues(self) -> None:
        """Queues nobody drains: their holder died (its lease expired), or they were parked for a
        session that never appeared (past PARK_TTL they are dropped, counted and recorded)."""
        parked_too_long = set(await self.queues.pending(PARK_TTL))
        for key in await self.queues.pending(STALE_QUEUE_S):
            if await self.queues.acquire(key):
                self._spawn_drain(key, expire_unknown=key in parked_too_long)
