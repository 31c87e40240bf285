"""The store: sessions, the per-call state machine, idempotency keys and the event log.

    Store (protocol, below)
    ├── MemoryStore   memory://          tests, throwaway runs
    ├── SQLiteStore   sqlite:///path.db  the embedded default: memory-speed reads, durable group commit
    └── RedisStore    redis://host/db    several bridge instances sharing state

Every method that changes state is atomic with respect to other callers of the same store (a
transition is a compare-and-set), and returns only once the change is durable for stores that
persist: an acknowledged webhook is never lost. Work that acknowledges nothing to anyone (Vapi call
setup) may say ``durable=False``: its write is queued in order but not awaited (SQLite saves a
thread round trip per write). It is an argument, never ambient state, so it cannot leak into a
webhook handler's writes.

What several bridge instances share beyond this (per-call queues, signals, liveness, following
the log) is the ``Cluster``'s (``twivapi_cli/cluster``), not the store's.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import ConfigError
from ..models import Event, Session, Transition, Trigger


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def health(self) -> dict[str, Any]: ...

    async def create_session(self, session: Session, *, durable: bool = True) -> bool:
        """Insert; False (and no change) if the CallSid already exists."""
    async def get_session(self, call_sid: str) -> Session | None: ...
    async def find_session(self, *, vapi_call_id: str | None = None,
                           stream_sid: str | None = None) -> Session | None: ...
    async def update_session(self, call_sid: str, *, durable: bool = True, **fields: Any) -> Session | None:
        """Set linking fields (vapi_call_id, stream_sid, urls, instance); never the state."""
    async def transition(self, call_sid: str, trigger: Trigger, *, reason: str | None = None,
                         durable: bool = True) -> Transition:
        """Atomically apply ``models.TRANSITIONS`` to the call: moved, already there, rejected
        (nothing changed) or unknown call. ``reason`` is kept when the move ends the call."""
    async def apply_status_sequence(self, call_sid: str, sequence: int) -> bool:
        """Atomically record a status callback's SequenceNumber; False if not newer than the last."""
    async def active_sessions(self) -> list[Session]: ...
    async def count_active(self) -> int:
        """How many sessions have not ended, counted without reading them (/health, /metrics)."""
    async def expired_sessions(self, idle_before: float) -> list[Session]: ...

    async def claim(self, key: str, ttl: float) -> bool:
        """Idempotency: True the first time ``key`` is seen within ``ttl`` seconds."""
    async def append(self, event: Event, *, durable: bool = True) -> int:
        """Append to the event log (durable before returning); returns the sequence number."""
    async def events(self, after_seq: int = 0, *, call_sid: str | None = None,
                     limit: int = 1000) -> list[Event]: ...
    async def mark(self, seq: int, *, acked_at: float | None = None,
                   processed_at: float | None = None) -> None:
        """Fill in an event's ack/processing times (best effort, not awaited for durability)."""
    async def prune(self, ended_before: float) -> int:
        """Forget what this process keeps in memory of calls that ended before ``ended_before``
        (their late webhooks have stopped coming) and of expired claims; what is on disk or in Redis
        stays (Redis expires ended sessions by itself). Returns the sessions forgotten."""


def open_store(url: str, **options: Any) -> Store:
    """A store for ``memory://``, ``sqlite:///path`` or ``redis://host:port/db``."""
    if url.startswith("memory:"):
        from .memory import MemoryStore
        return MemoryStore()
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore
        # sqlite:///relative.db and sqlite:////absolute.db, as SQLAlchemy spells them
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite://")
        return SQLiteStore(path or "twivapi.db")
    if url.startswith(("redis:", "rediss:")):
        try:
            from .redis import RedisStore
        except ModuleNotFoundError as exc:
            raise ConfigError("TWIVAPI_STORE=redis://... is not available in this build") from exc
        return RedisStore(url, **options)
    raise ConfigError(f"TWIVAPI_STORE {url!r} is not a store URL",
                      hint="use memory://, sqlite:///path/to.db or redis://host:port/db")
