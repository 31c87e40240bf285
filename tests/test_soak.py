"""Load and soak: 1,000 complete simulated calls through ONE bridge, 100 at a time.

One real bridge (uvicorn on loopback, SQLite store in tmp_path), the product's simulators (Twilio's
side: ``SimulatedCaller``; Vapi's: the simulated assistant, which also posts its server messages to
the bridge), short calls: a 400 ms greeting, a caller who listens to it and hangs up after 1 s of
(silent) audio. Asserted, with counts and order only (never timings):

- every call completes, and its events are all in the store's event log, in the causal order a
  normal call records (``twilio.voice`` first; ``state`` setting-up, ready, active, ended, once each;
  ``vapi.call-created`` before ready, ``media.start`` < ``media.vapi-open`` < ``media.stop``; every
  server message Vapi posted is there, acknowledged and processed; the Twilio webhooks once each),
  and durably in the SQLite file; every caller frame reached Vapi and the whole greeting the caller;
- memory is flat after warm-up: the process RSS after the first 200 calls vs after all of them;
- no session is left (``store.active_sessions()`` empty), no asyncio task is left on the bridge's
  loop beyond its fixed workers, no file descriptor or socket is left beyond a small constant.

The bridge, the simulators and the callers share this process (the bridge and each simulator on
its own thread and loop), so RSS and fds are the process's. The simulators' per-call records are
dropped after each phase is checked, so what is measured is what the bridge keeps.

Slow: run with ``./scripts/test-slow`` (``pytest -m slow``). ``TWIVAPI_SOAK_CALLS`` shortens it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import sqlite3
import time
from dataclasses import dataclass, field

import pytest

from twivapi_cli import net
from twivapi_cli.models import CallState
from twivapi_cli.sim.twilio_caller import FRAME as FRAME_BYTES
from twivapi_cli.sim.twilio_caller import CallerPlan, SimulatedCaller
from twivapi_cli.store import memory
from twivapi_cli.store.sqlite import SQLiteStore

from .sims import running_sims
from .support import TOKEN, VAPI_SECRET, bridge_settings, running_bridge

pytestmark = pytest.mark.slow

CALLS = int(os.environ.get("TWIVAPI_SOAK_CALLS", "1000"))
CHUNK = min(200, max(1, CALLS // 2))       # RSS after the first 200 calls (warm-up), then every 200
CONCURRENCY = 100
GREETING_MS = 400
GREETING_BYTES = 8 * GREETING_MS            # mu-law at 8 kHz
SPEAK_S = 1.0                               # the caller's (silent) audio: at least this, then `stop`
LISTEN_CAP_S = 20.0                         # ... or once the greeting is heard; never longer than this
# Waits are upper bounds that end as soon as what they wait for is true: generous, so a machine 3x
# slower than ours passes as surely, and free on a fast one. They bound time, never what is checked.
CALL_TIMEOUT = 120.0                        # one call; far above what a 1 s call takes even on 2 busy cores
SETTLE_S = 120.0                            # for the simulators to finish posting, the log to be complete
EVENT_RING = 2_000                          # events the store keeps in memory during the soak (~100 calls)
RSS_GROWTH_LIMIT_MB = 32                    # generous: 40 KB per call after warm-up; a leaked socket or
                                            # media call is more, the store's session index (~2 KB) less
FD_SLACK = 8                                # fds the process may hold more at the end than at the start
FD_SETTLE_S = 15.0                          # for idle keep-alive connections to close (5 s after last use)

# what the Vapi simulator posts for a call in which the caller says nothing
VAPI_MESSAGES = ("status-update", "speech-update", "end-of-call-report")
# errors and faults that must not appear in a normal call's log
NEVER = {"vapi.setup-failed", "vapi.end-failed", "media.vapi-connect-failed", "media.refused",
         "media.bad-message", "parked.expired", "twilio.status.duplicate", "twilio.status.stale",
         "race.hangup-before-ready"}


@dataclass
class Done:
    """What is kept of one call once it is over (its audio is not kept, only counted)."""
    call_sid: str
    status: str
    errors: list
    heard: int = 0
    received: int = 0
    frames_sent: int = 0
    kinds: list = field(default_factory=list)


class ListeningCaller(SimulatedCaller):
    """A caller who listens to the whole greeting, then hangs up: silent 20 ms frames for at least
    SPEAK_S and until the greeting has been played (or LISTEN_CAP_S). Its calls last as long as the
    bridge takes, so on a loaded machine a slow setup makes a call longer, never different."""

    async def _speak(self, send, stream_sid, plan, result, ws) -> None:
        frames = 0

        async def counting(message: dict) -> None:
            nonlocal frames
            frames += message["event"] == "media"
            await send(message)

        started = time.monotonic()
        talking = asyncio.create_task(super()._speak(counting, stream_sid, CallerPlan(hangup_after_s=None),
                                                     result, ws))
        try:
            while (len(result.heard) < GREETING_BYTES or time.monotonic() - started < SPEAK_S) \
                    and time.monotonic() - started < LISTEN_CAP_S:
                await asyncio.sleep(0.02)
        finally:
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)
        result.frames_sent = frames
        result.note("caller-hangup")
        await send({"event": "stop", "streamSid": stream_sid,
                    "stop": {"accountSid": self.account_sid, "callSid": result.call_sid}})


# --- measuring the process ---------------------------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def thread_cpu_s(thread) -> float:
    """User + system CPU seconds of one thread (the bridge's), from /proc."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds() -> tuple[int, int]:
    """(open fds, of which sockets) of this process."""
    fds = sockets = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:   # the fd listdir itself used, closed already
            continue
        fds += 1
        sockets += target.startswith("socket:")
    return fds, sockets


def loop_tasks(bridge) -> dict[int, str]:
    """The tasks on the bridge's event loop (the probe itself excluded), id -> a readable name."""
    async def probe():
        me = asyncio.current_task()
        return {id(t): f"{t.get_name()} {t.get_coro().__qualname__}" for t in asyncio.all_tasks() if t is not me}
    return bridge.server.run(probe)


def settle(check, timeout: float = 30.0, every: float = 0.25):
    """Poll ``check()`` (returns a falsy value when settled) until it settles; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(every)


# --- driving calls -------------------------------------------------------------------------------------

async def place_calls(bridge, count: int) -> list[Done]:
    """``count`` calls, at most CONCURRENCY at once, through one shared webhook client."""
    caller = ListeningCaller(TOKEN, http=net.async_client(timeout=15.0))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> Done:
        async with gate:
            try:
                result = await asyncio.wait_for(caller.call(bridge.url + "/twilio/voice",
                                                            status_callback=bridge.url + "/twilio/status"),
                                                CALL_TIMEOUT)
            except TimeoutError:
                return Done("?", "timeout", [f"call did not finish in {CALL_TIMEOUT} s"])
        return Done(result.call_sid, result.status, result.errors, len(result.heard), len(result.received),
                    getattr(result, "frames_sent", 0), [k for _, k, _ in result.timeline])

    try:
        return await asyncio.gather(*(one() for _ in range(count)))
    finally:
        await caller.aclose()


# --- what a complete call looks like -------------------------------------------------------------------

def problems_of_call(done: Done, events: list, session, driver) -> list[str]:
    """Everything wrong with one call; [] when it is complete and in order."""
    out: list[str] = []
    if done.errors or done.status != "completed":
        out.append(f"caller: {done.status} {done.errors}")
    if "stream-closed" not in done.kinds or done.kinds[-1] != "ended":
        out.append(f"caller timeline {done.kinds}")
    # audio, counted end to end: every caller frame reached Vapi, the whole greeting reached the caller
    vapi_heard, vapi_sent = (len(driver.heard), len(driver.sent)) if driver else (0, 0)
    if not done.frames_sent or vapi_heard != FRAME_BYTES * done.frames_sent:
        out.append(f"caller sent {done.frames_sent} frames, Vapi heard {vapi_heard / FRAME_BYTES:g}")
    if not (done.heard == done.received == vapi_sent == GREETING_BYTES):
        out.append(f"greeting: Vapi sent {vapi_sent} bytes, the caller got {done.received}, played {done.heard}")
    if session is None or session.state != CallState.ENDED or not session.ended_reason:
        out.append(f"session {session and (session.state, session.ended_reason)}")
    types = [e.type for e in events]
    keyed = [f"state:{e.data['state']}" if e.type == "state" else e.type for e in events]
    if not types or types[0] != "twilio.voice" or not events[0].data.get("new"):
        out.append(f"first event {types[:1]}")
    states = [e.data["state"] for e in events if e.type == "state"]
    if states != ["setting-up", "ready", "active", "ended"]:
        out.append(f"states {states}")
    rejected = [e.data for e in events if e.type == "state.rejected" and e.data.get("wanted") != "ended"]
    if rejected:   # a second `end` finding the call ended is normal; anything else is not
        out.append(f"rejected transitions {rejected}")
    for kind in ("media.start", "media.vapi-open", "media.stop", "twilio.voice", "twilio.after-stream",
                 "twilio.status", "vapi.call-created", "vapi.report"):
        if types.count(kind) != 1:
            out.append(f"{kind} x{types.count(kind)}")
    order = [k for k in ("twilio.voice", "media.start", "media.vapi-open", "media.stop") if k in types]
    if sorted(order, key=types.index) != order:
        out.append(f"media order {order}")
    setup = [k for k in ("state:setting-up", "vapi.call-created", "state:ready", "state:active", "media.vapi-open")
             if k in keyed]
    if sorted(setup, key=keyed.index) != setup:
        out.append(f"setup order {[k for k in keyed if k in setup]}")
    bad = sorted(NEVER & set(types))
    if bad:
        out.append(f"faults in a normal call: {bad}")
    stop = next((e.data for e in events if e.type == "media.stop"), {})
    if (stop.get("frames_in"), stop.get("frames_out"), stop.get("bad_messages")) != \
            (done.frames_sent, GREETING_BYTES // FRAME_BYTES, 0):
        out.append(f"media.stop {stop}")
    # every server message Vapi posted (and got a 200 for) is in the log, acked and processed
    posted = collections.Counter(kind for kind, status, _ in (driver.post.replies if driver else []) if status == 200)
    logged = collections.Counter(e.type.removeprefix("vapi.") for e in events
                                 if e.type.startswith("vapi.") and e.type.removeprefix("vapi.") in VAPI_MESSAGES)
    if logged != posted or set(posted) != set(VAPI_MESSAGES):
        out.append(f"vapi messages logged {dict(logged)} != posted {dict(posted)}")
    for e in events:
        webhook = e.type in ("twilio.voice", "twilio.status") or e.type.removeprefix("vapi.") in VAPI_MESSAGES
        if webhook and e.acked_at is None:
            out.append(f"{e.type} #{e.seq} never acknowledged")
        if (e.type == "twilio.status" or e.type.removeprefix("vapi.") in VAPI_MESSAGES) and e.processed_at is None:
            out.append(f"{e.type} #{e.seq} never processed")
    return out


def check_phase(bridge, sims, done: list[Done], after_seq: int) -> tuple[list[str], int]:
    """Every call of a phase against the bridge's event log (from ``after_seq`` on) and the
    simulator's record of it; the problems, and the newest event's seq."""
    by_call = collections.defaultdict(list)
    events = bridge.server.run(lambda: bridge.deps.store.events(after_seq, limit=10_000_000), timeout=60)
    for event in events:
        by_call[event.call_sid].append(event)
    vapi = sims.state.vapi
    problems: list[str] = []
    for call in done:
        session = bridge.session(call.call_sid) if call.call_sid != "?" else None
        driver = vapi.drivers.get(session.vapi_call_id) if session and session.vapi_call_id else None
        problems += [f"{call.call_sid}: {p}" for p in problems_of_call(call, by_call.get(call.call_sid, []),
                                                                      session, driver)]
    not_ended = [cid for cid, c in vapi.calls.items() if c.status != "ended"]
    if not_ended:
        problems.append(f"{len(not_ended)} Vapi calls never ended: {not_ended[:3]}")
    if len(vapi.calls) != len(done):
        problems.append(f"{len(vapi.calls)} Vapi calls created for {len(done)} Twilio calls")
    return problems, max((e.seq for e in events), default=after_seq)


def run_phase(bridge, sims, count: int, after_seq: int) -> tuple[list[Done], list[str], int]:
    """Place ``count`` calls, wait until everything about them has been said and written, check
    them, then drop the simulator's per-call state (its assistants keep each call's audio)."""
    done = asyncio.run(place_calls(bridge, count))
    assert settle(lambda: not quiet(sims), timeout=SETTLE_S) is False, "the simulated assistants did not finish posting"
    # acknowledgements and processing marks are written behind the answers: give them a moment
    deadline = time.monotonic() + SETTLE_S / 2
    problems, seq = check_phase(bridge, sims, done, after_seq)
    while problems and time.monotonic() < deadline:
        time.sleep(1.0)
        problems, seq = check_phase(bridge, sims, done, after_seq)
    sims.state.vapi.drivers.clear()
    sims.state.vapi.calls.clear()
    return done, problems, seq


def quiet(sims) -> bool:
    """The simulated assistants have posted everything (their end-of-call reports come last)."""
    drivers = list(sims.state.vapi.drivers.values())
    return all(d.closed and d.post is not None and any(k == "end-of-call-report" for k, _, _ in d.post.replies)
               for d in drivers)


def active(bridge) -> list:
    return bridge.server.run(lambda: bridge.deps.store.active_sessions())


# --- the soak -------------------------------------------------------------------------------------------

def test_soak_1000_calls_through_one_bridge(tmp_path, monkeypatch, record_property):
    # The store keeps its newest events in memory too (a ring of 50,000, ~2,400 of these calls); a
    # ring the warm-up fills makes what follows steady state, so RSS growth after it is a leak.
    monkeypatch.setattr(memory, "EVENT_RING", EVENT_RING)
    with running_sims() as sims:
        assistant = sims.assistant(greeting_ms=GREETING_MS, reply_ms=300)
        settings = bridge_settings(sims.url, VAPI_ASSISTANT_ID=assistant, TWIVAPI_SETUP_QUEUE_LIMIT="5000")
        db = tmp_path / "soak.db"
        with running_bridge(settings, SQLiteStore(db), public_from_server=True) as bridge:
            sims.vapi("PATCH", f"/assistant/{assistant}", json={"server": {"url": bridge.url + "/vapi/webhook",
                                                                                "headers": {"X-Vapi-Secret": VAPI_SECRET}}})
            tasks_before = loop_tasks(bridge)
            fds_before = open_fds()
            started, cpu_before = time.monotonic(), thread_cpu_s(bridge.server.thread)
            done, problems, rss, seq = [], [], [], 0
            # same-sized phases: the checks between them allocate the same, so RSS compares like with like
            for count in [CHUNK] * (CALLS // CHUNK) + [CALLS % CHUNK] * bool(CALLS % CHUNK):
                calls, more, seq = run_phase(bridge, sims, count, seq)
                done += calls
                problems += more
                gc.collect()   # what is kept, not what awaits collection
                rss.append(rss_mb())
            elapsed = time.monotonic() - started
            bridge_cpu = thread_cpu_s(bridge.server.thread) - cpu_before
            left = settle(lambda: active(bridge), timeout=SETTLE_S / 4)
            leaked_tasks = settle(lambda: sorted(v for k, v in loop_tasks(bridge).items() if k not in tasks_before),
                                  timeout=SETTLE_S / 4)
            tasks_end = len(loop_tasks(bridge))
            # idle pooled connections between the in-process parts close when their clients' keep-alive
            # expires (5 s; the servers keep theirs 75 s, so the clients always close first); one fd
            # more than at the start is allowed here (a pool may keep one), FD_SLACK by the assertion
            settle(lambda: open_fds()[0] > fds_before[0] + 1, timeout=FD_SETTLE_S)
            fds_end = open_fds()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            durable = conn.execute("SELECT COUNT(DISTINCT call_sid), COUNT(*) FROM events WHERE type = 'state' "
                                   "AND json_extract(data, '$.state') = 'ended'").fetchone()

    growth = rss[-1] - rss[0]
    summary = (f"soak: {len(done)} calls, concurrency {CONCURRENCY}, {elapsed:.1f} s "
               f"(bridge thread CPU {bridge_cpu * 1000 / len(done):.1f} ms per call); "
               f"RSS {rss[0]:.1f} MB after {CHUNK} -> {rss[-1]:.1f} MB after {len(done)} ({growth:+.1f} MB; "
               f"every {CHUNK}: {' '.join(f'{r:.0f}' for r in rss)}); bridge loop tasks {len(tasks_before)} -> {tasks_end} "
               f"({len(leaked_tasks)} leaked); fds {fds_before[0]} -> {fds_end[0]} "
               f"(sockets {fds_before[1]} -> {fds_end[1]}); sessions left {len(left)}; problems {len(problems)}")
    record_property("summary", summary)   # printed at the end of the run (conftest)
    assert not problems, f"{len(problems)} problems, the first ones:\n" + "\n".join(problems[:20])
    assert len({d.call_sid for d in done}) == CALLS
    assert durable == (CALLS, CALLS), f"SQLite file: {durable} calls / 'ended' events, wanted {CALLS} of each"
    assert not left, f"{len(left)} sessions left: {[(s.call_sid, s.state) for s in left[:5]]}"
    assert not leaked_tasks, f"tasks left on the bridge's loop: {collections.Counter(leaked_tasks)}"
    assert fds_end[0] <= fds_before[0] + FD_SLACK, f"(fds, sockets) {fds_before} -> {fds_end}"
    assert growth < RSS_GROWTH_LIMIT_MB, summary
