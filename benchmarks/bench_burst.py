"""Bursts of inbound calls when Vapi's POST /call takes 800 ms, as it can in reality: twivapi (stream
mode) and the seed's Express server, side by side on the same slow Vapi.

An open-loop load (webhooks sent on a fixed schedule at the given rate whatever the answers take)
posts correctly signed /twilio/voice webhooks, a new CallSid each, from this process; the servers
run as their own processes:

- twivapi: a real `twivapi serve` (stream mode, SQLite store in a temp dir) whose VAPI_BASE_URL is
  the product's Vapi simulator (`twivapi sim`, its own process) with a `latency` fault of 800 ms on
  POST /call. "Set up" = the simulator created a Vapi call carrying the CallSid
  (assistantOverrides.metadata.twilioCallSid, read back from its `GET /call`); setup latency = the
  call's createdAt minus the moment its webhook was sent. Fallback = callers answered with the
  apology TwiML at once, or whose session ended `failed` later (the caller hears the apology when
  the stream ends), read from the bridge's SQLite store once the setups have settled.
- seed: ../shared/anchors/seed-express/server.js (node) on benchmarks/fake_vapi.js with DELAY_MS=800.
  Its acknowledgement waits for Vapi (the seed's design), so its ack latency includes the 800 ms.
  "Set up" = its POST /call reached the fake Vapi and was answered; fallback = a `<Say>` answer.

Scenarios: 400 calls at 100/s (the goal: 400/400 set up, each within 2 s of its webhook, ack p99 <=
50 ms) and 1,000 calls at 200/s; `--quick`: 100 calls at 50/s. Prints one table, the achieved send
rate against the target, and a PASS/MISS line for the goal.

    .venv/bin/python benchmarks/bench_burst.py [--quick] [--scenario 400x100 ...]   # CALLSxRATE, repeatable
    .venv/bin/python benchmarks/run_all.py --only bench_burst

Without node, npm or ../shared/anchors/seed-express it says which is missing and runs twivapi alone.
Everything listens on 127.0.0.1; processes and temp dirs are cleaned up, Ctrl-C included. The load
generator, both fake Vapis and the servers share the machine's cores: take final figures on a quiet
machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_webhooks as bw  # noqa: E402
from common import free_port, pct, print_table, wait_http  # noqa: E402
from twivapi_cli import net, signing  # noqa: E402

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TOKEN = bw.TOKEN
PUBLIC = bw.PUBLIC
VAPI_KEY = "bench-vapi-key"
VAPI_SECRET = "bench-vapi-secret"
VAPI_DELAY_S = 0.8          # POST /call latency on both fake Vapis
WITHIN_S = 2.0              # a call counts as set up in time within this long of its webhook
ACK_GOAL_MS = 50.0
GOAL = (400, 100)           # calls, calls/s
SCENARIOS = [(400, 100), (1000, 200)]
QUICK_SCENARIOS = [(100, 50)]
BRIDGE_DEADLINE_S = 8.0     # the bridge's setup deadline (SETUP_DEADLINE in bridge/sessions.py)
SETTLE_CAP_S = 20.0         # after the last webhook, wait at most this long for setups to settle
RATE_TOLERANCE = 0.03       # achieved send rate within 3 % of the target, else a warning
SEED_NAME = "seed reference (express)"
TWIVAPI_NAME = "twivapi stream (SQLite)"


# --- the load: open loop, signed, one new CallSid per webhook -------------------------------------

def signed_webhooks(n: int, sign_url: str) -> list[tuple[str, bytes, dict]]:
    run = uuid.uuid4().hex[:8]
    hooks = []
    for i in range(n):
        sid = "CA" + run + f"{i:024x}"
        params = {"AccountSid": "AC" + "a" * 32, "CallSid": sid, "From": "+15551234567", "To": "+15557654321",
                  "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "X-Twilio-Signature": signing.twilio_signature(TOKEN, sign_url, params)}
        hooks.append((sid, urlencode(params).encode(), headers))
    return hooks


async def _open_loop(url: str, hooks: list[tuple[str, bytes, dict]], rate: float) -> dict:
    """Send hook i at start + i/rate, whatever earlier answers take; record each answer."""
    results: dict[str, dict] = {}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with net.async_client(timeout=30.0, limits=limits) as client:
        async def one(sid: str, body: bytes, headers: dict) -> None:
            sent_wall, sent = time.time(), time.perf_counter()
            try:
                response = await client.post(url, content=body, headers=headers)
                text = response.text
                kind = ("stream" if "<Stream" in text else "fallback" if "<Say" in text else "other") \
                    if response.status_code == 200 else "error"
            except httpx.HTTPError as exc:
                kind, text = "error", repr(exc)
            results[sid] = {"sent_wall": sent_wall, "sent": sent, "ack_ms": (time.perf_counter() - sent) * 1000,
                            "kind": kind}

        tasks, late = [], 0.0
        start = time.perf_counter() + 0.05
        for i, hook in enumerate(hooks):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            late = max(late, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one(*hook)))
        await asyncio.gather(*tasks)
    sends = sorted(r["sent"] for r in results.values())
    span = sends[-1] - sends[0] if len(sends) > 1 else 0.0
    return {"results": results, "achieved": (len(sends) - 1) / span if span else float("nan"),
            "max_late_ms": late * 1000, "last_sent": max(r["sent_wall"] for r in results.values())}


def load(url: str, sign_url: str, calls: int, rate: float) -> dict:
    return asyncio.run(_open_loop(url, signed_webhooks(calls, sign_url), rate))


# --- one row from what the load saw and what Vapi created -----------------------------------------

def row(server: str, calls: int, rate: float, sent: dict, created: dict[str, float], fallbacks: set[str]) -> dict:
    results = sent["results"]
    setup_ms = [(created[sid] - r["sent_wall"]) * 1000 for sid, r in results.items() if sid in created]
    acks = [r["ack_ms"] for r in results.values()]
    errors = sum(1 for r in results.values() if r["kind"] in ("error", "other"))
    return {"server": server, "calls": calls, "rate_target": rate, "rate_achieved": round(sent["achieved"], 1),
            "set_up": f"{len(setup_ms)}/{calls}",
            "within_2s": f"{sum(1 for ms in setup_ms if ms <= WITHIN_S * 1000)}/{calls}",
            "fallbacks": len(fallbacks), "errors": errors,
            "setup_p50_ms": pct(setup_ms, 0.5), "setup_p99_ms": pct(setup_ms, 0.99),
            "ack_p50_ms": pct(acks, 0.5), "ack_p99_ms": pct(acks, 0.99), "ack_max_ms": round(max(acks), 2)}


def goal_met(r: dict) -> bool:
    calls = r["calls"]
    return (r["set_up"] == f"{calls}/{calls}" and r["within_2s"] == f"{calls}/{calls}"
            and r["ack_p99_ms"] is not None and r["ack_p99_ms"] <= ACK_GOAL_MS)


def _check_rate(name: str, rate: float, sent: dict) -> None:
    achieved = sent["achieved"]
    ok = abs(achieved - rate) <= RATE_TOLERANCE * rate
    print(f"bench_burst: {name}: send rate {achieved:.1f}/s for a target of {rate}/s "
          f"({'within' if ok else 'NOT within'} {RATE_TOLERANCE:.0%}; latest send {sent['max_late_ms']:.1f} ms "
          f"behind schedule){'' if ok else ': the load generator was starved, the figures are suspect'}")


def _stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for proc in procs:
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _up(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait for a server we started; if it does not come up, say why (its stderr)."""
    try:
        wait_http(url)
    except RuntimeError:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{url} did not come up (exit code {proc.poll()}); its stderr:\n{tail}") from None


def _epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


# --- twivapi: `twivapi serve` on `twivapi sim` with POST /call at 800 ms -----------------------------

def _sessions(db: Path) -> dict[str, str]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT call_sid, state FROM sessions"))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _failure_reasons(db: Path) -> dict[str, int]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT data FROM events WHERE type = 'state'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    reasons: dict[str, int] = {}
    for (data,) in rows:
        data = json.loads(data)
        if data.get("state") == "failed":
            reasons[data.get("reason") or "?"] = reasons.get(data.get("reason") or "?", 0) + 1
    return reasons


def twivapi_side(tmp: Path, calls: int, rate: float) -> dict:
    work = tmp / f"twivapi-{calls}-{rate}"
    work.mkdir()
    twilio_port, vapi_port, port = free_port(), free_port(), free_port()
    vapi_url, url = f"http://127.0.0.1:{vapi_port}", f"http://127.0.0.1:{port}"
    base = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET}
    sim = bridge = None
    with open(work / "sim.log", "wb") as sim_log, open(work / "serve.log", "wb") as serve_log:
        try:
            # --latency none: the 800 ms fault below is the only delay, as on the seed's fake Vapi (the
            # realistic profile would add its own 300-600 ms to POST /call on our side only)
            sim = subprocess.Popen([TWIVAPI, "sim", "--twilio-port", str(twilio_port), "--vapi-port", str(vapi_port),
                                    "--latency", "none"],
                                   env=base, cwd=work, stdout=subprocess.DEVNULL, stderr=sim_log)
            _up(vapi_url + "/_sim/faults", sim, work / "sim.log")
            auth = {"Authorization": f"Bearer {VAPI_KEY}"}
            assistant = httpx.post(vapi_url + "/assistant", headers=auth, json={
                "name": "bench-burst", "model": {"provider": "openai", "model": "gpt-4o"}}).raise_for_status().json()
            httpx.post(vapi_url + "/_sim/faults", json={"kind": "latency", "method": "POST", "path": "/call",
                                                        "delay": VAPI_DELAY_S}).raise_for_status()
            db = work / "twivapi.db"
            bridge = subprocess.Popen([TWIVAPI, "serve", "--port", str(port), "--log-level", "warning"], env={
                **base, "VAPI_BASE_URL": vapi_url, "VAPI_ASSISTANT_ID": assistant["id"], "TWIVAPI_MODE": "stream",
                "TWIVAPI_PUBLIC_URL": PUBLIC, "TWIVAPI_STORE": f"sqlite:///{db}",
                "TWIVAPI_STATE_DIR": str(work / "state"), "TWIVAPI_DRAIN_TIMEOUT": "1"}, cwd=work, stdout=subprocess.DEVNULL, stderr=serve_log)
            _up(url + "/health", bridge, work / "serve.log")
            sent = load(url + "/twilio/voice", PUBLIC + "/twilio/voice", calls, rate)
            _check_rate(f"{TWIVAPI_NAME}, {calls} at {rate}/s", rate, sent)
            immediate = {sid for sid, r in sent["results"].items() if r["kind"] == "fallback"}

            def vapi_calls() -> dict[str, float]:
                records = httpx.get(vapi_url + "/call", params={"limit": 1000}, headers=auth).raise_for_status().json()
                found = {}
                for record in records:
                    sid = ((record.get("assistantOverrides") or {}).get("metadata") or {}).get("twilioCallSid")
                    if sid in sent["results"]:
                        found[sid] = _epoch(record["createdAt"])
                return found
            # settle: every session past setting-up (ready or failed), read from the store; if its
            # schema is not what we read, by counts: every caller has a Vapi call or the fallback, or
            # the bridge's deadline has passed for the last one and the count stopped moving
            cap, last, moved = time.monotonic() + SETTLE_CAP_S, -1, time.monotonic()
            past_deadline = sent["last_sent"] + BRIDGE_DEADLINE_S + VAPI_DELAY_S + 1.0
            while time.monotonic() < cap:
                states = _sessions(db)
                if states:
                    if len(states) >= calls and not any(s in ("ringing", "setting-up") for s in states.values()):
                        break
                else:
                    n = len(vapi_calls())
                    if n + len(immediate) >= calls:
                        break
                    if n != last:
                        last, moved = n, time.monotonic()
                    elif time.time() > past_deadline and time.monotonic() - moved > 1.0:
                        break
                time.sleep(0.2)
            created = vapi_calls()
            _stop(bridge)   # its writer flushes on the way out
            bridge = None
            states = _sessions(db)
            if states:
                fallbacks = immediate | {sid for sid, state in states.items()
                                         if state == "failed" and sid in sent["results"]}
                unresolved = sum(1 for sid in sent["results"] if states.get(sid) in ("ringing", "setting-up"))
                reasons = _failure_reasons(db)
                if reasons or unresolved:
                    print(f"bench_burst: {TWIVAPI_NAME}, {calls} at {rate}/s: failed sessions by reason {reasons}"
                          + (f"; {unresolved} still setting up after {SETTLE_CAP_S:.0f} s" if unresolved else ""))
            else:
                print(f"bench_burst: {TWIVAPI_NAME}: the SQLite store's sessions table could not be read: "
                      "fallbacks counted as callers without a Vapi call")
                fallbacks = immediate | {sid for sid in sent["results"] if sid not in created}
            return row(TWIVAPI_NAME, calls, rate, sent, created, fallbacks)
        finally:
            _stop(bridge, sim)


# --- the seed: server.js on fake_vapi.js with DELAY_MS=800 ----------------------------------------

def seed_missing() -> str | None:
    return bw.node_missing()


def seed_side(node_dir: Path, calls: int, rate: float) -> dict:
    vapi_port, port = free_port(), free_port()
    vapi = server = None
    try:
        vapi = subprocess.Popen(["node", "fake_vapi_bench.js"], cwd=node_dir, stdout=subprocess.DEVNULL,
                                env={**os.environ, "PORT": str(vapi_port), "DELAY_MS": str(int(VAPI_DELAY_S * 1000))})
        wait_http(f"http://127.0.0.1:{vapi_port}/count")
        server = subprocess.Popen(["node", "server.js"], cwd=node_dir, stdout=subprocess.DEVNULL, env={
            **os.environ, "PORT": str(port), "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": "x",
            "VAPI_BASE_URL": f"http://127.0.0.1:{vapi_port}"})
        wait_http(f"http://127.0.0.1:{port}/health")
        # the seed validates against https://<Host header><path>
        sent = load(f"http://127.0.0.1:{port}/twilio/voice", f"https://127.0.0.1:{port}/twilio/voice", calls, rate)
        _check_rate(f"{SEED_NAME}, {calls} at {rate}/s", rate, sent)
        # every ack waited for its POST /call: nothing is left in the background
        records = httpx.get(f"http://127.0.0.1:{vapi_port}/calls").raise_for_status().json()
        created = {r["twilioCallSid"]: r["createdAt"] / 1000 for r in records if r["twilioCallSid"] in sent["results"]}
        fallbacks = {sid for sid, r in sent["results"].items() if r["kind"] == "fallback"}
        return row(SEED_NAME, calls, rate, sent, created, fallbacks)
    finally:
        _stop(server, vapi)


# --- run -------------------------------------------------------------------------------------------

def run(quick: bool = False, scenarios: list[tuple[int, int]] | None = None) -> list[dict]:
    scenarios = scenarios or (QUICK_SCENARIOS if quick else SCENARIOS)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        tmp_path = Path(tmp)
        missing = seed_missing()
        node_dir = None
        if missing:
            print(f"bench_burst: missing {missing}: running the twivapi side alone (no seed comparison)")
        else:
            node_dir = bw.prepare_node(tmp_path)
        for calls, rate in scenarios:
            if node_dir is not None:
                rows.append(seed_side(node_dir, calls, rate))
            rows.append(twivapi_side(tmp_path, calls, rate))
    goal_rows = [r for r in rows if r["server"] == TWIVAPI_NAME and (r["calls"], r["rate_target"]) == GOAL]
    checked = goal_rows[0] if goal_rows else next(r for r in rows if r["server"] == TWIVAPI_NAME)
    note = "" if goal_rows else f" (quick: checked at {checked['calls']} calls at {checked['rate_target']}/s, " \
                                f"not the goal's {GOAL[0]} at {GOAL[1]}/s)"
    for r in rows:
        if r["server"] == TWIVAPI_NAME:
            r["goal"] = "PASS" if goal_met(r) else "MISS"
    print(f"bench_burst: goal (all {checked['calls']} set up, each within {WITHIN_S:.0f} s of its webhook, ack p99 <= "
          f"{ACK_GOAL_MS:.0f} ms, POST /call at {VAPI_DELAY_S * 1000:.0f} ms){note}: "
          f"{checked['goal']}: {checked['set_up']} set up, {checked['within_2s']} within {WITHIN_S:.0f} s, "
          f"ack p99 {checked['ack_p99_ms']} ms, {checked['fallbacks']} fallbacks")
    return rows


def _terminated(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)   # `kill` cleans up like Ctrl-C
    chosen = [tuple(int(x) for x in arg.split("x")) for i, arg in enumerate(sys.argv) if sys.argv[i - 1] == "--scenario"]
    try:
        print_table(run(quick="--quick" in sys.argv, scenarios=chosen or None))
    except KeyboardInterrupt:
        print("bench_burst: interrupted; its processes and temp dirs are gone", file=sys.stderr)
        sys.exit(130)
