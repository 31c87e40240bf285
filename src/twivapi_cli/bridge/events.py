"""The recorder: every webhook and state change goes to the store's event log, then to whoever
follows the log live (``Cluster.announce``: the admin stream, ``twivapi tail``), and into the
counters and latency histograms that /health, /latency and /metrics show."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..cluster import Cluster
from ..models import Event
from ..store import Store
from ..tail import LatencyBook

log = logging.getLogger("twivapi.bridge")
LAST_EVENTS_KEPT = 10_000


def ack_route(event_type: str) -> str:
    if event_type.startswith("vapi."):
        return "/vapi/webhook"
    return "/" + event_type.split(".")[0] + "/" + event_type.split(".")[1] if "." in event_type else event_type


class Recorder:
    def __init__(self, store: Store, cluster: Cluster):
        self.store, self.cluster = store, cluster
        self.instance = cluster.instance
        self.counters: dict[str, int] = {}
        self.latency = LatencyBook()   # served by the admin app at /latency and /metrics
        self.last_event: dict[str, tuple[str, float]] = {}   # call -> (type, time), newest calls last
        self.taps: dict[str, Callable[[Event], None]] = {}    # call -> who else wants its events (a recording)
        self.listeners: list[Callable[[Event], None]] = []   # every event (the inspector's call index)

    async def record(self, type_: str, call_sid: str | None = None, *, received_at: float | None = None,
                     durable: bool = True, **data: Any) -> Event:
        """Append (durably unless ``durable=False``), then publish. Returns the event (with its seq)."""
        event = Event(type=type_, call_sid=call_sid, data=data, received_at=received_at or time.time())
        await self.store.append(event, durable=durable)
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
            tap = self.taps.get(event.call_sid)
            if tap is not None:
                tap(event)
        for listener in self.listeners:
            listener(event)
        self.cluster.announce(event)

    async def mark(self, event: Event, *, acked: bool = False, processed: bool = False) -> None:
        now = time.time()
        if acked:
            event.acked_at = now
            self.latency.add(f"webhook ack {ack_route(event.type)}", (now - event.received_at) * 1000)
        if processed:
            event.processed_at = now
        if event.seq is not None:
            await self.store.mark(event.seq, acked_at=now if acked else None,
                                  processed_at=now if processed else None)

    async def mark_processed(self, seq: int | None) -> None:
        if seq is not None:
            await self.store.mark(seq, processed_at=time.time())

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
