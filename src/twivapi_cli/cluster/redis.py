"""Several bridge instances on one Redis: the cluster interface over the store's server and prefix.

Keys, under the store's prefix (``TWIVAPI_REDIS_PREFIX``), beside ``store/redis.py``'s:

    q:<call>           a call's queued Vapi messages (list)     lease:<call>  who drains it (TTL)
    queued             zset call -> when its queue became non-empty
    instance:<id>      heartbeat (TTL)
    signal             pub/sub channel for interruptions, ends and readiness (every instance hears it)

Every signal, this instance's own too, goes through the channel, so a media socket hears one call's
signals in the order they were sent even when consecutive messages were processed on different
instances; each call's deliveries are chained on a task of their own, so one call's slow listener
never delays another's. Liveness is a heartbeat key per instance: a session whose instance has no
heartbeat is lost, and the other instances' sweep ends it (a starting instance inherits nothing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..errors import TwivapiError
from ..models import Event, Session, SignalKind
from ..store import Store
from ..store.redis import RedisConnection
from . import FollowItem, SignalReceiver
from .local import backlog
from .queues import CallQueues

log = logging.getLogger("twivapi.bridge")

HEARTBEAT_TTL = 6.0     # an instance whose heartbeat is older than this is gone; its calls end
BLOCK_MS = 500          # a follower hears None after each quiet XREAD block

# Per-call queues (cluster/queues.py explains the protocol). KEYS: queue, lease, queued zset.
# ARGV: item, limit, max_keys, instance, lease ms, now, call key
_PUSH = """
local n = redis.call('LLEN', KEYS[1])
if n >= tonumber(ARGV[2]) then return -1 end
if n == 0 and tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then return -1 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], 'NX', tonumber(ARGV[6]), ARGV[7])
if redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then return 1 end
return 0
"""

# KEYS: queue, lease. ARGV: instance, lease ms
_ACQUIRE = """
if redis.call('LLEN', KEYS[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: queue, lease. ARGV: instance, lease ms. Returns {held, head}
_HEAD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0, false} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {1, redis.call('LINDEX', KEYS[1], 0)}
"""

# KEYS: queue, lease, queued zset. ARGV: instance, lease ms, call key. Pop the head we applied, then
# return the next one (renewing the lease) or, if none, give the lease back. Returns {held, next}
_ADVANCE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0, false} end
redis.call('LPOP', KEYS[1])
local nxt = redis.call('LINDEX', KEYS[1], 0)
if nxt then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {1, nxt}
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[2])
return {1, false}
"""

# KEYS: queue, lease, queued zset. ARGV: instance, call key, empty-only (1) or pause (0)
_RELEASE = """
if ARGV[3] == '1' then
  if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
  redis.call('ZREM', KEYS[3], ARGV[2])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

QUEUE_LEASE_MS = 10_000   # a holder that died is replaced after this (the sweep takes over its queues)


class RedisQueues:
    """``CallQueues`` in Redis: any instance may push a call's messages; one at a time drains them."""

    def __init__(self, conn: RedisConnection, instance: str):
        self.conn, self.instance = conn, instance
        self._scripts = {name: conn.redis.register_script(src) for name, src in (
            ("push", _PUSH), ("acquire", _ACQUIRE), ("head", _HEAD), ("release", _RELEASE),
            ("advance", _ADVANCE))}

    def _keys(self, key: str) -> list[str]:
        return [self.conn.k("q", key), self.conn.k("lease", key), self.conn.k("queued")]

    async def push(self, key: str, item: dict, *, limit: int, max_keys: int = 0) -> tuple[bool, bool]:
        code = int(await self.conn.do(self._scripts["push"](keys=self._keys(key), args=[
            json.dumps(item, default=str), limit, max_keys, self.instance, QUEUE_LEASE_MS, time.time(), key])))
        return code >= 0, code == 1

    async def acquire(self, key: str) -> bool:
        return bool(await self.conn.do(self._scripts["acquire"](
            keys=self._keys(key)[:2], args=[self.instance, QUEUE_LEASE_MS])))

    async def head(self, key: str) -> tuple[bool, dict | None]:
        held, raw = await self.conn.do(self._scripts["head"](keys=self._keys(key)[:2],
                                                               args=[self.instance, QUEUE_LEASE_MS]))
        return bool(held), (json.loads(raw) if raw else None)

    async def advance(self, key: str) -> tuple[bool, dict | None]:
        held, raw = await self.conn.do(self._scripts["advance"](keys=self._keys(key),
                                                                  args=[self.instance, QUEUE_LEASE_MS, key]))
        return bool(held), (json.loads(raw) if raw else None)

    async def finish(self, key: str) -> bool:
        return bool(await self.conn.do(self._scripts["release"](keys=self._keys(key), args=[self.instance, key, 1])))

    async def pause(self, key: str) -> None:
        await self.conn.do(self._scripts["release"](keys=self._keys(key), args=[self.instance, key, 0]))

    async def drop(self, key: str) -> int:
        queue, lease, queued = self._keys(key)
        async with self.conn.redis.pipeline(transaction=True) as pipe:
            pipe.llen(queue)
            pipe.delete(queue, lease)
            pipe.zrem(queued, key)
            count, _, _ = await self.conn.do(pipe.execute())
        return int(count)

    async def pending(self, older_than_s: float) -> list[str]:
        return list(await self.conn.do(self.conn.redis.zrangebyscore(
            self.conn.k("queued"), "-inf", time.time() - older_than_s)))

    def stats(self) -> dict[str, int]:
        return {}   # shared by every instance: counted by none


class RedisCluster:
    """Over the store's own connection (``RedisStore.connection``): one client, one pool, whose
    health the store's checks keep; the store closes it."""

    def __init__(self, conn: RedisConnection, *, instance: str | None = None):
        self.instance = instance or uuid.uuid4().hex[:8]
        self.conn = conn
        self.queues: CallQueues = RedisQueues(self.conn, self.instance)
        self._receiver: SignalReceiver | None = None
        self._tasks: list[asyncio.Task] = []
        self._deliveries: dict[str, asyncio.Task] = {}   # each call's latest signal delivery

    async def open(self, receiver: SignalReceiver) -> None:
        self._receiver = receiver
        self._tasks = [asyncio.create_task(self._relay(receiver), name="signals"),
                       asyncio.create_task(self._heartbeat(), name="heartbeat")]

    async def close(self) -> None:
        tasks = self._tasks + list(self._deliveries.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    # --- signals --------------------------------------------------------------------------------------
    async def publish(self, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        message = json.dumps({"call_sid": call_sid, "kind": kind.value, "data": data, "origin": self.instance},
                             default=str)
        try:
            await self.conn.do(self.conn.redis.publish(self.conn.k("signal"), message))
        except TwivapiError as exc:
            log.warning("could not publish %s for %s: %s (delivered here only)", kind.value, call_sid, exc)
            if self._receiver is not None:
                await self._receiver.deliver(call_sid, kind, data)

    async def _relay(self, receiver: SignalReceiver) -> None:
        async for message in self._signals():
            call_sid = message.get("call_sid")
            if isinstance(call_sid, str) and receiver.interested(call_sid):
                try:
                    kind = SignalKind(str(message.get("kind")))
                except ValueError:
                    continue
                self._chain(receiver, call_sid, kind, message.get("data") or {})

    def _chain(self, receiver: SignalReceiver, call_sid: str, kind: SignalKind, data: dict[str, Any]) -> None:
        before = self._deliveries.get(call_sid)

        async def deliver() -> None:
            if before is not None:
                await asyncio.wait([before])
            await receiver.deliver(call_sid, kind, data)

        task = asyncio.create_task(deliver(), name=f"signal-{call_sid}")
        self._deliveries[call_sid] = task
        task.add_done_callback(lambda done: self._deliveries.pop(call_sid, None)
                               if self._deliveries.get(call_sid) is done else None)

    async def _signals(self) -> AsyncIterator[dict]:
        """Signals from every instance, forever; resubscribes after a Redis outage."""
        while True:
            pubsub = self.conn.redis.pubsub()
            try:
                await pubsub.subscribe(self.conn.k("signal"))
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield json.loads(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    # --- the shared event log ------------------------------------------------------------------------
    def announce(self, event: Event) -> None:
        pass   # already in the shared log (the store appended it): every follower reads it there

    async def follow(self, store: Store, after_seq: int, *, call_sid: str | None = None,
                     once: bool = False) -> AsyncIterator[FollowItem]:
        """Backlog, then live from every instance (XREAD BLOCK); Redis outages are waited out."""
        last_seq = after_seq
        async for event in backlog(store, after_seq, call_sid):
            last_seq = event.seq or last_seq
            yield event
        if once:
            return
        last = f"{last_seq}-0"
        while True:
            try:
                replies = await self.conn.redis.xread({self.conn.k("events"): last}, count=500, block=BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                replies = None
            if not replies:
                yield None
                continue
            for _stream, entries in _stream_entries(replies):
                for entry_id, fields in entries:
                    last = entry_id
                    event = Event.from_dict({**json.loads(fields["e"]), "seq": int(entry_id.split("-")[0])})
                    if call_sid is None or event.call_sid == call_sid:
                        yield event

    # --- liveness -------------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.conn.do(self.conn.redis.set(self.conn.k("instance", self.instance), str(time.time()),
                                                       px=int(HEARTBEAT_TTL * 1000)))
            except TwivapiError:
                pass   # Redis down: /health says so; we try again
            await asyncio.sleep(HEARTBEAT_TTL / 3)

    async def alive(self, instance: str) -> bool:
        return bool(await self.conn.do(self.conn.redis.exists(self.conn.k("instance", instance))))

    async def lost_calls(self, sessions: list[Session]) -> list[Session]:
        alive: dict[str, bool] = {self.instance: True}
        lost = []
        for session in sessions:
            owner = session.instance
            if not owner or owner == self.instance:
                continue
            if owner not in alive:
                alive[owner] = await self.alive(owner)
            if not alive[owner]:
                lost.append(session)
        return lost

    async def other_instances(self) -> int:
        mine = self.conn.k("instance", self.instance)
        count = 0
        async for key in self.conn.redis.scan_iter(match=self.conn.k("instance", "*"), count=500):
            count += key != mine
        return count

    def inherited(self, sessions: list[Session]) -> list[Session]:
        return []   # another instance's calls: the sweep ends them once its heartbeat is gone

    def stats(self) -> dict[str, int]:
        return self.queues.stats()


def _stream_entries(replies: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREAD's answer as redis-py gives it (typed loosely there): [(stream, [(id, fields)])]."""
    return list(replies)
