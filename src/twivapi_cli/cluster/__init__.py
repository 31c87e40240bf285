"""The cluster: what bridge instances share besides the store's sessions and event log.

    Cluster (protocol, below)
    ├── LocalCluster   local.py   one bridge process (memory or SQLite store): everything in memory
    └── RedisCluster   redis.py   several instances on one Redis: queues, pub/sub, heartbeats, XREAD

Both implement the whole interface, so the bridge never asks which one it has: it is chosen once,
with the store, from the store URL (``open_state``), and passed to ``create_app``. What it covers:

- per-call queues and their leases (``queues``: ``cluster/queues.py``), drained by ``bridge/drain.py``;
- signals to whoever holds a call's media socket (``publish``; delivered to the ``SignalReceiver``
  given to ``open``, on this instance or another, in order within a call);
- liveness: which sessions belong to an instance that is gone (``lost_calls``), and which sessions
  a bridge starting up must settle itself (``inherited``: a single bridge's previous run);
- following the event log live (``follow``; ``announce`` makes a recorded event visible to it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..models import Event, Session, SignalKind
from ..store import Store
from .queues import CallQueues


@dataclass(frozen=True)
class Dropped:
    """A follower too slow to keep up lost this many events (it is told, the bridge never waits)."""
    count: int


FollowItem = Event | Dropped | None   # None: nothing new for a while (time for a keep-alive)


class SignalReceiver(Protocol):
    """The bridge side of signals (``bridge/signals.py``)."""
    def interested(self, call_sid: str) -> bool:
        """Whether anything on this instance listens or waits for the call."""
    async def deliver(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None: ...


class Cluster(Protocol):
    instance: str          # this bridge instance's id (sessions and leases carry it)
    queues: CallQueues

    async def open(self, receiver: SignalReceiver) -> None:
        """Start hearing signals for ``receiver`` (and, with Redis, saying this instance lives)."""
    async def close(self) -> None: ...
    async def publish(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        """Tell whoever holds the call's media socket; one call's signals arrive in the order sent."""
    def announce(self, event: Event) -> None:
        """An event was just recorded: show it to this instance's followers."""
    def follow(self, store: Store, after_seq: int, *, call_sid: str | None = None,
               once: bool = False) -> AsyncIterator[FollowItem]:
        """The event log after ``after_seq`` (the backlog), then live unless ``once``; every instance's
        events when several share the store."""
    async def lost_calls(self, sessions: list[Session]) -> list[Session]:
        """Of these live sessions, those held by an instance that is gone (their calls must end)."""
    def inherited(self, sessions: list[Session]) -> list[Session]:
        """Of the live sessions found at start-up, those this bridge must settle itself."""
    async def other_instances(self) -> int:
        """How many other bridge instances are alive (a draining one sends new calls to them)."""
    def stats(self) -> dict[str, int]: ...


def open_state(store_url: str, *, prefix: str = "twivapi:", instance: str | None = None) -> tuple[Store, Cluster]:
    """The store for a URL and the cluster that goes with it: with ``redis://``, both on one Redis
    client; anything else, a local cluster."""
    if store_url.startswith(("redis:", "rediss:")):
        from ..store.redis import RedisStore
        from .redis import RedisCluster
        redis_store = RedisStore(store_url, prefix=prefix)
        redis_cluster: Cluster = RedisCluster(redis_store.connection, instance=instance)
        return redis_store, redis_cluster
    from ..store import open_store
    from .local import LocalCluster
    local: Cluster = LocalCluster(instance=instance)
    return open_store(store_url), local
