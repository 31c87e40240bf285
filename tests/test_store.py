"""The store contract, run against every store implementation."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest

from twivapi_cli.models import CallState, Event, Outcome, Session, Trigger
from twivapi_cli.store import open_store
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.store.sqlite import SQLiteStore


def redis_available() -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def fresh_redis():
    """An open RedisStore under a key prefix of its own, every key deleted afterwards."""
    if not redis_available():
        pytest.skip("no Redis server on 127.0.0.1:6379 (scripts/ensure-redis.sh starts one)")
    from twivapi_cli.store.redis import RedisStore
    s = RedisStore("redis://127.0.0.1:6379/0", prefix=f"twivapi-test:{uuid.uuid4().hex[:8]}:")
    await s.open()
    try:
        yield s
    finally:
        await s.delete_all()
        await s.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request, tmp_path):
    if request.param == "redis":
        async with fresh_redis() as s:
            yield s
        return
    s = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "s.db")
    await s.open()
    yield s
    await s.close()


async def test_create_is_idempotent(store):
    assert await store.create_session(Session("CA1", "stream"))
    assert not await store.create_session(Session("CA1", "bypass"))
    assert (await store.get_session("CA1")).mode == "stream"


async def test_transitions_are_guarded(store):
    await store.create_session(Session("CA1", "stream"))
    assert (await store.transition("CA1", Trigger.SETUP_STARTED)).outcome is Outcome.MOVED
    assert (await store.transition("CA1", Trigger.END, reason="twilio-completed")).outcome is Outcome.MOVED
    refused = await store.transition("CA1", Trigger.MEDIA_CONNECTED)
    assert refused.outcome is Outcome.REJECTED and refused.previous == CallState.ENDED
    session = await store.get_session("CA1")
    assert session.state == CallState.ENDED and session.ended_reason == "twilio-completed"
    assert (await store.transition("CA-missing", Trigger.END)).outcome is Outcome.UNKNOWN


async def test_a_trigger_that_leaves_the_state_changes_nothing(store):
    await store.create_session(Session("CA1", "stream"))
    await store.transition("CA1", Trigger.VAPI_CALL_CREATED)
    before = await store.get_session("CA1")
    again = await store.transition("CA1", Trigger.VAPI_CALL_CREATED)
    assert again.outcome is Outcome.ALREADY and again.session.state == CallState.READY
    assert (await store.get_session("CA1")).updated_at == before.updated_at
    await store.transition("CA1", Trigger.END, reason="done")
    late = await store.transition("CA1", Trigger.VAPI_CALL_CREATED)   # the race the setup handles
    assert late.outcome is Outcome.ALREADY and late.session.state == CallState.ENDED


async def test_concurrent_transitions_only_one_wins(store):
    await store.create_session(Session("CA1", "stream"))

    async def end(reason):
        return reason if (await store.transition("CA1", Trigger.END, reason=reason)).moved else None

    winners = [w for w in await asyncio.gather(*(end(f"r{i}") for i in range(20))) if w]
    assert len(winners) == 1
    assert (await store.get_session("CA1")).ended_reason == winners[0]


async def test_links_and_lookup(store):
    await store.create_session(Session("CA1", "stream"))
    await store.update_session("CA1", vapi_call_id="v1", stream_sid="MZ1")
    assert (await store.find_session(vapi_call_id="v1")).call_sid == "CA1"
    assert (await store.find_session(stream_sid="MZ1")).call_sid == "CA1"
    assert await store.find_session(vapi_call_id="nope") is None


async def test_status_sequence_only_moves_forward(store):
    await store.create_session(Session("CA1", "stream"))
    assert await store.apply_status_sequence("CA1", 2)
    assert not await store.apply_status_sequence("CA1", 1)
    assert not await store.apply_status_sequence("CA1", 2)
    assert await store.apply_status_sequence("CA1", 3)


async def test_claims_expire(store):
    assert await store.claim("k", ttl=60)
    assert not await store.claim("k", ttl=60)
    assert await store.claim("short", ttl=0.01)
    await asyncio.sleep(0.03)
    assert await store.claim("short", ttl=60)


async def test_event_log_orders_and_filters(store):
    for i in range(5):
        await store.append(Event(type="t", call_sid="CA1" if i % 2 else "CA2", data={"i": i}))
    events = await store.events(0)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.data["i"] for e in await store.events(0, call_sid="CA1")] == [1, 3]
    assert [e.seq for e in await store.events(3)] == [4, 5]


async def test_count_active_counts_what_active_sessions_lists(store):
    assert await store.count_active() == 0
    for sid in ("CA1", "CA2", "CA3", "CA4"):
        await store.create_session(Session(sid, "stream"))
    await store.create_session(Session("CA1", "stream"))          # a second create changes nothing
    await store.transition("CA2", Trigger.VAPI_CALL_CREATED)
    await store.transition("CA3", Trigger.END, reason="done")
    await store.transition("CA4", Trigger.FAIL, reason="vapi-setup-failed")
    assert await store.count_active() == len(await store.active_sessions()) == 2
    await store.transition("CA2", Trigger.END, reason="done")
    assert await store.count_active() == 1


async def test_expired_sessions(store):
    old = Session("CA-old", "stream")
    old.updated_at = 0
    await store.create_session(old)
    await store.create_session(Session("CA-new", "stream"))
    assert [s.call_sid for s in await store.expired_sessions(idle_before=1000)] == ["CA-old"]


def test_a_session_copy_is_what_dataclasses_replace_gives_and_shares_nothing_mutable():
    import dataclasses
    session = Session("CA1", "stream", from_number="+15550001111", answer="<Response/>")
    copy = session.copy()
    assert copy == dataclasses.replace(session) and copy is not session and type(copy) is Session
    copy.state, copy.vapi_call_id = CallState.READY, "v1"
    assert session.state == CallState.RINGING and session.vapi_call_id is None
    # a shallow copy is a copy only while every field is immutable: a new list or dict field needs a deep one
    immutable = {"str", "str | None", "float", "int", "CallState"}
    assert {f.name: f.type for f in dataclasses.fields(Session) if f.type not in immutable} == {}


async def test_sqlite_survives_reopen(tmp_path):
    path = tmp_path / "r.db"
    first = SQLiteStore(path)
    await first.open()
    await first.create_session(Session("CA1", "stream"))
    await first.transition("CA1", Trigger.VAPI_CALL_CREATED)
    await first.create_session(Session("CA2", "stream"))
    await first.transition("CA2", Trigger.END, reason="done")
    seq = await first.append(Event(type="twilio.voice", call_sid="CA1"))
    await first.claim("idem", ttl=60)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    assert [s.call_sid for s in await second.active_sessions()] == ["CA1"]
    assert (await second.get_session("CA1")).state == CallState.READY
    assert not await second.claim("idem", ttl=60)
    assert (await second.events(0))[-1].seq == seq
    assert await second.append(Event(type="x")) == seq + 1
    await second.close()


async def test_sqlite_rows_read_back_as_json_would_have_them(tmp_path):
    """A row's JSON is orjson's where orjson can and json.dumps's where it refuses (an integer past 64
    bits, a key that is not a string): either way the file gives back what json.dumps then json.loads
    would, dates and non-ASCII text included."""
    import datetime
    import json
    path = tmp_path / "j.db"
    datas = [{"big": 2**70, "n": -3, "text": "café ☎", "nested": {"a": [1.5, None, True, 0.1]}},
             {1: "a key that is not a string"},
             {"when": datetime.datetime(2026, 12, 4, 19, 0), "plain": "x"}]
    first = SQLiteStore(path)
    await first.open()
    await first.create_session(Session("CA1", "stream", from_number="+15550001111", ended_reason="é"))
    for i, data in enumerate(datas):
        await first.append(Event(type=f"t{i}", call_sid="CA1", data=data))
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        assert [e.data for e in await second.events(0)] == [json.loads(json.dumps(d, default=str)) for d in datas]
        session = await second.get_session("CA1")
        assert session is not None and session.from_number == "+15550001111" and session.ended_reason == "é"
    finally:
        await second.close()


async def test_sqlite_locked_is_a_store_error_and_recovers(tmp_path):
    import sqlite3

    from twivapi_cli.errors import StoreError
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=0.1)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        with pytest.raises(StoreError, match="locked"):
            await store.append(Event(type="x"))
        assert (await store.health())["ok"] is False
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.append(Event(type="y"))  # recovers by itself once the lock is gone
    assert (await store.health())["ok"] is True
    await store.close()


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory://"), MemoryStore)
    s = open_store(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(s, SQLiteStore) and str(s.path) == f"{tmp_path}/a.db"
    from twivapi_cli.errors import ConfigError
    with pytest.raises(ConfigError, match="TWIVAPI_STORE"):
        open_store("mysql://x")


# --- the per-call queue contract (cluster/queues.py), local and Redis ------------------------------
@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def queues(request):
    from twivapi_cli.cluster.queues import LocalQueues
    if request.param == "local":
        yield lambda name: LocalQueues() if name == "a" else None
        return
    from twivapi_cli.cluster.redis import RedisQueues
    async with fresh_redis() as s:
        yield lambda name: RedisQueues(s.connection, name)   # one handle per instance name, one server


async def test_queue_one_holder_drains_in_order(queues):
    q = queues("a")
    assert await q.push("CA1", {"n": 1}, limit=10) == (True, True)     # first push takes the lease
    assert await q.push("CA1", {"n": 2}, limit=10) == (True, False)    # the holder will see it
    assert not await q.acquire("CA1")
    seen = []
    held, item = await q.head("CA1")
    while item is not None:
        assert held
        seen.append(item["n"])
        if item["n"] == 1:
            assert await q.push("CA1", {"n": 3}, limit=10) == (True, False)   # pushed mid-drain
        held, item = await q.advance("CA1")
    assert seen == [1, 2, 3]
    assert await q.push("CA1", {"n": 4}, limit=10) == (True, True)      # empty again: a new lease


async def test_queue_finish_keeps_the_lease_while_items_remain(queues):
    q = queues("a")
    await q.push("CA1", {"n": 1}, limit=10)
    assert not await q.finish("CA1")
    assert (await q.head("CA1")) == (True, {"n": 1})           # still ours
    assert await q.advance("CA1") == (True, None)
    assert await q.finish("CA1")


async def test_queue_pause_parks_and_acquire_resumes(queues):
    q = queues("a")
    await q.push("CA1", {"n": 1}, limit=10)
    await q.pause("CA1")
    assert (await q.head("CA1"))[0] is False          # nobody holds it now
    assert await q.pending(0.0) == ["CA1"]
    assert await q.acquire("CA1") and not await q.acquire("CA1")
    assert await q.drop("CA1") == 1
    assert await q.pending(0.0) == [] and not await q.acquire("CA1")


async def test_queue_limits(queues):
    q = queues("a")
    assert (await q.push("CA1", {"n": 1}, limit=1))[0]
    assert await q.push("CA1", {"n": 2}, limit=1) == (False, False)     # per-call bound
    assert await q.push("CA2", {"n": 1}, limit=5, max_keys=1) == (False, False)   # queued calls bound


@pytest.mark.redis
async def test_queue_lease_is_per_instance():
    async with fresh_redis() as store:
        from twivapi_cli.cluster.redis import RedisQueues
        await _two_instances_share_one_queue(RedisQueues(store.connection, "a"), RedisQueues(store.connection, "b"))


async def _two_instances_share_one_queue(a, b):
    assert await a.push("CA1", {"n": 1}, limit=10) == (True, True)
    assert await b.push("CA1", {"n": 2}, limit=10) == (True, False)     # B queues behind A's lease
    assert (await b.head("CA1"))[0] is False                            # and may not drain it
    assert await b.advance("CA1") == (False, None)                      # ...nor take from it
    assert (await a.head("CA1")) == (True, {"n": 1})
    await a.pause("CA1")
    assert await b.acquire("CA1") and (await b.head("CA1")) == (True, {"n": 1})


async def test_prune_forgets_ended_sessions_and_expired_claims_from_memory(tmp_path):
    store = SQLiteStore(tmp_path / "p.db")
    await store.open()
    await store.create_session(Session("CA-live", "stream"))
    await store.create_session(Session("CA-over", "stream"))
    await store.update_session("CA-over", vapi_call_id="v-over", stream_sid="MZ-over")
    await store.transition("CA-over", Trigger.END, reason="done")
    assert await store.claim("short", 0.001) and await store.claim("long", 60)
    await asyncio.sleep(0.01)
    assert await store.prune(ended_before=time.time() - 3600) == 0     # ended too recently: kept
    assert await store.prune(ended_before=time.time() + 1) == 1
    assert await store.get_session("CA-over") is None and await store.get_session("CA-live") is not None
    assert await store.find_session(vapi_call_id="v-over") is None
    assert set(store._claims) == {"long"}
    await store.close()
    import sqlite3
    row = sqlite3.connect(tmp_path / "p.db").execute("SELECT state FROM sessions WHERE call_sid='CA-over'").fetchone()
    assert row == ("ended",)   # still on disk


@pytest.mark.redis
async def test_redis_reads_live_sessions_in_chunks_and_leaves_out_the_ended(monkeypatch):
    from twivapi_cli.store import redis as redis_store
    monkeypatch.setattr(redis_store, "MGET_CHUNK", 7)      # 20 calls: three round trips, the last short
    async with fresh_redis() as store:
        sids = [f"CA{i:032d}" for i in range(20)]
        for sid in sids:
            await store.create_session(Session(sid, "stream"))
        for sid in sids[::5]:
            await store.transition(sid, Trigger.END, reason="done")
        live = [sid for sid in sids if sid not in sids[::5]]
        assert sorted(s.call_sid for s in await store.active_sessions()) == live
        assert sorted(s.call_sid for s in await store.expired_sessions(idle_before=time.time() + 60)) == live


@pytest.mark.redis
async def test_redis_ended_sessions_expire():
    from twivapi_cli.store.redis import ENDED_KEPT_S
    async with fresh_redis() as store:
        await store.create_session(Session("CA1", "stream"))
        assert await store.redis.pttl(store.k("s", "CA1")) == -1          # live: no expiry
        await store.transition("CA1", Trigger.END, reason="done")
        ttl = await store.redis.pttl(store.k("s", "CA1"))
        assert 0 < ttl <= ENDED_KEPT_S * 1000
        assert (await store.get_session("CA1")).ended_reason == "done"

        await store.update_session("CA1", stream_sid="MZ-late")          # a late update keeps the expiry
        assert 0 < await store.redis.pttl(store.k("s", "CA1")) <= ttl


async def test_concurrent_updates_of_different_fields_all_stick(store):
    """Each update merges into what is there at that moment (on Redis: read, merge and write in one
    script), so updates racing on one call lose none of their fields, and the state is untouched."""
    await store.create_session(Session("CA-race", "stream"))
    await store.transition("CA-race", Trigger.SETUP_STARTED)
    fields = {"vapi_call_id": "v-race", "stream_sid": "MZ-race", "websocket_call_url": "wss://x.test/t",
              "control_url": "https://x.test/c", "ended_reason": "none-yet", "answer": "<Response/>"}
    results = await asyncio.gather(*(store.update_session("CA-race", **{k: v}) for k, v in fields.items()))
    assert all(r is not None for r in results)
    final = await store.get_session("CA-race")
    assert {k: getattr(final, k) for k in fields} == fields
    assert final.state == CallState.SETTING_UP
    assert await store.update_session("CA-nobody", stream_sid="MZ-x") is None
    assert (await store.find_session(stream_sid="MZ-race")).call_sid == "CA-race"

async def test_sqlite_files_are_owner_only(tmp_path):
    store = SQLiteStore(tmp_path / "state" / "owner.db")
    await store.open()
    await store.create_session(Session("CA1", "stream", from_number="+15551112222"))
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "state").iterdir()}   # while open
    await store.close()
    assert set(modes) >= {"owner.db", "owner.db-wal"}
    assert set(modes.values()) == {0o600}, modes


async def test_queue_advance_pops_and_hands_back_the_lease_when_empty(queues):
    q = queues("a")
    await q.push("CA1", {"n": 1}, limit=10)
    await q.push("CA1", {"n": 2}, limit=10)
    assert await q.head("CA1") == (True, {"n": 1})
    assert await q.advance("CA1") == (True, {"n": 2})
    assert await q.advance("CA1") == (True, None)             # empty: the lease is given back...
    assert (await q.head("CA1"))[0] is False
    assert await q.pending(0.0) == []
    assert await q.push("CA1", {"n": 3}, limit=10) == (True, True)   # ...so the next push takes it


async def _fill_wal(store: SQLiteStore, pages: int) -> None:
    """Events of a page each, the last one awaited: the WAL then holds about ``pages`` pages."""
    blob = "x" * 4000
    for i in range(pages):
        await store.append(Event(type="x", data={"blob": blob, "i": i}), durable=(i == pages - 1))


async def test_sqlite_commits_never_checkpoint(tmp_path, monkeypatch):
    """SQLite's own checkpoint runs inside the commit that crosses 1,000 WAL pages, and every ack
    waiting on that commit waited for it (100-140 ms in bench_burst); ours runs beside the writer."""
    from twivapi_cli.store import sqlite as sqlite_module
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY_S", 60.0)   # no checkpoint during this test
    path = tmp_path / "c.db"
    store = SQLiteStore(path)
    await store.open()
    before = path.stat().st_size
    await _fill_wal(store, 1500)
    assert path.stat().st_size == before   # 6 MB committed, all of it still in the WAL
    assert (tmp_path / "c.db-wal").stat().st_size > 1000 * 4096
    await store.close()
    assert path.stat().st_size > 1500 * 4000   # closing checkpoints what is left


async def test_sqlite_checkpoints_in_the_background(tmp_path):
    from tests.polling import until
    path = tmp_path / "b.db"
    store = SQLiteStore(path)
    await store.open()
    writer = store._writer
    assert writer is not None
    for round_ in range(4):   # once checkpointed, the WAL is written from its start again: bounded
        await _fill_wal(store, 1500)
        await until(lambda: writer.checkpointed == writer.commits, f"round {round_} checkpointed", timeout=30)
        assert path.stat().st_size > (round_ + 1) * 1500 * 4000   # in the database file itself
    assert (tmp_path / "b.db-wal").stat().st_size < 2 * 1500 * 4096   # 6,000 pages written, one round's kept
    assert [e.data["i"] for e in (await store.events(0, limit=10_000))[-2:]] == [1498, 1499]
    await store.close()


async def test_sqlite_writes_nobody_awaits_share_commits_and_never_hold_up_one_that_is_awaited(tmp_path, monkeypatch):
    """``durable=False`` writes (latency samples, ack marks) wait for company, so a trickle of them
    is a few commits; a durable write ends that wait at once, and closing writes whatever was waiting.
    (The wait is made an hour here, so no machine is too slow for the trickle to fit in it.)"""
    import sqlite3

    from twivapi_cli.store import sqlite as sqlite_module
    monkeypatch.setattr(sqlite_module, "NON_DURABLE_LINGER_S", 3600.0)   # a wait only a durable write can end
    path = tmp_path / "l.db"
    store = SQLiteStore(path)
    await store.open()
    writer = store._writer
    assert writer is not None
    before = writer.commits
    for i in range(20):   # a trickle: without the wait, one commit each
        await store.append(Event(type="media.relay", call_sid="CA1", data={"i": i}), durable=False)
        await asyncio.sleep(0.005)
    assert writer.commits == before   # all of them still waiting
    seq = await asyncio.wait_for(store.append(Event(type="twilio.voice", call_sid="CA1")), 10)
    assert writer.commits == before + 1   # the durable write took the trickle with it, in one commit
    await store.append(Event(type="media.relay", call_sid="CA1", data={"i": 20}), durable=False)
    await asyncio.wait_for(store.close(), 15)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT seq, type FROM events ORDER BY seq").fetchall()
    assert [t for _, t in rows] == ["media.relay"] * 20 + ["twilio.voice", "media.relay"]
    assert rows[20][0] == seq
