"""Per-call ordered processing of Vapi's messages, and parking for calls not known yet.

Each call has its own FIFO (``cluster.queues``) and at most one task draining it, on whichever
instance holds the call's lease: in order within a call, concurrent across calls. A message for a
call whose session does not exist yet (Vapi can beat Twilio, or beat POST /call's answer) is
parked in the same queue, bounded per call and in total, and drained the moment the session
appears (``release``) or dropped, counted and recorded once it waited past ``PARK_TTL``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ..cluster.queues import CallQueues
from ..errors import TwivapiError
from ..models import EventType
from .events import Recorder

log = logging.getLogger("twivapi.bridge")

PARK_PER_CALL = 64          # messages parked per unknown call
PARK_CALLS = 5_000          # unknown calls parked at once
PARK_TTL = 30.0             # seconds a parked message waits for its session
QUEUE_LIMIT = 10_000        # messages queued for one known call
STALE_QUEUE_S = 2.0         # a queue non-empty this long may have lost its drainer: the sweep tries it


class Processor(Protocol):
    """What queued messages are applied with (``bridge/vapi_hooks.py``)."""
    async def known(self, item: dict) -> bool:
        """Whether the message's call has a session now."""
    async def apply(self, item: dict) -> bool:
        """Apply the message to its call; False (nothing done) when the call is not known yet."""


class Drainer:
    def __init__(self, queues: CallQueues, processor: Processor, recorder: Recorder):
        self.queues, self.processor, self.recorder = queues, processor, recorder
        self._drains: set[asyncio.Task] = set()

    async def submit(self, key: str, item: dict, *, parked: bool = False) -> bool:
        """Queue a message for its call; it is applied after every earlier one for the same call.
        ``parked``: its session does not exist yet, so it waits until ``release(key)``.
        False: dropped (a bound was reached), counted."""
        accepted, lease = await self.queues.push(key, item, limit=PARK_PER_CALL if parked else QUEUE_LIMIT,
                                                 max_keys=PARK_CALLS if parked else 0)
        if not accepted:
            self.recorder.count("parked.dropped")
            return False
        if lease:
            self._spawn(key)
        return True

    async def release(self, *keys: str | None) -> int:
        """A session appeared (or got its Vapi id): drain what was parked for it."""
        started = 0
        for key in keys:
            if key and await self.queues.acquire(key):
                self._spawn(key)
                started += 1
        return started

    async def drain_stale(self) -> None:
        """Queues nobody drains: their holder died (its lease expired), or they were parked for a
        session that never appeared (past PARK_TTL they are dropped, counted and recorded)."""
        parked_too_long = set(await self.queues.pending(PARK_TTL))
        for key in await self.queues.pending(STALE_QUEUE_S):
            if await self.queues.acquire(key):
                self._spawn(key, expire_unknown=key in parked_too_long)

    def stats(self) -> dict[str, int]:
        return {"draining_calls": len(self._drains), **self.queues.stats()}

    async def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    def _spawn(self, key: str, *, expire_unknown: bool = False) -> None:
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
                if not await self._apply(key, item):   # its session does not exist (yet)
                    if expire_unknown:
                        await self._expire(key)
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

    async def _apply(self, key: str, item: dict) -> bool:
        try:
            return await self.processor.apply(item)
        except TwivapiError:
            raise
        except Exception:
            log.exception("processing a message for %s failed", key)
            return True   # a bad message must not block the call's queue

    async def _expire(self, key: str) -> None:
        dropped = await self.queues.drop(key)
        self.recorder.count("parked.expired", dropped)
        await self.recorder.record(EventType.PARKED_EXPIRED, None, key=key, messages=dropped)
