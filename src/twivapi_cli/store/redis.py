"""Redis store: several bridge instances sharing sessions, the state machine, idempotency keys and
the event log (official ``redis`` client, asyncio). What else instances share (per-call queues,
signals, heartbeats, following the log) is ``cluster/redis.py``'s, on the same server and prefix.

Keys, under a prefix (``TWIVAPI_REDIS_PREFIX``, default ``twivapi:``):

    s:<CallSid>        the session, JSON        vapi:<id> / stream:<sid>  -> CallSid
    active             zset CallSid -> updated  claim:<key>  idempotency keys (SET NX PX: they expire)
    seq                the event counter        events       a Stream; entry id = "<seq>-0"
    marks:<bucket>     hash "<seq>a"/"<seq>p" -> ack/processed time, 100,000 events a bucket, kept 7 days

Creating, updating and moving a session, and status sequences, are Lua scripts: read, check, write
in one step on the server (one round trip each), so two instances changing the same call never lose
an update. The event log keeps the newest
``EVENT_RETENTION`` entries (XADD MAXLEN ~). Errors (Redis down, timeouts) become ``StoreError``,
which the bridge answers with a 503; the client reconnects by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ..errors import StoreError
from ..models import TRANSITIONS, CallState, Event, Outcome, Session, Transition, Trigger

EVENT_RETENTION = 1_000_000
MARKS_PER_BUCKET = 100_000
MARKS_KEPT_S = 7 * 24 * 3600
MGET_CHUNK = 500             # sessions read in one round trip (a few hundred KB at most)
ENDED_KEPT_S = 24 * 3600.0   # an ended session's key expires after this (the event log keeps its history)
TIMEOUT_S = 1.0
MAX_CONNECTIONS = 512   # per process; past it a command waits for one (Redis allows 10,000 clients)

# models.TRANSITIONS as "<state> <trigger>" -> next state, for the Lua script
_TABLE_JSON = json.dumps({f"{state.value} {trigger.value}": to.value for (state, trigger), to in TRANSITIONS.items()})

# KEYS: session, active zset. ARGV: trigger, reason, now, table JSON, ms an ended session is kept.
# Returns {code, previous state, session JSON}: code -1 unknown call, 0 rejected, 2 already there, 1 moved
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {-1, '', ''} end
local s = cjson.decode(raw)
local previous = s['state']
local to = cjson.decode(ARGV[4])[previous .. ' ' .. ARGV[1]]
if not to then return {0, previous, raw} end
if to == previous then return {2, previous, raw} end
s['state'] = to
s['updated_at'] = tonumber(ARGV[3])
local ended = to == 'ended' or to == 'failed'
if ended and ARGV[2] ~= '' then s['ended_reason'] = ARGV[2] end
local out = cjson.encode(s)
if ended then
  redis.call('ZREM', KEYS[2], s['call_sid'])
  redis.call('SET', KEYS[1], out, 'PX', ARGV[5])
else
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), s['call_sid'])
  redis.call('SET', KEYS[1], out)
end
return {1, previous, out}
"""

# KEYS: session, active zset. ARGV: session JSON, its updated_at, CallSid. Returns 1 created, 0 existed
_CREATE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[3])
return 1
"""

# KEYS: session. ARGV: fields JSON, now. Returns the session JSON, or false for an unknown call.
# KEEPTTL: an ended session's key still expires (ENDED_KEPT_S) after a late update.
_UPDATE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local s = cjson.decode(raw)
for name, value in pairs(cjson.decode(ARGV[1])) do s[name] = value end
s['updated_at'] = tonumber(ARGV[2])
local out = cjson.encode(s)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return out
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

class RedisConnection:
    """A client for one Redis URL and key prefix; its failures become ``StoreError`` (the bridge
    answers 503), naming the server but never a password. Shared by the store and the cluster."""

    def __init__(self, url: str, prefix: str = "twivapi:"):
        import redis.asyncio as aioredis
        self.url, self.prefix = url, prefix
        # A pool that waits (up to TIMEOUT_S) for a connection when all are busy: redis-py's default
        # pool holds 100 and raises MaxConnectionsError at the 101st, which a load of 50 webhooks and
        # their setups in flight reached (503s to Twilio, failed setups: bench_scaleout, 2026-12-02).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S, health_check_interval=5, decode_responses=True)
        self.redis = aioredis.Redis.from_pool(pool)   # closed with the client

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def do(self, coro: Any) -> Any:
        from redis.exceptions import RedisError
        try:
            return await coro
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(f"Redis store unavailable: {type(exc).__name__}",
                             hint=f"is Redis reachable at {self.safe_url()}?") from None

    def safe_url(self) -> str:
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


class RedisStore:
    name = "redis"

    def __init__(self, url: str, prefix: str = "twivapi:"):
        self.connection = RedisConnection(url, prefix)
        self.url, self.prefix, self.redis = url, prefix, self.connection.redis
        self.k, self._do = self.connection.k, self.connection.do
        self._scripts: dict[str, Any] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._scripts = {name: self.redis.register_script(src) for name, src in
                         (("transition", _TRANSITION), ("sequence", _SEQUENCE), ("append", _APPEND),
                          ("mark", _MARK), ("create", _CREATE), ("update", _UPDATE))}
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
    async def create_session(self, session: Session, *, durable: bool = True) -> bool:
        # one round trip: the key and the active set in one script (SET NX, then ZADD only if it set)
        created = int(await self._do(self._scripts["create"](
            keys=[self.k("s", session.call_sid), self.k("active")],
            args=[json.dumps(session.to_dict()), session.updated_at, session.call_sid])))
        if created:
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

    async def update_session(self, call_sid: str, *, durable: bool = True, **fields: Any) -> Session | None:
        fields.pop("state", None)
        session = await self._do(self._update(call_sid, fields))
        if session is not None:
            await self._index(session)
        return session

    async def _update(self, call_sid: str, fields: dict) -> Session | None:
        """Read, merge and write on the server in one step (a script): another instance's change in
        between cannot be lost, in one round trip (WATCH/GET/MULTI/EXEC took three)."""
        raw = await self._scripts["update"](keys=[self.k("s", call_sid)], args=[json.dumps(fields), time.time()])
        return Session.from_dict(json.loads(raw)) if raw else None

    async def transition(self, call_sid: str, trigger: Trigger, *, reason: str | None = None,
                         durable: bool = True) -> Transition:
        code, previous, payload = await self._do(self._scripts["transition"](
            keys=[self.k("s", call_sid), self.k("active")],
            args=[trigger.value, reason or "", time.time(), _TABLE_JSON, int(ENDED_KEPT_S * 1000)]))
        if int(code) == -1:
            return Transition(Outcome.UNKNOWN)
        outcome = {0: Outcome.REJECTED, 1: Outcome.MOVED, 2: Outcome.ALREADY}[int(code)]
        return Transition(outcome, Session.from_dict(json.loads(payload)), CallState(previous))

    async def apply_status_sequence(self, call_sid: str, sequence: int) -> bool:
        return bool(await self._do(self._scripts["sequence"](keys=[self.k("s", call_sid)], args=[sequence])))

    async def active_sessions(self) -> list[Session]:
        return await self._live(await self._do(self.redis.zrange(self.k("active"), 0, -1)))

    async def count_active(self) -> int:
        # the scripts keep the active set exactly the sessions not ended: one round trip, not one a call
        return int(await self._do(self.redis.zcard(self.k("active"))))

    async def expired_sessions(self, idle_before: float) -> list[Session]:
        return await self._live(await self._do(self.redis.zrangebyscore(self.k("active"), "-inf", idle_before)))

    async def _live(self, call_sids: list[str]) -> list[Session]:
        """The sessions of these calls that exist and have not ended: an MGET per ``MGET_CHUNK``, not a
        GET each (the sweeper reads every live call each round: 1,000 of them took 130 ms of round trips)."""
        sessions = []
        for at in range(0, len(call_sids), MGET_CHUNK):
            keys = [self.k("s", sid) for sid in call_sids[at:at + MGET_CHUNK]]
            sessions += [Session.from_dict(json.loads(raw)) for raw in await self._do(self.redis.mget(keys)) if raw]
        return [s for s in sessions if not s.state.terminal]

    # --- idempotency ----------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        return bool(await self._do(self.redis.set(self.k("claim", key), "1", nx=True, px=max(1, int(ttl * 1000)))))

    # --- event log ------------------------------------------------------------------------------
    async def append(self, event: Event, *, durable: bool = True) -> int:
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

    async def prune(self, ended_before: float) -> int:
        return 0   # nothing kept in this process; ended sessions' keys expire by themselves (ENDED_KEPT_S)

    async def delete_all(self) -> None:
        """Tests: remove every key under this prefix."""
        async for key in self.redis.scan_iter(match=self.prefix + "*", count=500):
            await self.redis.delete(key)
