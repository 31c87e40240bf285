"""Housekeeping: calls idle past their TTL, calls of a lost instance, calls whose media stream
never started (``TWIVAPI_STREAM_START_TIMEOUT``), queues nobody drains, and what a bridge
restarted after a crash must settle.

The sweep runs every ``SWEEP_INTERVAL`` seconds; a store outage skips a round, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..cluster import Cluster
from ..config import Settings
from ..errors import TwivapiError
from ..models import CallState, EventType, Mode, Session, Trigger
from ..store import Store
from .calls import Calls
from .drain import Drainer
from .events import Recorder
from .setup import SetupPool

log = logging.getLogger("twivapi.bridge")

SWEEP_INTERVAL = 5.0
ENDED_KEPT_S = 3600.0       # an ended call stays in memory this long (late webhooks still find it)


class Sweeper:
    def __init__(self, settings: Settings, store: Store, cluster: Cluster, calls: Calls, setup: SetupPool,
                 drainer: Drainer, recorder: Recorder):
        self.settings, self.store, self.cluster, self.calls = settings, store, cluster, calls
        self.setup, self.drainer, self.recorder = setup, drainer, recorder
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except TwivapiError as exc:   # store down: try again next round
                log.warning("sweep skipped: %s", exc)

    async def sweep(self, now: float | None = None) -> int:
        """Expire idle sessions, end a lost instance's calls, drain stale queues, forget old calls;
        returns the calls ended."""
        wall = now or time.time()
        ended = 0
        for session in await self.store.expired_sessions(wall - self.settings.session_ttl):
            ended += await self.calls.end(session.call_sid, "expired-ttl")
        active = await self.store.active_sessions()
        for session in await self.cluster.lost_calls(active):
            ended += await self.calls.end(session.call_sid, "instance-lost")
        for session in self._never_streamed(active, wall):
            ended += await self._end_never_streamed(session, wall)
        await self.drainer.drain_stale()
        await self.store.prune(time.time() - ENDED_KEPT_S)
        return ended

    def _never_streamed(self, sessions: list[Session], now: float) -> list[Session]:
        """Stream-mode calls whose Vapi call is ready but whose media stream Twilio never opened
        (a wrong public URL, a blocked port, error 31920): Vapi would bill them until its own timeout."""
        cutoff = now - self.settings.stream_start_timeout
        return [s for s in sessions if s.mode == Mode.STREAM and not s.stream_sid and s.updated_at < cutoff
                and s.state in (CallState.READY, CallState.ACTIVE)]

    async def _end_never_streamed(self, session: Session, now: float) -> bool:
        await self.recorder.record(
            EventType.MEDIA_NEVER_STARTED, session.call_sid, waited_s=round(now - session.updated_at, 1),
            check=f"Twilio never opened the media stream: is TWIVAPI_PUBLIC_URL "
                  f"({self.settings.public_url or 'not set'}) the https URL Twilio reaches, and does "
                  f"`twivapi doctor` pass?")
        return await self.calls.end(session.call_sid, "stream-never-started")

    async def recover(self) -> dict[str, int]:
        """At start-up, settle the live sessions a previous run left (SIGKILL, a crash): those the
        cluster says are this bridge's (a single bridge's; with Redis, the other instances' sweep
        handles a lost instance's calls). A call whose media socket was open cannot be resumed
        (Twilio's socket died with the process): it is ended. One caught mid-setup (stream mode's
        background setup, or bypass mode's webhook, which was never answered) is failed: its POST /call
        may or may not have gone out. A stream-mode call still ringing gets its setup again, one that
        was ready waits for its media socket as before, and a native-mode call needs nothing from us."""
        outcome = {"resumed": 0, "ended": 0}
        for session in self.cluster.inherited(await self.store.active_sessions()):
            outcome["ended" if await self._settle(session) else "resumed"] += 1
        if any(outcome.values()):
            await self.recorder.record(EventType.BRIDGE_RECOVERED, None, resumed=outcome["resumed"],
                                       ended=outcome["ended"])
        return outcome

    async def _settle(self, session: Session) -> bool:
        """Settle one inherited call; True if it is over now."""
        sid = session.call_sid
        if session.stream_sid:
            return await self.calls.end(sid, "bridge-restarted")
        if session.state == CallState.SETTING_UP or (session.state == CallState.RINGING and session.mode == "bypass"):
            return (await self.calls.move(sid, Trigger.FAIL, reason="bridge-restarted-during-setup")).moved
        if session.state == CallState.RINGING and session.mode == "stream" and not self.setup.request(sid):
            return (await self.calls.move(sid, Trigger.FAIL, reason="overloaded")).moved
        return False
