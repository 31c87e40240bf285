"""The recorder: every webhook and state change goes to the store's event log and to live subscribers.

Subscribers (tail's admin stream, tests) get a bounded queue each; a slow subscriber loses the
oldest events and is told how many (``dropped``), it never slows the bridge down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..models import Event
from ..store import Store
from ..tail import LatencyBook

log = logging.getLogger("twivapi.bridge")
LAST_EVENTS_KEPT = 10_000


def ack_route(event_type: str) -> str:
    if event_type.startswith("vapi."):
        return "/vapi/webhook"
    return "/" + event_type.split(".")[0] + "/" + event_type.split(".")[1] if "." in event_type else event_type


class Subscription:
    """A bounded queue of events on the subscriber's own event loop (which may not be the
    recorder's: tests and benchmarks run the admin app on another thread)."""

    def __init__(self, maxsize: int):
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


class Recorder:
    def __init__(self, store: Store, instance: str = "local"):
        self.store = store
        self.instance = instance
        self._subscribers: set[Subscription] = set()
        self.counters: dict[str, int] = {}
        self.latency = LatencyBook()   # served by the admin app at /latency and /metrics
        self.last_event: dict[str, tuple[str, float]] = {}   # call -> (type, time), newest calls last

    async def record(self, type_: str, call_sid: str | None = None, *, received_at: float | None = None,
                     **data: Any) -> Event:
        """Append durably, then publish. Returns the event (with its seq)."""
        event = Event(type=type_, call_sid=call_sid, data=data, received_at=received_at or time.time())
        await self.store.append(event)
        self.publish(event)
        return event

    def publish(self, event: Event) -> None:
        self.counters[event.type] = self.counters.get(event.type, 0) + 1
        self.latency.observe_event(event.type, event.data)
        if event.call_sid:
            self.last_event.pop(event.call_sid, None)
            self.last_event[event.call_sid] = (event.type, event.received_at)
            if len(self.last_event) > LAST_EVENTS_KEPT:
                del self.last_event[next(iter(self.last_event))]
        for subscriber in self._subscribers:
            subscriber.offer(event)

    async def mark(self, event: Event, *, acked: bool = False, processed: bool = False) -> None:
        now = time.time()
        if acked:
            event.acked_at = now
            self.latency.add(f"webhook ack {ack_route(event.type)}", (now - event.received_at) * 1000)
        if processed:
            event.processed_at = now
        await self.store.mark(event.seq, acked_at=now if acked else None, processed_at=now if processed else None)

    async def mark_processed(self, seq: int | None) -> None:
        if seq is not None:
            await self.store.mark(seq, processed_at=time.time())

    def subscribe(self, maxsize: int = 10_000) -> Subscription:
        subscription = Subscription(maxsize)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
