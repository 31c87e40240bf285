"""Event-to-terminal lag of `twivapi tail --json` while the bridge records 1,000 events/s.

The bridge (with its admin app) runs in this process; `twivapi tail` runs as its own process and
prints one JSON line per event; we read its stdout, compare each event's `received_at` with the
moment its line arrives, and read tail's CPU time from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, pct  # noqa: E402
from twivapi_cli.bridge.admin import create_admin_app  # noqa: E402
from twivapi_cli.bridge.app import create_app
from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.cluster.local import LocalCluster
from twivapi_cli.config import Secret, Settings
from twivapi_cli.store.memory import MemoryStore
from twivapi_cli.vapi_api import VapiClient

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TOKEN = "bench-admin-token"


def run(quick: bool = False, rate: int = 1000) -> list[dict]:
    seconds = 3 if quick else 8
    settings = Settings(twilio_auth_token=Secret("x"), vapi_webhook_secret=Secret("x"))
    app = create_app(settings, MemoryStore(), LocalCluster(), VapiClient("http://127.0.0.1:9", "x"))
    bridge = start_in_thread(app)
    admin = start_in_thread(create_admin_app(app, TOKEN))
    proc = subprocess.Popen([TWIVAPI, "tail", "--url", admin.url, "--token", TOKEN, "--json"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    lags: list[float] = []
    total = rate * seconds

    def read() -> None:
        for line in proc.stdout:
            event = json.loads(line)
            if event["type"] == "bench.tick":
                lags.append((time.time() - event["received_at"]) * 1000)
                if len(lags) >= total:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.0)   # tail connects
    cpu_before = cpu_seconds(proc.pid)

    async def produce() -> None:
        recorder = app.state.deps.recorder
        start = time.monotonic()
        for n in range(total):
            await recorder.record("bench.tick", f"CA{n % 50:032d}", n=n, ms=1.5)
            target = start + (n + 1) / rate
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    started = time.monotonic()
    bridge.run(produce, timeout=seconds * 4)
    produce_s = time.monotonic() - started
    reader.join(timeout=10)
    cpu = cpu_seconds(proc.pid) - cpu_before
    proc.terminate()
    proc.wait(5)
    admin.stop()
    bridge.stop()
    return [{"events_per_s": round(total / produce_s), "events": total, "received": len(lags),
             "lag_p50_ms": pct(lags, 0.5) if lags else None, "lag_p99_ms": pct(lags, 0.99) if lags else None,
             "tail_cpu_s": round(cpu, 2), "tail_cpu_share": round(cpu / produce_s, 3)}]


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
