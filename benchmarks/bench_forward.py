"""The added cost of `serve --forward-to` on a tool call's round trip.

A real `twivapi serve` (its own process, memory store) answers signed `tool-calls` messages one at
a time: once from its built-in `lookup_order`, once forwarded to a small app (Starlette on uvicorn,
its own process, on loopback) that answers the same result. The app is also timed on its own, so
the table shows what the forward adds beyond the app's own time. p50/p99 of the client's round trip.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, pct, wait_http  # noqa: E402
from twivapi_cli import signing  # noqa: E402

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
SECRET = "bench-vapi-secret-0123456789"
APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

async def hook(request: Request):
    message = (await request.json())["message"]
    calls = message.get("toolCallList") or []
    return JSONResponse({"results": [{"toolCallId": c["id"], "name": c["function"]["name"],
                                      "result": "order A1 is shipped"} for c in calls]})

uvicorn.run(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def _message(n: int) -> bytes:
    return json.dumps({"message": {"type": "tool-calls", "call": {"id": f"v{n}", "phoneCallProviderId": f"CA{n:032d}"},
                                   "toolCallList": [{"id": f"t{n}", "type": "function", "function": {
                                       "name": "lookup_order", "arguments": {"order_id": "A1"}}}]}}).encode()


def _time(url: str, n: int) -> list[float]:
    """Round trips in ms, one request at a time, after a warm-up."""
    out: list[float] = []
    with httpx.Client(timeout=20) as client:
        for i in range(n + 20):
            body = _message(i)
            headers = {"content-type": "application/json", **signing.sign_vapi(SECRET, body)}
            started = time.perf_counter()
            reply = client.post(url, content=body, headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            assert reply.status_code == 200 and reply.json()["results"][0]["result"] == "order A1 is shipped", reply.text
            if i >= 20:
                out.append(elapsed)
    return out


def _serve(port: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TWILIO_AUTH_TOKEN": "bench-auth-token", "VAPI_WEBHOOK_SECRET": SECRET,
           "TWIVAPI_STORE": "memory://", "TWIVAPI_STATE_DIR": f"/tmp/twivapi-bench-forward-{port}"}
    proc = subprocess.Popen([TWIVAPI, "serve", "--mode", "native", "--port", str(port), "--log-level", "warning",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _row(setup: str, samples: list[float], base: list[float] | None = None) -> dict:
    row = {"setup": setup, "n": len(samples), "p50_ms": pct(samples, 0.5), "p99_ms": pct(samples, 0.99)}
    if base is not None:
        row["added_p50_ms"] = round((pct(samples, 0.5) or 0) - (pct(base, 0.5) or 0), 2)
        row["added_p99_ms"] = round((pct(samples, 0.99) or 0) - (pct(base, 0.99) or 0), 2)
    return row


def run(quick: bool = False) -> list[dict]:
    n = 200 if quick else 1000
    app_port, plain_port, forward_port = free_port(), free_port(), free_port()
    app = subprocess.Popen([sys.executable, "-c", APP, str(app_port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    procs = [app]
    try:
        wait_http(f"http://127.0.0.1:{app_port}/hook")
        procs.append(_serve(plain_port))
        procs.append(_serve(forward_port, "--forward-to", f"http://127.0.0.1:{app_port}/hook"))
        builtin = _time(f"http://127.0.0.1:{plain_port}/vapi/webhook", n)
        forwarded = _time(f"http://127.0.0.1:{forward_port}/vapi/webhook", n)
        direct = _time(f"http://127.0.0.1:{app_port}/hook", n)
    finally:
        for proc in procs:
            _stop(proc)
    return [_row("built-in tool (lookup_order)", builtin),
            _row("--forward-to the app", forwarded, builtin),
            _row("the app alone (no bridge)", direct)]


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    cols = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
