"""Moving and ending calls: triggers through the store's one transition table, recorded.

Every state change goes through ``move(call_sid, trigger)``: the store applies ``TRANSITIONS``
atomically, a move is recorded as ``state``, a refused one as ``state.rejected`` (that is where the
races show: a hang-up before Vapi is ready, a second end), and a waiting media socket is woken.
``end`` ends a call once: its state, its media socket (a signal) and its Vapi side.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import VapiApiError
from ..models import CallState, EventType, Outcome, Session, SignalKind, Transition, Trigger
from ..store import Store
from .events import Recorder
from .signals import Signals

WAKES = (CallState.READY, CallState.ACTIVE, CallState.ENDED, CallState.FAILED)   # what a media socket waits for


class Calls:
    def __init__(self, store: Store, recorder: Recorder, signals: Signals, vapi: Any):
        self.store, self.recorder, self.signals, self.vapi = store, recorder, signals, vapi
        self._endings: set[asyncio.Task] = set()   # Vapi sides being ended in the background

    async def move(self, call_sid: str, trigger: Trigger, *, reason: str | None = None,
                   durable: bool = True) -> Transition:
        change = await self.store.transition(call_sid, trigger, reason=reason, durable=durable)
        if change.outcome is Outcome.REJECTED:
            await self.recorder.record(EventType.STATE_REJECTED, call_sid, durable=durable,
                                       current=change.previous.value if change.previous else None,
                                       wanted=trigger.wanted.value, trigger=trigger.value, reason=reason)
        elif change.moved and change.session is not None:
            state = change.session.state
            await self.recorder.record(EventType.STATE, call_sid, durable=durable, state=state.value, reason=reason)
            if state in WAKES:
                await self.signals.state_changed(call_sid, state)
        return change

    async def end(self, call_sid: str, reason: str) -> bool:
        """End a call once: state, media socket, Vapi side. False if it was already over."""
        change = await self.move(call_sid, Trigger.END, reason=reason)
        if not change.moved or change.session is None:
            return False
        await self.signals.send(call_sid, SignalKind.END, {"reason": reason})
        self.end_vapi_side(change.session)
        return True

    async def move_to_end(self, call_sid: str, reason: str) -> Session | None:
        """End a call's session now, its media socket and Vapi side left open: call control, where
        Twilio ends the stream itself once told and the Vapi side is ended after (``end_vapi_side``).
        None if the call was already over."""
        change = await self.move(call_sid, Trigger.END, reason=reason)
        return change.session if change.moved else None

    async def fail(self, call_sid: str, reason: str, *, durable: bool = True) -> bool:
        """Setup failed: the caller gets the fallback, and a media socket waiting for it gives up."""
        change = await self.move(call_sid, Trigger.FAIL, reason=reason, durable=durable)
        await self.signals.send(call_sid, SignalKind.END, {"reason": reason})
        return change.moved

    def end_vapi_side(self, session: Session) -> None:
        """End the session's Vapi call in the background (an end must not wait for Vapi)."""
        if session.vapi_call_id and session.control_url:
            task = asyncio.create_task(self.end_vapi_call(session.call_sid,
                                                          {"monitor": {"controlUrl": session.control_url}}))
            self._endings.add(task)
            task.add_done_callback(self._endings.discard)

    async def end_vapi_call(self, call_sid: str, call: dict) -> None:
        """End a Vapi call through its control URL; one that had already ended is not an error."""
        try:
            await self.vapi.end_call(call)
        except VapiApiError as exc:
            if exc.status in (400, 404):
                return  # already ended (e.g. its socket closed first) or gone: nothing to end
            await self.recorder.record(EventType.VAPI_END_FAILED, call_sid, error=str(exc))

    async def stop(self, timeout: float = 2.0) -> None:
        """Let the Vapi ends under way finish (briefly): a call ended at shutdown is ended at Vapi too."""
        if self._endings:
            await asyncio.wait(list(self._endings), timeout=timeout)
        for task in list(self._endings):
            task.cancel()
