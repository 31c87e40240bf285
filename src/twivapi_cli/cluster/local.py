"""One bridge process: the whole cluster interface in memory.

Signals are delivered at once, in the caller's task (so one call's arrive in order). Followers get a
bounded queue each on their own event loop (the admin app may run on another thread); a slow one
loses the oldest events and is told how many, it never slows the bridge down. Every live session
found at start-up was left by this bridge's previous run, so it is the bridge's to settle.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..models import Event, Session, SignalKind
from ..store import Store
from . import Dropped, FollowItem, SignalReceiver
from .queues import CallQueues, LocalQueues

QUIET_S = 0.5          # a follower hears None after this long without events
FOLLOWER_QUEUE = 10_000
BACKLOG_PAGE = 1000


class Follower:
    """A bounded queue of events on the follower's own event loop."""

    def __init__(self, maxsize: int = FOLLOWER_QUEUE):
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.loop = asyncio.get_running_loop()
        self.dropped = 0

    def offer(self, event: Event) -> None:
        try:
            same_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            self._put(event)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


async def backlog(store: Store, after_seq: int, call_sid: str | None) -> AsyncIterator[Event]:
    """The stored events after ``after_seq``, page by page."""
    last = after_seq
    while True:
        batch = await store.events(last, call_sid=call_sid, limit=BACKLOG_PAGE)
        for event in batch:
            last = event.seq or last
            yield event
        if len(batch) < BACKLOG_PAGE:
            return


class LocalCluster:
    def __init__(self, instance: str | None = None):
        self.instance = instance or uuid.uuid4().hex[:8]
        self.queues: CallQueues = LocalQueues()
        self._receiver: SignalReceiver | None = None
        self._followers: set[Follower] = set()

    async def open(self, receiver: SignalReceiver) -> None:
        self._receiver = receiver

    async def close(self) -> None:
        self._receiver = None

    async def publish(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        if self._receiver is not None:
            await self._receiver.deliver(call_sid, kind, data)

    def announce(self, event: Event) -> None:
        for follower in self._followers:
            follower.offer(event)

    async def follow(self, store: Store, after_seq: int, *, call_sid: str | None = None,
                     once: bool = False) -> AsyncIterator[FollowItem]:
        follower = Follower()   # before the backlog: nothing falls between the two
        self._followers.add(follower)
        try:
            last, dropped_seen = after_seq, 0
            async for event in backlog(store, after_seq, call_sid):
                last = event.seq or last
                yield event
            if once:
                return
            while True:
                try:
                    event = await asyncio.wait_for(follower.queue.get(), QUIET_S)
                except TimeoutError:
                    yield None
                    continue
                if follower.dropped > dropped_seen:
                    yield Dropped(follower.dropped - dropped_seen)
                    dropped_seen = follower.dropped
                if event.seq is None or event.seq <= last:
                    continue
                last = event.seq
                if call_sid is None or event.call_sid == call_sid:
                    yield event
        finally:
            self._followers.discard(follower)

    async def lost_calls(self, sessions: list[Session]) -> list[Session]:
        return []   # one instance: it is never lost while it runs this

    def inherited(self, sessions: list[Session]) -> list[Session]:
        return list(sessions)   # all left by this bridge's previous run

    async def other_instances(self) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return self.queues.stats()
