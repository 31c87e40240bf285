"""In-memory store. Also the read model of the SQLite store, which persists every change through the
``_persist`` hook: state changes happen here first, inside one event-loop step, so each is atomic."""

from __future__ import annotations

import collections
import time
from typing import Any

from ..models import Event, Outcome, Session, Transition, Trigger, next_state

EVENT_RING = 50_000  # events kept in memory for tail; the SQLite file keeps them all


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._by_vapi: dict[str, str] = {}
        self._by_stream: dict[str, str] = {}
        self._claims: dict[str, float] = {}
        self._events: collections.deque[Event] = collections.deque(maxlen=EVENT_RING)
        self._seq = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def health(self) -> dict[str, Any]:
        return {"store": self.name, "ok": True}

    async def _persist(self, kind: str, payload: Any, durable: bool = True) -> None:
        """Hook for durable stores; the memory store keeps nothing."""

    # --- sessions -------------------------------------------------------------------------------
    async def create_session(self, session: Session, *, durable: bool = True) -> bool:
        if session.call_sid in self._sessions:
            return False
        self._sessions[session.call_sid] = session
        self._index(session)
        await self._persist("session", session, durable)
        return True

    async def get_session(self, call_sid: str) -> Session | None:
        session = self._sessions.get(call_sid)
        return session.copy() if session else None

    async def find_session(self, *, vapi_call_id: str | None = None,
                           stream_sid: str | None = None) -> Session | None:
        call_sid = (self._by_vapi.get(vapi_call_id) if vapi_call_id else None) or \
                   (self._by_stream.get(stream_sid) if stream_sid else None)
        return await self.get_session(call_sid) if call_sid else None

    async def update_session(self, call_sid: str, *, durable: bool = True, **fields: Any) -> Session | None:
        session = self._sessions.get(call_sid)
        if session is None:
            return None
        fields.pop("state", None)
        for name, value in fields.items():
            setattr(session, name, value)
        session.updated_at = time.time()
        self._index(session)
        await self._persist("session", session, durable)
        return session.copy()

    async def transition(self, call_sid: str, trigger: Trigger, *, reason: str | None = None,
                         durable: bool = True) -> Transition:
        session = self._sessions.get(call_sid)
        if session is None:
            return Transition(Outcome.UNKNOWN)
        previous = session.state
        to = next_state(previous, trigger)
        if to is None:
            return Transition(Outcome.REJECTED, session.copy(), previous)
        if to is previous:
            return Transition(Outcome.ALREADY, session.copy(), previous)
        session.state = to
        session.updated_at = time.time()
        if reason and to.terminal:
            session.ended_reason = reason
        await self._persist("session", session, durable)
        return Transition(Outcome.MOVED, session.copy(), previous)

    async def apply_status_sequence(self, call_sid: str, sequence: int) -> bool:
        session = self._sessions.get(call_sid)
        if session is None or sequence <= session.last_status_sequence:
            return False
        session.last_status_sequence = sequence
        await self._persist("session", session)
        return True

    async def active_sessions(self) -> list[Session]:
        return [s.copy() for s in self._sessions.values() if not s.state.terminal]

    async def count_active(self) -> int:
        return sum(1 for s in self._sessions.values() if not s.state.terminal)

    async def expired_sessions(self, idle_before: float) -> list[Session]:
        return [s.copy() for s in self._sessions.values()
                if not s.state.terminal and s.updated_at < idle_before]

    def _index(self, session: Session) -> None:
        if session.vapi_call_id:
            self._by_vapi[session.vapi_call_id] = session.call_sid
        if session.stream_sid:
            self._by_stream[session.stream_sid] = session.call_sid

    # --- idempotency ----------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        now = time.time()
        expires = self._claims.get(key)
        if expires is not None and expires > now:
            return False
        self._claims[key] = now + ttl
        await self._persist("claim", (key, now + ttl))
        return True

    # --- forgetting -------------------------------------------------------------------------------
    async def prune(self, ended_before: float) -> int:
        """Drop from memory the sessions that ended before ``ended_before`` (late webhooks for them
        have stopped coming) and the claims that expired. Durable stores keep them on disk; returns
        the sessions dropped."""
        now = time.time()
        self._claims = {k: v for k, v in self._claims.items() if v > now}
        gone = [s for s in self._sessions.values() if s.state.terminal and s.updated_at < ended_before]
        for session in gone:
            del self._sessions[session.call_sid]
            if session.vapi_call_id and self._by_vapi.get(session.vapi_call_id) == session.call_sid:
                del self._by_vapi[session.vapi_call_id]
            if session.stream_sid and self._by_stream.get(session.stream_sid) == session.call_sid:
                del self._by_stream[session.stream_sid]
        return len(gone)

    # --- event log ------------------------------------------------------------------------------
    async def append(self, event: Event, *, durable: bool = True) -> int:
        self._seq += 1
        event.seq = self._seq
        self._events.append(event)
        await self._persist("event", event, durable)
        return event.seq

    async def events(self, after_seq: int = 0, *, call_sid: str | None = None,
                     limit: int = 1000) -> list[Event]:
        out = []
        for event in self._events:
            if (event.seq or 0) > after_seq and (call_sid is None or event.call_sid == call_sid):
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    async def mark(self, seq: int, *, acked_at: float | None = None,
                   processed_at: float | None = None) -> None:
        for event in reversed(self._events):
            if event.seq == seq:
                event.acked_at = acked_at or event.acked_at
                event.processed_at = processed_at or event.processed_at
                break
        await self._persist_mark(seq, acked_at, processed_at)

    async def _persist_mark(self, seq: int, acked_at: float | None, processed_at: float | None) -> None:
        """Hook for durable stores."""
