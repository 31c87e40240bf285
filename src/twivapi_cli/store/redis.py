"""Redis store: several bridge instances sharing sessions, the state machine, idempotency keys, the
event log and cross-instance signals (official ``redis`` client, asyncio).

Keys, under a prefix (``TWIVAPI_REDIS_PREFIX``, default ``twivapi:``):

    s:<CallSid>        the session, JSON        vapi:<id> / stream:<sid>  -> CallSid
    active             zset CallSid -> updated  claim:<key>  idempotency keys (SET NX PX: they expire)
    seq                the event counter        events       a Stream; entry id = "<seq>-0"
    marks:<bucket>     hash "<seq>a"/"<seq>p" -> ack/processed time, 100,000 events a bucket, kept 7 days
    instance:<id>      heartbeat (TTL)
    signal             pub/sub channel for interruptions, ends and readiness (every instance hears it)
    q:<call>           a call's queued Vapi messages (list)     lease:<call>  who drains it (TTL)
    queued             zset call -> when its queue became non-empty

Transitions and status sequences are Lua scripts: read, check, write in one step on the server, so
two instances moving the same call never lose an update. The event log keeps the newest
``EVENT_RETENTION`` entries (XADD MAXLEN ~). Errors (Redis down, timeouts) become ``StoreError``,
which the bridge answers with a 503; the client reconnects by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from ..errors import StoreError
from ..models import ALLOWED, CallState, Event, IllegalTransition, Session

EVENT_RETENTION = 1_000_000
MARKS_PER_BUCKET = 100_000
MARKS_KEPT_S = 7 * 24 * 3600
ENDED_KEPT_S = 24 * 3600.0   # an ended session's key expires after this (the event log keeps its history)
TIMEOUT_S = 1.0

_ALLOWED_JSON = json.dumps({s.value: sorted(t.value for t in targets) for s, targets in ALLOWED.items()})

# KEYS: session, active zset. ARGV: to-state, reason, now, allowed-table JSON, ms an ended session is kept
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {-1, ''} end
local s = cjson.decode(raw)
local allowed = cjson.decode(ARGV[4])[s['state']] or {}
local ok = false
for _, v in ipairs(allowed) do if v == ARGV[1] then ok = true end end
if not ok then return {0, s['state']} end
s['state'] = ARGV[1]
s['updated_at'] = tonumber(ARGV[3])
local ended = ARGV[1] == 'ended' or ARGV[1] == 'failed'
if ended and ARGV[2] ~= '' then s['ended_reason'] = ARGV[2] end
local out = cjson.encode(s)
if ended then
  redis.call('ZREM', KEYS[2], s['call_sid'])
  redis.call('SET', KEYS[1], out, 'PX', ARGV[5])
else
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), s['call_sid'])
  redis.call('SET', KEYS[1], out)
end
return {1, out}
"""

# KEYS: session. ARGV: sequence
_SEQUENCE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local s = cjson.decode(raw)
if tonumber(ARGV[1]) <= tonumber(s['last_status_sequence']) then return 0 end
s['last_status_sequence'] = tonumber(ARGV[1])
redis.call('SET', KEYS[1], cjson.encode(s))
return 1
"""

# KEYS: seq, events. ARGV: event JSON, retention
_APPEND = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', ARGV[1])
return seq
"""


# KEYS: marks bucket. ARGV: seconds kept, field, time[, field, time]
_MARK = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Per-call queues (store/queues.py explains the protocol). KEYS: queue, lease, queued zset.
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

    def __init__(self, store: "RedisStore", instance: str):
        self.store, self.instance = store, instance
        self._scripts = {name: store.redis.register_script(src) for name, src in (
            ("push", _PUSH), ("acquire", _ACQUIRE), ("head", _HEAD), ("release", _RELEASE),
            ("advance", _ADVANCE))}

    def _keys(self, key: str) -> list[str]:
        return [self.store.k("q", key), self.store.k("lease", key), self.store.k("queued")]

    async def push(self, key: str, item: dict, *, limit: int, max_keys: int = 0) -> tuple[bool, bool]:
        code = int(await self.store._do(self._scripts["push"](keys=self._keys(key), args=[
            json.dumps(item, default=str), limit, max_keys, self.instance, QUEUE_LEASE_MS, time.time(), key])))
        return code >= 0, code == 1

    async def acquire(self, key: str) -> bool:
        return bool(await self.store._do(self._scripts["acquire"](
            keys=self._keys(key)[:2], args=[self.instance, QUEUE_LEASE_MS])))

    async def head(self, key: str) -> tuple[bool, dict | None]:
        held, raw = await self.store._do(self._scripts["head"](keys=self._keys(key)[:2],
                                                               args=[self.instance, QUEUE_LEASE_MS]))
        return bool(held), (json.loads(raw) if raw else None)

    async def advance(self, key: str) -> tuple[bool, dict | None]:
        held, raw = await self.store._do(self._scripts["advance"](keys=self._keys(key),
                                                                  args=[self.instance, QUEUE_LEASE_MS, key]))
        return bool(held), (json.loads(raw) if raw else None)

    async def finish(self, key: str) -> bool:
        return bool(await self.store._do(self._scripts["release"](keys=self._keys(key), args=[self.instance, key, 1])))

    async def pause(self, key: str) -> None:
        await self.store._do(self._scripts["release"](keys=self._keys(key), args=[self.instance, key, 0]))

    async def drop(self, key: str) -> int:
        queue, lease, queued = self._keys(key)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.llen(queue).delete(queue, lease).zrem(queued, key)
            count, _, _ = await self.store._do(pipe.execute())
        return int(count)

    async def pending(self, older_than_s: float) -> list[str]:
        return list(await self.store._do(self.store.redis.zrangebyscore(
            self.store.k("queued"), "-inf", time.time() - older_than_s)))


class RedisStore:
    name = "redis"

    def __init__(self, url: str, prefix: str = "twivapi:", instance: str | None = None):
        import redis.asyncio as aioredis
        self.url, self.prefix = url, prefix
        self.redis = aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                       health_check_interval=5, decode_responses=True)
        self.instance = instance
        self._scripts: dict[str, Any] = {}

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _do(self, coro):
        from redis.exceptions import RedisError
        try:
            return await coro
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreError(f"Redis store unavailable: {type(exc).__name__}",
                             hint=f"is Redis reachable at {self._safe_url()}?") from None

    def _safe_url(self) -> str:
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._scripts = {name: self.redis.register_script(src) for name, src in
                         (("transition", _TRANSITION), ("sequence", _SEQUENCE), ("append", _APPEND),
                          ("mark", _MARK))}
        try:
            await self._do(self.redis.ping())
        except StoreError:
            pass   # start anyway: /health says so, webhooks get 503s until Redis answers

    async def close(self) -> None:
        await self.redis.aclose()

    async def health(self) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.redis.ping(), TIMEOUT_S)
            return {"store": self.name, "ok": True}
        except Exception as exc:   # any failure is "not healthy", never an exception out of /health
            return {"store": self.name, "ok": False, "error": type(exc).__name__}

    # --- sessions -------------------------------------------------------------------------------
    async def create_session(self, session: Session) -> bool:
        created = await self._do(self.redis.set(self.k("s", session.call_sid), json.dumps(session.to_dict()), nx=True))
        if created:
            await self._do(self.redis.zadd(self.k("active"), {session.call_sid: session.updated_at}))
            await self._index(session)
        return bool(created)

    async def _index(self, session: Session) -> None:
        if session.vapi_call_id:
            await self._do(self.redis.set(self.k("vapi", session.vapi_call_id), session.call_sid, ex=86400))
        if session.stream_sid:
            await self._do(self.redis.set(self.k("stream", session.stream_sid), session.call_sid, ex=86400))

    async def get_session(self, call_sid: str) -> Session | None:
        raw = await self._do(self.redis.get(self.k("s", call_sid)))
        return Session.from_dict(json.loads(raw)) if raw else None

    async def find_session(self, *, vapi_call_id: str | None = None,
                           stream_sid: str | None = None) -> Session | None:
        call_sid = None
        if vapi_call_id:
            call_sid = await self._do(self.redis.get(self.k("vapi", vapi_call_id)))
        if call_sid is None and stream_sid:
            call_sid = await self._do(self.redis.get(self.k("stream", stream_sid)))
        return await self.get_session(call_sid) if call_sid else None

    async def update_session(self, call_sid: str, **fields: Any) -> Session | None:
        fields.pop("state", None)
        session = await self._do(self._update(call_sid, fields))
        if session is not None:
            await self._index(session)
        return session

    async def _update(self, call_sid: str, fields: dict) -> Session | None:
        """WATCH/MULTI: if another instance changes the session meanwhile, read it again."""
        from redis.exceptions import WatchError
        key = self.k("s", call_sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(50):
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    data = {**json.loads(raw), **fields, "updated_at": time.time()}
                    pipe.multi()
                    pipe.set(key, json.dumps(data))
                    await pipe.execute()
                    return Session.from_dict(data)
                except WatchError:
                    continue
        raise StoreError(f"could not update {call_sid}: too much contention")

    async def transition(self, call_sid: str, to: CallState, *, reason: str | None = None) -> Session:
        code, payload = await self._do(self._scripts["transition"](
            keys=[self.k("s", call_sid), self.k("active")],
            args=[to.value, reason or "", time.time(), _ALLOWED_JSON, int(ENDED_KEPT_S * 1000)]))
        if int(code) == -1:
            raise KeyError(call_sid)
        if int(code) == 0:
            raise IllegalTransition(call_sid, CallState(payload), to)
        return Session.from_dict(json.loads(payload))

    async def apply_status_sequence(self, call_sid: str, sequence: int) -> bool:
        return bool(await self._do(self._scripts["sequence"](keys=[self.k("s", call_sid)], args=[sequence])))

    async def active_sessions(self) -> list[Session]:
        sids = await self._do(self.redis.zrange(self.k("active"), 0, -1))
        sessions = [await self.get_session(s) for s in sids]
        return [s for s in sessions if s is not None and not s.state.terminal]

    async def expired_sessions(self, idle_before: float) -> list[Session]:
        sids = await self._do(self.redis.zrangebyscore(self.k("active"), "-inf", idle_before))
        sessions = [await self.get_session(s) for s in sids]
        return [s for s in sessions if s is not None and not s.state.terminal]

    # --- idempotency ----------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        return bool(await self._do(self.redis.set(self.k("claim", key), "1", nx=True, px=max(1, int(ttl * 1000)))))

    # --- event log ------------------------------------------------------------------------------
    async def append(self, event: Event) -> int:
        payload = json.dumps({k: v for k, v in event.to_dict().items() if k != "seq"}, default=str)
        event.seq = int(await self._do(self._scripts["append"](
            keys=[self.k("seq"), self.k("events")], args=[payload, EVENT_RETENTION])))
        return event.seq

    async def events(self, after_seq: int = 0, *, call_sid: str | None = None, limit: int = 1000) -> list[Event]:
        out: list[Event] = []
        start = f"{after_seq + 1}-0"
        while len(out) < limit:
            entries = await self._do(self.redis.xrange(self.k("events"), min=start, count=1000))
            if not entries:
                break
            marks = await self._marks([int(i.split("-")[0]) for i, _ in entries])
            for entry_id, fields in entries:
                data = json.loads(fields["e"])
                seq = int(entry_id.split("-")[0])
                if call_sid is None or data.get("call_sid") == call_sid:
                    acked, processed = marks.get(seq, (None, None))
                    data["acked_at"] = acked or data.get("acked_at")
                    data["processed_at"] = processed or data.get("processed_at")
                    out.append(Event.from_dict({**data, "seq": seq}))
                    if len(out) >= limit:
                        break
            start = f"{int(entries[-1][0].split('-')[0]) + 1}-0"
        return out

    def _bucket(self, seq: int) -> str:
        return self.k("marks", str(seq // MARKS_PER_BUCKET))

    async def _marks(self, seqs: list[int]) -> dict[int, tuple[float | None, float | None]]:
        out: dict[int, tuple[float | None, float | None]] = {}
        for bucket in sorted({seq // MARKS_PER_BUCKET for seq in seqs}):
            mine = [seq for seq in seqs if seq // MARKS_PER_BUCKET == bucket]
            fields = [f"{seq}{kind}" for seq in mine for kind in "ap"]
            values = await self._do(self.redis.hmget(self._bucket(mine[0]), fields))
            for i, seq in enumerate(mine):
                acked, processed = values[2 * i], values[2 * i + 1]
                out[seq] = (float(acked) if acked else None, float(processed) if processed else None)
        return out

    async def mark(self, seq: int, *, acked_at: float | None = None, processed_at: float | None = None) -> None:
        pairs = [f for f in ((f"{seq}a", acked_at), (f"{seq}p", processed_at)) if f[1]]
        if not pairs:
            return
        try:   # one round trip, no read: each time is a field of its own
            await self._scripts["mark"](keys=[self._bucket(seq)], args=[MARKS_KEPT_S, *(x for f in pairs for x in f)])
        except Exception:   # best effort: a mark never fails a webhook
            pass

    # --- cross-instance signals and liveness -----------------------------------------------------
    async def publish_signal(self, call_sid: str, kind: str, data: dict, origin: str) -> None:
        message = json.dumps({"call_sid": call_sid, "kind": kind, "data": data, "origin": origin}, default=str)
        await self._do(self.redis.publish(self.k("signal"), message))

    async def signals(self) -> AsyncIterator[dict]:
        """Signals from every instance, forever; resubscribes after a Redis outage."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.k("signal"))
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

    def call_queues(self, instance: str) -> RedisQueues:
        return RedisQueues(self, instance)

    async def follow(self, after_seq: int, block_ms: int = 500) -> AsyncIterator[Event | None]:
        """The event log after ``after_seq``, then live, from every instance (XREAD BLOCK); None after
        each quiet ``block_ms``. Ends only when closed; Redis outages are waited out."""
        last = f"{after_seq}-0"
        while True:
            try:
                replies = await self.redis.xread({self.k("events"): last}, count=500, block=block_ms)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                replies = None
            if not replies:
                yield None
                continue
            for _stream, entries in replies:
                for entry_id, fields in entries:
                    last = entry_id
                    yield Event.from_dict({**json.loads(fields["e"]), "seq": int(entry_id.split("-")[0])})

    async def heartbeat(self, instance: str, ttl: float) -> None:
        await self._do(self.redis.set(self.k("instance", instance), str(time.time()), px=int(ttl * 1000)))

    async def alive(self, instance: str) -> bool:
        return bool(await self._do(self.redis.exists(self.k("instance", instance))))

    async def delete_all(self) -> None:
        """Tests: remove every key under this prefix."""
        async for key in self.redis.scan_iter(match=self.prefix + "*", count=500):
            await self.redis.delete(key)
