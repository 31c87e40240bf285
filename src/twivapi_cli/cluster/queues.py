"""Per-call message queues: each call's Vapi messages are applied one at a time, in the order they
were acknowledged, by whichever process holds the call's lease.

    CallQueues (protocol, below)
    ├── LocalQueues   one bridge process (LocalCluster): a deque and a flag per call
    └── RedisQueues   several instances (cluster/redis.py): a list and a leased key per call in Redis

The drain loop that uses them lives in ``bridge/drain.py``; it is the same for both:

    push(item) -> got the lease?  yes: drain        drain: head -> apply -> advance -> apply ... until empty
    head is for a call we don't know yet: pause()    (parked; release() or the sweep drains it later)

``advance`` (and ``finish``) give the lease back only if the queue is empty, in one step, so an item
pushed while the holder was busy is never stranded: its pusher failed to take the lease, so the
holder sees it.
Delivery is at least once: an item is popped after it was applied, so a holder that dies between
the two leaves it for the next holder (applying a message twice is harmless: transitions are guarded).
"""

from __future__ import annotations

import collections
import time
from typing import Protocol


class CallQueues(Protocol):
    async def push(self, key: str, item: dict, *, limit: int, max_keys: int = 0) -> tuple[bool, bool]:
        """Append; returns (accepted, lease taken). Refused past ``limit`` items for the key, or,
        when ``max_keys`` > 0 and the key has no queue yet, past ``max_keys`` queued keys."""
    async def acquire(self, key: str) -> bool:
        """Take the lease of a non-empty queue nobody holds."""
    async def head(self, key: str) -> tuple[bool, dict | None]:
        """(still the holder, first item or None); renews the lease."""
    async def advance(self, key: str) -> tuple[bool, dict | None]:
        """Pop the applied head; (still the holder, next item), or (True, None) once the queue is
        empty, the lease then given back in the same step."""
    async def finish(self, key: str) -> bool:
        """Give the lease back if the queue is empty (True); False: more to do, keep draining."""
    async def pause(self, key: str) -> None:
        """Give the lease back, keep the items (their call is not known yet)."""
    async def drop(self, key: str) -> int:
        """Remove the queue; the number of items it held."""
    async def pending(self, older_than_s: float) -> list[str]:
        """Keys whose queue has been non-empty for longer than ``older_than_s``."""
    def stats(self) -> dict[str, int]:
        """Queued and parked calls, for /health (Redis: this instance's view is not kept: empty)."""


class LocalQueues:
    """One process: the lease is a set membership, time is monotonic."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[dict]] = {}
        self._since: dict[str, float] = {}
        self._held: set[str] = set()

    def __len__(self) -> int:
        return len(self._queues)

    async def push(self, key: str, item: dict, *, limit: int, max_keys: int = 0) -> tuple[bool, bool]:
        queue = self._queues.get(key)
        if queue is None:
            if max_keys and len(self._queues) >= max_keys:
                return False, False
            queue = self._queues[key] = collections.deque()
            self._since[key] = time.monotonic()
        if len(queue) >= limit:
            return False, False
        queue.append(item)
        return True, await self.acquire(key)

    async def acquire(self, key: str) -> bool:
        if key in self._held or not self._queues.get(key):
            return False
        self._held.add(key)
        return True

    async def head(self, key: str) -> tuple[bool, dict | None]:
        queue = self._queues.get(key)
        return key in self._held, (queue[0] if queue else None)

    async def advance(self, key: str) -> tuple[bool, dict | None]:
        if key not in self._held:
            return False, None
        queue = self._queues.get(key)
        if queue:
            queue.popleft()
        if queue:
            return True, queue[0]
        await self.finish(key)
        return True, None

    async def finish(self, key: str) -> bool:
        if self._queues.get(key):
            return False
        self._queues.pop(key, None)
        self._since.pop(key, None)
        self._held.discard(key)
        return True

    async def pause(self, key: str) -> None:
        self._held.discard(key)

    async def drop(self, key: str) -> int:
        self._since.pop(key, None)
        self._held.discard(key)
        return len(self._queues.pop(key, ()))

    async def pending(self, older_than_s: float) -> list[str]:
        cutoff = time.monotonic() - older_than_s
        return [key for key, since in self._since.items() if since < cutoff]

    def stats(self) -> dict[str, int]:
        return {"queued_calls": len(self._queues), "parked_calls": len(self._queues) - len(self._held)}
