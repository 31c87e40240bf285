"""Two bridge instances on Redis vs one on SQLite (signed voice webhooks at concurrency 50, same run),
and cross-instance barge-in: a `user-interrupted` webhook on instance B reaching the media listener
on instance A, and real calls (media socket on A, barge-in webhook on B) timed to the `clear` at the
caller, with the bridges' own stamps beside it.

Needs node + npm for the webhook load (autocannon, like bench_webhooks) and Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_webhooks as bw  # noqa: E402
from twivapi_cli import signing  # noqa: E402


def _load_two(node_dir: Path, ports: list[int], seconds: int) -> list[dict]:
    results: list[dict] = [{}] * len(ports)

    def one(i: int, port: int) -> None:
        results[i] = bw.load(node_dir, port, bw.PUBLIC, seconds, connections=50 // len(ports))
    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(ports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def webhook_rows(quick: bool) -> list[dict]:
    seconds = 3 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        node_dir = bw.prepare_node(tmp_path)
        if node_dir is None:
            print(bw.skip_line("bench_scaleout", skipping="skipping the webhook comparison"))
            return []
        vapi_port = bw.free_port()
        vapi = subprocess.Popen(["node", "fake_vapi_bench.js"], cwd=node_dir,
                                env={**os.environ, "PORT": str(vapi_port)}, stdout=subprocess.DEVNULL)
        rows = []
        try:
            bw.wait_http(f"http://127.0.0.1:{vapi_port}/count")
            base = {**os.environ, "TWILIO_AUTH_TOKEN": bw.TOKEN, "VAPI_API_KEY": "k", "VAPI_WEBHOOK_SECRET": "s",
                    "VAPI_ASSISTANT_ID": "a", "TWIVAPI_PUBLIC_URL": bw.PUBLIC,
                    "VAPI_BASE_URL": f"http://127.0.0.1:{vapi_port}"}
            twivapi = str(Path(sys.executable).with_name("twivapi"))
            for name, stores in (("1 instance, SQLite", [f"sqlite:///{tmp_path}/one.db"]),
                                 ("2 instances, Redis", ["redis://127.0.0.1:6379/0"] * 2)):
                prefix = f"bench-{uuid.uuid4().hex[:6]}:"
                procs, ports = [], []
                for i, store in enumerate(stores):
                    port = bw.free_port()
                    env = {**base, "TWIVAPI_STORE": store, "TWIVAPI_REDIS_PREFIX": prefix,
                           "TWIVAPI_STATE_DIR": str(tmp_path / f"state-{name[0]}-{i}"),
                           "TWIVAPI_DRAIN_TIMEOUT": "1"}   # calls that never stream: do not wait for them
                    procs.append(subprocess.Popen([twivapi, "serve", "--port", str(port), "--log-level", "warning"],
                                                  env=env, cwd=tmp_path, stderr=subprocess.DEVNULL))
                    ports.append(port)
                try:
                    for port in ports:
                        bw.wait_http(f"http://127.0.0.1:{port}/health")
                    results = _load_two(node_dir, ports, seconds)
                finally:
                    for proc in procs:
                        proc.terminate()
                        try:
                            proc.wait(10)
                        except subprocess.TimeoutExpired:
                            proc.kill()   # seen: a bridge slow to stop right after a load run
                            proc.wait(5)
                rows.append({"setup": name, "rps": round(sum(r["rps"] for r in results)),
                             "p50_ms": max(r["p50"] for r in results), "p99_ms": max(r["p99"] for r in results),
                             "errors": sum(r["errors"] + r["non2xx"] for r in results),
                             "answered": sum(r["total"] for r in results)})
                if "Redis" in name:
                    _forget(prefix)
        finally:
            vapi.terminate()
    return rows


def workers_rows(quick: bool) -> list[dict]:
    """`serve --workers 1` and `--workers 2` on one port and one Redis: signed voice webhooks/s at 50
    connections, and media calls per machine (the same real-time callers as bench_bridge, server CPU
    of the whole process tree: calls the workers' cores carry at that cost per call-second)."""
    rows = []
    seconds = 3 if quick else 8
    calls, call_s = (20, 4) if quick else (60, 8)
    twivapi = str(Path(sys.executable).with_name("twivapi"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        node_dir = bw.prepare_node(tmp_path)
        vapi_port = bw.free_port()
        vapi = subprocess.Popen(["node", "fake_vapi_bench.js"], cwd=node_dir, env={**os.environ, "PORT": str(vapi_port)},
                                stdout=subprocess.DEVNULL) if node_dir else None
        try:
            for workers in (1, 2):
                row: dict = {"workers": workers}
                if vapi is not None:
                    bw.wait_http(f"http://127.0.0.1:{vapi_port}/count")
                    row.update(_worker_webhooks(node_dir, twivapi, workers, vapi_port, tmp_path, seconds))
                row.update(_worker_media(twivapi, workers, calls, call_s, tmp_path))
                rows.append(row)
        finally:
            if vapi is not None:
                vapi.terminate()
                vapi.wait(10)
    if node_dir is None:
        print(bw.skip_line("bench_scaleout", skipping="no webhooks/s per worker count"))
    return rows


def _serve_workers(twivapi: str, workers: int, env: dict, tmp_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([twivapi, "serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                            env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
    bw.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
    time.sleep(1.0)   # every worker listening, not only the first
    return proc


def _stop(proc: subprocess.Popen) -> None:
    from common import stop
    stop(proc)


def _worker_webhooks(node_dir: Path, twivapi: str, workers: int, vapi_port: int, tmp_path: Path,
                     seconds: int) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": bw.TOKEN, "VAPI_API_KEY": "k", "VAPI_WEBHOOK_SECRET": "s",
           "VAPI_ASSISTANT_ID": "a", "TWIVAPI_PUBLIC_URL": bw.PUBLIC, "VAPI_BASE_URL": f"http://127.0.0.1:{vapi_port}",
           "TWIVAPI_STORE": "redis://127.0.0.1:6379/0", "TWIVAPI_REDIS_PREFIX": prefix,
           "TWIVAPI_STATE_DIR": str(tmp_path / f"wh-{workers}"), "TWIVAPI_DRAIN_TIMEOUT": "1"}
    port = bw.free_port()
    proc = _serve_workers(twivapi, workers, env, tmp_path, port)
    try:
        result = bw.load(node_dir, port, bw.PUBLIC, seconds)
    finally:
        _stop(proc)
        _forget(prefix)
    return {"webhooks_per_s": round(result["rps"]), "webhook_p99_ms": result["p99"],
            "webhook_errors": result["errors"] + result["non2xx"]}


def _worker_media(twivapi: str, workers: int, calls: int, seconds: float, tmp_path: Path) -> dict:
    import httpx

    import bench_bridge as bb
    from common import tree_cpu_seconds
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": bb.TOKEN, "VAPI_API_KEY": bb.KEY, "VAPI_WEBHOOK_SECRET": bb.SECRET}
    sims, values = bb.start_sims(env)
    try:
        assistant = httpx.post(values["VAPI_BASE_URL"] + "/assistant", headers={"Authorization": f"Bearer {bb.KEY}"},
                               json={"name": "e", "metadata": {"simulator": {"behavior": "echo"}}}).json()["id"]
        port = bw.free_port()
        proc = _serve_workers(twivapi, workers, {
            **env, "VAPI_BASE_URL": values["VAPI_BASE_URL"], "VAPI_ASSISTANT_ID": assistant,
            "TWIVAPI_PUBLIC_URL": f"http://127.0.0.1:{port}", "TWIVAPI_STORE": "redis://127.0.0.1:6379/0",
            "TWIVAPI_REDIS_PREFIX": prefix, "TWIVAPI_STATE_DIR": str(tmp_path / f"media-{workers}"),
            "TWIVAPI_DRAIN_TIMEOUT": "1"}, tmp_path, port)
        try:
            callers = [bb.Caller(f"http://127.0.0.1:{port}", seconds, True, barge_in=False) for _ in range(calls)]
            cpu_before = tree_cpu_seconds(proc.pid)

            asyncio.run(bb.call_all(callers))
            cpu = tree_cpu_seconds(proc.pid) - cpu_before
        finally:
            _stop(proc)
            _forget(prefix)
    finally:
        sims.terminate()
        sims.wait(10)
    per_call_s = cpu / (calls * seconds)
    cores = min(workers, os.cpu_count() or 1)
    return {"media_calls": calls, "media_cpu_ms_per_call_s": round(per_call_s * 1000, 2),
            "media_calls_per_machine": round(cores / per_call_s) if per_call_s else None,
            "audio_returned_pct": round(100 * sum(c.returned() for c in callers) / calls, 1),
            "frames_lost": sum(c.lost() for c in callers), "closed_early": sum(c.closed_early for c in callers)}


def _forget(prefix: str) -> None:
    """Delete the run's keys from the shared Redis."""
    from twivapi_cli.store.redis import RedisStore

    async def go():
        store = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
        await store.delete_all()
        await store.close()
    asyncio.run(go())


def bargein_rows(quick: bool) -> list[dict]:
    from twivapi_cli.bridge.app import create_app
    from twivapi_cli.bridge.server import start_in_thread
    from twivapi_cli.cluster import open_state
    from twivapi_cli.config import Secret, Settings
    from twivapi_cli.vapi_api import VapiClient

    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    # barge_in="speech": the caller's speech-update started is the barge-in signal measured here (by
    # default only user-interrupted is: Vapi decides what interrupts)
    settings = Settings(twilio_auth_token=Secret("t"), vapi_webhook_secret=Secret("s"), vapi_api_key=Secret("k"),
                        vapi_assistant_id="a", barge_in="speech")
    apps = [create_app(settings, *open_state("redis://127.0.0.1:6379/0", prefix=prefix),
                       VapiClient("http://127.0.0.1:9", "k")) for _ in range(2)]
    servers = [start_in_thread(app) for app in apps]
    time.sleep(0.3)   # both subscribed to the signal channel
    received: dict[str, float] = {}
    sid = "CA" + uuid.uuid4().hex

    async def listen():
        async def listener(kind, data):
            received.setdefault(data.get("turn"), time.perf_counter())   # the first signal (the interrupt)
        apps[0].state.deps.signals.listen(sid, listener)
    servers[0].run(listen)
    import httpx
    client = httpx.Client(transport=httpx.HTTPTransport(socket_options=[(6, 1, 1)]))
    latencies = []
    for n in range(100 if quick else 500):
        body = json.dumps({"message": {"type": "speech-update", "role": "user", "status": "started", "turn": n,
                                       "call": {"phoneCallProviderId": sid}}}).encode()
        # the session must exist for the message to be applied rather than parked
        if n == 0:
            async def create():
                from twivapi_cli.models import Session
                await apps[1].state.deps.store.create_session(Session(sid, "stream"))
            servers[1].run(create)
        sent = time.perf_counter()
        client.post(servers[1].url + "/vapi/webhook", content=body, headers=signing.sign_vapi("s", body))
        deadline = time.perf_counter() + 2
        while n not in received and time.perf_counter() < deadline:
            time.sleep(0.0002)
        if n in received:
            latencies.append((received[n] - sent) * 1000)
    for server in servers:
        server.stop()
    _forget(prefix)
    latencies.sort()
    return [{"figure": "barge-in webhook on B -> listener on A", "n": len(latencies),
             "p50_ms": round(latencies[len(latencies) // 2], 2), "p99_ms": round(latencies[int(len(latencies) * .99)], 2)}]


def bargein_media_rows(quick: bool) -> list[dict]:
    """Real calls through two `twivapi serve` processes on Redis: the caller's media socket on A,
    the barge-in webhook on B; from B's webhook sent to the `clear` arriving at the caller (callers
    and simulators in this process, one clock)."""
    import httpx

    from common import free_port, pct, wait_http
    from twivapi_cli.sim.server import start_sims
    from twivapi_cli.sim.state import SimCredentials, SimState
    from twivapi_cli.sim.twilio_caller import CallerPlan, SimulatedCaller

    creds = SimCredentials(auth_token="bench-token", vapi_api_key="bench-key", vapi_webhook_secret="bench-secret")
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    calls, at_once = (30, 5) if quick else (100, 10)
    latencies: list[float] = []
    twivapi = str(Path(sys.executable).with_name("twivapi"))
    with start_sims(SimState(credentials=creds)) as sims, tempfile.TemporaryDirectory() as tmp:
        assistant = httpx.post(sims.vapi_url + "/assistant", headers={"Authorization": "Bearer bench-key"}, json={
            "name": "bench", "model": {"provider": "openai", "model": "gpt-4o"},
            "metadata": {"simulator": {"greeting_ms": 8000}}}).json()["id"]
        ports = [free_port(), free_port()]
        procs = [subprocess.Popen([twivapi, "serve", "--port", str(port), "--log-level", "warning"], env={
            **os.environ, "TWILIO_AUTH_TOKEN": "bench-token", "VAPI_API_KEY": "bench-key",
            "VAPI_WEBHOOK_SECRET": "bench-secret", "VAPI_ASSISTANT_ID": assistant, "VAPI_BASE_URL": sims.vapi_url,
            "TWIVAPI_PUBLIC_URL": f"http://127.0.0.1:{port}", "TWIVAPI_STORE": "redis://127.0.0.1:6379/0",
            "TWIVAPI_REDIS_PREFIX": prefix, "TWIVAPI_STATE_DIR": f"{tmp}/{port}", "TWIVAPI_DRAIN_TIMEOUT": "1"},
            stderr=subprocess.DEVNULL) for port in ports]
        a, b = (f"http://127.0.0.1:{port}" for port in ports)

        async def one(http: httpx.AsyncClient) -> None:
            caller = SimulatedCaller("bench-token")
            sid = "CA" + uuid.uuid4().hex
            sent: list[float] = []

            async def interrupt() -> None:
                await asyncio.sleep(1.0)   # the greeting is playing
                body = json.dumps({"message": {"type": "user-interrupted", "turnId": "t",
                                               "call": {"phoneCallProviderId": sid}}}).encode()
                sent.append(time.monotonic())
                await http.post(b + "/vapi/webhook", content=body, headers=signing.sign_vapi("bench-secret", body))
            try:
                result, _ = await asyncio.gather(
                    caller.call(a + "/twilio/voice", plan=CallerPlan(hangup_after_s=1.6), call_sid=sid), interrupt())
            finally:
                await caller.aclose()
            if result.clears and sent:
                latencies.append((result.clears[0] - sent[0]) * 1000)

        async def all_calls() -> None:
            async with httpx.AsyncClient() as http:
                for _ in range(calls // at_once):
                    await asyncio.gather(*(one(http) for _ in range(at_once)))
        try:
            for url in (a, b):
                wait_http(url + "/health")
            asyncio.run(all_calls())
            stages = asyncio.run(_bargein_stages_ms(prefix))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            _forget(prefix)
    return [{"figure": f"barge-in webhook on B -> clear at the caller on A ({at_once} calls at once)",
             "n": f"{len(latencies)}/{calls}", "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)},
            *({"figure": f"  of which: {stage} (the bridges' own stamps)", "n": f"{len(values)}/{calls}",
               "p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99)} for stage, values in stages.items())]


async def _bargein_stages_ms(prefix: str) -> dict[str, list[float]]:
    """From the shared event log: each call's barge-in webhook on B (received, acknowledged; its
    signal is published on arrival) to its media.clear on A."""
    from twivapi_cli.store.redis import RedisStore
    store = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    try:
        events = await store.events(0, limit=1_000_000)
    finally:
        await store.close()
    hooks = {e.call_sid: e for e in events if e.type == "vapi.user-interrupted"}
    clears = {e.call_sid: e.received_at for e in events if e.type == "media.clear" and e.call_sid in hooks}
    stages: dict[str, list[float]] = {"webhook received on B -> clear sent on A": [],
                                      "received -> acknowledged on B": []}
    for sid, cleared in clears.items():
        hook = hooks[sid]
        stages["webhook received on B -> clear sent on A"].append((cleared - hook.received_at) * 1000)
        if hook.acked_at:
            stages["received -> acknowledged on B"].append((hook.acked_at - hook.received_at) * 1000)
    return stages


def run(quick: bool = False) -> list[dict]:
    return webhook_rows(quick) + workers_rows(quick) + bargein_rows(quick) + bargein_media_rows(quick)


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for row in rows:
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
