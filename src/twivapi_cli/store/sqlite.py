"""SQLite store: the embedded default for one bridge instance.

Reads are served from memory (``MemoryStore``); every change is also written by one writer thread
that batches whatever is waiting into a single transaction (group commit, WAL). A caller that
changes state awaits its batch's commit, so an acknowledged webhook survives SIGKILL, while a
thousand concurrent webhooks cost a handful of commits rather than a thousand. On open, live
sessions, idempotency keys and the event sequence are loaded back from the file.

A write that fails (database locked by another process, disk full) raises ``StoreError`` (the
bridge answers 503) and is undone in memory too, so Twilio's retry of that webhook is processed as
the first delivery it is: not as a duplicate, not as an existing session. While writes fail,
``health()`` tries a one-row probe write, so the store reports itself healthy again as soon as
the lock is released or space is freed, without waiting for webhooks a load balancer is withholding.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from ..errors import StoreError
from ..models import Event, Session, Transition, Trigger
from .memory import MemoryStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (call_sid TEXT PRIMARY KEY, state TEXT NOT NULL, data TEXT NOT NULL,
                                     updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions(state);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, call_sid TEXT, type TEXT NOT NULL,
                                   data TEXT NOT NULL, received_at REAL NOT NULL, acked_at REAL,
                                   processed_at REAL);
CREATE INDEX IF NOT EXISTS events_call ON events(call_sid, seq);
"""
BATCH_MAX = 2000
CHECKPOINT_EVERY_S = 0.5  # the checkpointer copies the WAL into the database at most this often
NON_DURABLE_LINGER_S = 0.05  # writes nobody awaits wait this long for company: 100 a second, a few commits
HEALTH_PROBE_WAIT = 0.5   # seconds /health waits for a probe write while the store is failing
_STOP = object()


class GroupCommitWriter:
    """One thread that owns the write connection: whatever is waiting goes into one transaction
    (group commit), and each waiting caller's future is settled with the batch's outcome.

    A second thread checkpoints the WAL (copies it into the database file), on its own connection.
    SQLite's automatic checkpoint runs inside the commit that crosses 1,000 pages, so that commit,
    and every ack waiting on it, took 100-140 ms longer (bench_burst); a passive checkpoint beside
    the writer never blocks it (WAL mode lets a checkpoint and a write run at once)."""

    _SQL = {
        "session": "INSERT INTO sessions (call_sid, state, data, updated_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(call_sid) DO UPDATE SET state=excluded.state, data=excluded.data, "
                   "updated_at=excluded.updated_at",
        "claim": "INSERT OR REPLACE INTO claims (key, expires_at) VALUES (?, ?)",
        "event": "INSERT INTO events (seq, call_sid, type, data, received_at, acked_at, processed_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
        "probe": "INSERT OR REPLACE INTO claims (key, expires_at) VALUES ('twivapi:health-probe', -?)",
        "mark": "UPDATE events SET acked_at = COALESCE(?, acked_at), processed_at = COALESCE(?, processed_at) "
                "WHERE seq = ?",
    }

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop,
                 checkpoint_conn: sqlite3.Connection | None = None):
        self._conn, self._loop = conn, loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.commits = 0
        self.checkpointed = 0   # the commits the last checkpoint copied into the database file
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twivapi-sqlite", daemon=True)
        self._thread.start()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_conn is not None:
            conn.execute("PRAGMA wal_autocheckpoint=0")   # no checkpoint inside a commit
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_conn,),
                                                  name="twivapi-sqlite-checkpoint", daemon=True)
            self._checkpointer.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, kind: str, row: tuple, future: asyncio.Future | None = None) -> None:
        self._queue.put((kind, row, future))

    async def stop(self) -> None:
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, 10)
        self._stopping.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join, 10)

    def _checkpoint_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while not self._stopping.wait(CHECKPOINT_EVERY_S):
                commits = self.commits
                if commits == self.checkpointed:
                    continue
                try:
                    busy, wal_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    continue   # a locked or full disk: the writer reports it; the next round tries again
                if not busy and copied == wal_frames:   # all of it: the next write starts the WAL afresh
                    self.checkpointed = commits
        finally:
            conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            self._take_waiting(batch)
            if not any(item is _STOP or item[2] is not None for item in batch):
                self._linger(batch)
            if _STOP in batch:
                stop = True
                batch = [item for item in batch if item is not _STOP]
            error = self._commit(batch)
            futures = [item[2] for item in batch if item[2] is not None]
            if futures:
                self._loop.call_soon_threadsafe(_settle, futures, error)
        self._conn.close()

    def _take_waiting(self, batch: list) -> None:
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _linger(self, batch: list) -> None:
        """Only writes nobody waits for (``durable=False``: latency samples, ack marks): gather
        what follows for up to NON_DURABLE_LINGER_S so a trickle of them is one commit, not one
        each; a durable write or the stop ends the wait at once."""
        deadline = time.monotonic() + NON_DURABLE_LINGER_S
        while len(batch) < BATCH_MAX and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return
            batch.append(item)
            if item is _STOP or item[2] is not None:
                self._take_waiting(batch)
                return

    def _commit(self, batch: list) -> BaseException | None:
        conn = self._conn
        # One executemany per kind rather than one execute per row: this thread holds the GIL for
        # each call into sqlite3, time the event loop's acks wait for. Rows keep their order within a
        # kind (a call's session writes, its claims); across tables only one order matters, an
        # event's insert before its mark, and the transaction is committed whole either way.
        rows: dict[str, list[tuple]] = {kind: [] for kind in self._SQL}
        for kind, row, _ in batch:
            rows[kind].append(row)
        try:
            conn.execute("BEGIN")
            for kind, sql in self._SQL.items():
                if rows[kind]:
                    conn.executemany(sql, rows[kind])
            conn.execute("COMMIT")
            self.commits += 1
            self.error = None
            return None
        except (sqlite3.Error, OSError) as exc:  # disk full, locked: report, keep serving reads
            self.error = exc
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return exc


class SQLiteStore(MemoryStore):
    name = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0):
        super().__init__()
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._writer: GroupCommitWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changes: dict[str, int] = {}          # session writes per call, to undo only our own
        self._probe: asyncio.Future | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # callers' numbers live here: owner-only; SQLite gives its -wal and -shm the same mode
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(self.path, 0o600)
            conn = self._connect()
            self._load(conn)
            checkpoint_conn = self._connect(schema=False)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}",
                             hint="check TWIVAPI_STORE / --store and that the directory is writable") from None
        self._writer = GroupCommitWriter(conn, self._loop, checkpoint_conn)

    async def close(self) -> None:
        if self._writer:
            await self._writer.stop()
            self._writer = None

    async def health(self) -> dict[str, Any]:
        writer = self._writer
        if writer is not None and writer.error is not None and writer.alive:
            await self._probe_write(writer)
        ok = writer is not None and writer.error is None and writer.alive
        result: dict[str, Any] = {"store": self.name, "ok": ok}
        if writer is not None and writer.error is not None:
            result["error"] = type(writer.error).__name__
        return result

    def _connect(self, schema: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=self.busy_timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        if schema:
            conn.executescript(SCHEMA)
        return conn

    def _load(self, conn: sqlite3.Connection) -> None:
        for (data,) in conn.execute("SELECT data FROM sessions WHERE state NOT IN ('ended', 'failed')"):
            session = Session.from_dict(json.loads(data))
            self._sessions[session.call_sid] = session
            self._index(session)
        now = time.time()
        self._claims = dict(conn.execute("SELECT key, expires_at FROM claims WHERE expires_at > ?", (now,)))
        self._seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        rows = conn.execute(_EVENT_COLUMNS + " ORDER BY seq DESC LIMIT 5000").fetchall()
        self._events.extend(_event(row) for row in reversed(rows))

    async def _probe_write(self, writer: GroupCommitWriter) -> None:
        """One small write through the writer; a success clears the error. Shared by concurrent
        health checks, waited for at most HEALTH_PROBE_WAIT (a locked file keeps it longer)."""
        if self._probe is None or self._probe.done():
            self._probe = probe = self._running_loop().create_future()
            probe.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            writer.put("probe", (time.time(),), probe)
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), HEALTH_PROBE_WAIT)
        except (TimeoutError, StoreError):
            pass

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StoreError(f"SQLite store {self.path} is not open")
        return self._loop

    # --- failed writes are undone in memory -------------------------------------------------------
    async def create_session(self, session: Session, *, durable: bool = True) -> bool:
        return await self._undo_on_failure(session.call_sid, durable,
                                           super().create_session(session, durable=durable))

    async def update_session(self, call_sid: str, *, durable: bool = True, **fields: Any) -> Session | None:
        return await self._undo_on_failure(call_sid, durable,
                                           super().update_session(call_sid, durable=durable, **fields))

    async def transition(self, call_sid: str, trigger: Trigger, *, reason: str | None = None,
                         durable: bool = True) -> Transition:
        return await self._undo_on_failure(call_sid, durable, super().transition(
            call_sid, trigger, reason=reason, durable=durable))

    async def apply_status_sequence(self, call_sid: str, sequence: int) -> bool:
        return await self._undo_on_failure(call_sid, True, super().apply_status_sequence(call_sid, sequence))

    async def _undo_on_failure(self, call_sid: str, durable: bool, change: Any) -> Any:
        if not durable:   # queued, not awaited: a failure is never reported to this caller
            return await change
        current = self._sessions.get(call_sid)
        before = None
        if current is not None:
            before = current.copy()
        changes = self._changes.get(call_sid, 0)
        try:
            return await change
        except StoreError:
            if self._changes.get(call_sid, 0) == changes + 1:   # nobody changed it since: put it back
                self._restore(call_sid, before)
            raise

    def _restore(self, call_sid: str, before: Session | None) -> None:
        failed = self._sessions.pop(call_sid, None)
        if failed is not None:
            for index, key in ((self._by_vapi, failed.vapi_call_id), (self._by_stream, failed.stream_sid)):
                if key and index.get(key) == call_sid:
                    del index[key]
        if before is not None:
            self._sessions[call_sid] = before
            self._index(before)

    async def prune(self, ended_before: float) -> int:
        gone = await super().prune(ended_before)
        if gone:   # forgotten calls: their write counters too
            self._changes = {sid: n for sid, n in self._changes.items() if sid in self._sessions}
        return gone

    async def claim(self, key: str, ttl: float) -> bool:
        try:
            return await super().claim(key, ttl)
        except StoreError:
            self._claims.pop(key, None)   # not claimed: the retry of this request is its first delivery
            raise

    async def append(self, event: Event, *, durable: bool = True) -> int:
        try:
            return await super().append(event, durable=durable)
        except StoreError:
            if self._events and self._events[-1] is event:   # never acknowledged: not in the log
                self._events.pop()
            raise

    # --- persistence hooks ----------------------------------------------------------------------
    async def _persist(self, kind: str, payload: Any, durable: bool = True) -> None:
        if kind == "session":
            self._changes[payload.call_sid] = self._changes.get(payload.call_sid, 0) + 1
        writer = self._open_writer()
        if not durable:
            writer.put(kind, _row(kind, payload))
            return
        future = self._running_loop().create_future()
        writer.put(kind, _row(kind, payload), future)
        await future

    async def _persist_mark(self, seq: int, acked_at: float | None, processed_at: float | None) -> None:
        self._open_writer().put("mark", (acked_at, processed_at, seq))

    def _open_writer(self) -> GroupCommitWriter:
        if self._writer is None:
            raise StoreError(f"SQLite store {self.path} is not open")
        return self._writer

    async def events(self, after_seq: int = 0, *, call_sid: str | None = None, limit: int = 1000) -> list[Event]:
        oldest = self._events[0].seq if self._events else self._seq + 1
        if oldest is not None and after_seq + 1 >= oldest:
            return await super().events(after_seq, call_sid=call_sid, limit=limit)
        return await asyncio.to_thread(self._read_events, after_seq, call_sid, limit)

    def _read_events(self, after_seq: int, call_sid: str | None, limit: int) -> list[Event]:
        conn = sqlite3.connect(self.path, timeout=5)
        try:
            sql = _EVENT_COLUMNS + " WHERE seq > ?"
            args: list[Any] = [after_seq]
            if call_sid:
                sql += " AND call_sid = ?"
                args.append(call_sid)
            rows = conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        finally:
            conn.close()
        return [_event(row) for row in rows]


_EVENT_COLUMNS = "SELECT seq, call_sid, type, data, received_at, acked_at, processed_at FROM events"


def _event(row: tuple) -> Event:
    seq, call_sid, type_, data, received, acked, processed = row
    return Event(type=type_, call_sid=call_sid, data=json.loads(data), received_at=received, acked_at=acked,
                 processed_at=processed, seq=seq)


def _row(kind: str, payload: Any) -> tuple:
    if kind == "session":
        return (payload.call_sid, payload.state.value, _json(payload.to_dict()), payload.updated_at)
    if kind == "claim":
        return tuple(payload)
    return (payload.seq, payload.call_sid, payload.type, _json(payload.data),
            payload.received_at, payload.acked_at, payload.processed_at)


# dataclasses and datetimes go to ``default`` (str), as with json.dumps, not orjson's own forms
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _json(value: Any) -> str:
    """A row's JSON text, built on the event loop for every session and event write (4 and 5 a
    call): orjson takes 1.1 us for a session and 0.2 us for a webhook's event where json.dumps took
    4.9 and 2.4 us. What orjson refuses (an integer past 64 bits, a key that is not a string, nesting
    past 254) is written by json.dumps. For what events carry (parsed JSON bodies, which never hold
    NaN, and the bridge's own strings and numbers) the text reads back as json.dumps's did; orjson
    differs only for types they never hold (a float subclass such as numpy's goes to ``default``, an
    Enum is written as its value)."""
    try:
        return orjson.dumps(value, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:   # orjson.JSONEncodeError is one
        return json.dumps(value, default=str)


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(StoreError(f"SQLite write failed: {error}"))
