"""Signals to whoever holds a call's media socket, and waiting for a call to be ready.

A media socket ``listen``s for its call; the bridge ``send``s interruptions, speech and ends through
the cluster, which delivers them here or on the instance that holds the socket, in order within a
call. A media socket that opened before its Vapi call exists ``wait_ready``s: woken by this
instance's own state changes at once, by another instance's through the cluster, and by a short
poll of the store as the backstop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..cluster import Cluster
from ..models import CallState, Session, SignalKind
from ..store import Store

log = logging.getLogger("twivapi.bridge")

READY_POLL_S = 0.25   # a waiting media socket re-reads its session this often
Listener = Callable[[SignalKind, dict], Awaitable[None]]


class Signals:
    """The bridge's ``SignalReceiver``: listeners by call, and ready events by call."""

    def __init__(self, store: Store, cluster: Cluster):
        self.store, self.cluster = store, cluster
        self._listeners: dict[str, set[Listener]] = {}
        self._ready: dict[str, asyncio.Event] = {}

    # --- listeners ------------------------------------------------------------------------------------
    def listen(self, call_sid: str, listener: Listener) -> None:
        self._listeners.setdefault(call_sid, set()).add(listener)

    def unlisten(self, call_sid: str, listener: Listener) -> None:
        listeners = self._listeners.get(call_sid)
        if listeners:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[call_sid]

    def interested(self, call_sid: str) -> bool:
        return call_sid in self._listeners or call_sid in self._ready

    def waiting(self, call_sid: str) -> bool:
        """Whether a media socket here still waits for the call (tests: none once it is over)."""
        return call_sid in self._ready

    # --- sending and delivering ---------------------------------------------------------------------
    async def send(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        await self.cluster.publish(call_sid, kind, data)

    async def state_changed(self, call_sid: str, state: CallState) -> None:
        """The call became ready, active or ended: wake a socket waiting here now, and one waiting on
        another instance through the cluster."""
        # only a socket that waits has an event: a call that never streams keeps none (wait_ready
        # makes its event before it reads the session, so no move falls between the two)
        event = self._ready.pop(call_sid, None) if state.terminal else self._ready.get(call_sid)
        if event is not None:
            event.set()
        await self.cluster.publish(call_sid, SignalKind.READY, {"state": state.value})

    async def deliver(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        if kind is SignalKind.READY:
            event = self._ready.get(call_sid)
            if event is not None:
                event.set()
                if data.get("state") in (CallState.ENDED.value, CallState.FAILED.value):
                    del self._ready[call_sid]   # ended on another instance: nothing waits here again
            return
        for listener in list(self._listeners.get(call_sid, ())):
            try:
                await listener(kind, data)
            except Exception:
                log.exception("listener for %s failed on %s", call_sid, kind.value)

    # --- waiting for the Vapi call ---------------------------------------------------------------------
    def _ready_event(self, call_sid: str) -> asyncio.Event:
        event = self._ready.get(call_sid)
        if event is None:
            event = self._ready[call_sid] = asyncio.Event()
        return event

    async def wait_ready(self, call_sid: str, timeout: float) -> Session | None:
        """The session once its Vapi call exists (or it ended); None on timeout."""
        deadline = time.monotonic() + timeout
        # made before the first read: a move while that read waits on the store (Redis) still wakes it
        ready = self._ready_event(call_sid)
        while True:
            session = await self.store.get_session(call_sid)
            if session is not None and session.state not in (CallState.RINGING, CallState.SETTING_UP):
                if session.state.terminal:   # over before this socket came: nothing will pop its event
                    self._ready.pop(call_sid, None)
                return session
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:   # woken by our own move or another instance's; the poll is the backstop
                await asyncio.wait_for(ready.wait(), min(left, READY_POLL_S))
            except TimeoutError:
                pass

    def forget(self, call_sid: str) -> None:
        """A failed setup: nothing will wait for this call again."""
        self._ready.pop(call_sid, None)
