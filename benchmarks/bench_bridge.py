"""N concurrent calls through one bridge process at real time (issue: the media bridge).

Three processes on loopback: the simulators (`twivapi sim`, the assistant echoes what it hears),
the bridge (`twivapi serve`), and this load generator (N lean Media Streams callers, 20 ms frames
paced at real time). Measured per run:

- the bridge's CPU per call-second (from /proc, user + system) and what that means in calls per core;
- round-trip latency per frame (caller -> bridge -> Vapi -> bridge -> caller; mu-law only, where the
  bytes come back bit-exact and carry their frame number) and the bridge's own relay stamps;
- frames lost (sent but never echoed back, before the interruption);
- barge-in: a `user-interrupted` webhook near the end of each call -> `clear` at the caller, and the
  bridge's own signal-to-clear stamps.

The callers echo every mark at once, as Twilio does when its playback reaches it. One pair of rows
runs the same load with and without `serve --record` (both legs written to a WAV per call): the
recording's cost is the difference in CPU per call-second.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import websockets

from twivapi_cli import signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, free_port, pct, print_table, wait_http  # noqa: E402

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TOKEN = "bench-auth-token-0123456789abcdef"
SECRET = "bench-webhook-secret"
KEY = "bench-vapi-key"


def start_sims(env: dict) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([TWIVAPI, "sim", "--twilio-port", "0", "--vapi-port", "0", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, text=True)
    values: dict[str, str] = {}
    while "VAPI_BASE_URL" not in values or "TWILIO_API_BASE_URL" not in values:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("twivapi sim did not start")
        if "=" in line and not line.startswith("#"):
            name, _, value = line.strip().partition("=")
            values[name] = value.strip("'\"")
    return proc, values


class Caller:
    def __init__(self, bridge: str, seconds: float, mulaw: bool):
        self.bridge, self.seconds, self.mulaw = bridge, seconds, mulaw
        self.sid = "CA" + uuid.uuid4().hex
        self.sent_at: dict[int, float] = {}
        self.rtt: list[float] = []
        self.echoed: set[int] = set()
        self.frames_back = 0
        self.interrupt_at: float | None = None
        self.clear_ms: float | None = None

    async def run(self, http: httpx.AsyncClient) -> None:
        params = {"CallSid": self.sid, "From": "+15550001111", "To": "+15550002222", "CallStatus": "ringing"}
        url = self.bridge + "/twilio/voice"
        await http.post(url, data=params, headers={"X-Twilio-Signature": signing.twilio_signature(TOKEN, url, params)})
        ws_url = self.bridge.replace("http", "ws") + "/twilio/media"
        async with websockets.connect(ws_url, compression=None, additional_headers={
                "X-Twilio-Signature": signing.twilio_signature(TOKEN, ws_url, {})}) as ws:
            stream_sid = "MZ" + uuid.uuid4().hex
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "streamSid": stream_sid, "start": {
                "streamSid": stream_sid, "callSid": self.sid, "tracks": ["inbound"],
                "customParameters": {signing.STREAM_TOKEN_PARAM: signing.stream_token(TOKEN, self.sid)},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
            receiver = asyncio.create_task(self.receive(ws))
            await self.send(ws, stream_sid, http)
            await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid, "stop": {"callSid": self.sid}}))
            await asyncio.sleep(0.2)
            receiver.cancel()

    async def send(self, ws, stream_sid: str, http: httpx.AsyncClient) -> None:
        frames = int(self.seconds * 50)
        start = time.monotonic()
        for n in range(frames):
            payload = n.to_bytes(2, "big") + bytes([0x55]) * 158  # a loud frame carrying its number
            self.sent_at[n] = time.monotonic()
            await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {
                "track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                "payload": base64.b64encode(payload).decode()}}))
            if n == frames - 40:   # 0.8 s before the end: the caller interrupts
                asyncio.create_task(self.interrupt(http))
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))

    async def interrupt(self, http: httpx.AsyncClient) -> None:
        body = json.dumps({"message": {"type": "user-interrupted", "turnId": "t",
                                       "call": {"phoneCallProviderId": self.sid}}}).encode()
        self.interrupt_at = time.monotonic()
        await http.post(self.bridge + "/vapi/webhook", content=body, headers=signing.sign_vapi(SECRET, body))

    async def receive(self, ws) -> None:
        async for raw in ws:
            message = json.loads(raw)
            if message["event"] == "media":
                payload = base64.b64decode(message["media"]["payload"])
                self.frames_back += 1
                if self.mulaw:
                    n = int.from_bytes(payload[:2], "big")
                    if n in self.sent_at and n not in self.echoed:
                        self.echoed.add(n)
                        self.rtt.append((time.monotonic() - self.sent_at[n]) * 1000)
            elif message["event"] == "mark":   # played at once: echoed, as Twilio does
                await ws.send(json.dumps({"event": "mark", "streamSid": message.get("streamSid"),
                                          "mark": message["mark"]}))
            elif message["event"] == "clear" and self.interrupt_at and self.clear_ms is None:
                self.clear_ms = (time.monotonic() - self.interrupt_at) * 1000

    def lost(self) -> int:
        if not self.mulaw:
            return 0
        cutoff = int(self.seconds * 50) - 40 - 10   # frames that had time to come back before the interrupt
        return sum(1 for n in range(cutoff) if n not in self.echoed)


def run_one(calls: int, seconds: float, audio_format: str, tmp: Path, record: bool = False) -> dict:
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": KEY, "VAPI_WEBHOOK_SECRET": SECRET}
    sims, values = start_sims(env)
    bridge = None
    try:
        assistant = httpx.post(values["VAPI_BASE_URL"] + "/assistant", headers={"Authorization": f"Bearer {KEY}"},
                               json={"name": "bench-echo", "metadata": {"simulator": {"behavior": "echo"}}}).json()
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        bridge_env = {**env, "VAPI_BASE_URL": values["VAPI_BASE_URL"], "VAPI_ASSISTANT_ID": assistant["id"],
                      "TWIVAPI_PUBLIC_URL": public, "TWIVAPI_STORE": f"sqlite:///{tmp}/bridge-{calls}-{audio_format}.db",
                      "TWIVAPI_AUDIO_FORMAT": audio_format, "TWIVAPI_SETUP_QUEUE_LIMIT": "5000",
                      "TWIVAPI_DRAIN_TIMEOUT": "1"}
        if record:
            bridge_env["TWIVAPI_RECORD_DIR"] = str(tmp / f"recordings-{calls}")
        bridge = subprocess.Popen([TWIVAPI, "serve", "--port", str(port), "--log-level", "warning"], env=bridge_env,
                                  cwd=tmp, stderr=subprocess.DEVNULL)
        wait_http(public + "/health")
        callers = [Caller(public, seconds, audio_format == "mulaw-8k") for _ in range(calls)]
        cpu_before, wall_before = cpu_seconds(bridge.pid), time.monotonic()

        async def load():
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as http:
                await asyncio.gather(*(c.run(http) for c in callers))
        asyncio.run(load())
        cpu = cpu_seconds(bridge.pid) - cpu_before
        wall = time.monotonic() - wall_before
        db = tmp / f"bridge-{calls}-{audio_format}.db"
        time.sleep(0.3)
        rows = sqlite3.connect(db).execute(
            "SELECT type, data FROM events WHERE type IN ('media.relay', 'media.clear')").fetchall()
    finally:
        for proc in (bridge, sims):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    relay = [json.loads(d)["ms"] for t, d in rows if t == "media.relay"]
    clear_internal = [json.loads(d)["ms"] for t, d in rows if t == "media.clear"]
    rtt = [v for c in callers for v in c.rtt]
    clears = [c.clear_ms for c in callers if c.clear_ms is not None]
    call_seconds = calls * seconds
    return {"format": audio_format, "record": "yes" if record else "no", "calls": calls, "seconds": seconds,
            "bridge_cpu_s": round(cpu, 2), "cpu_util": round(cpu / wall, 2),
            "cpu_ms_per_call_s": round(cpu / call_seconds * 1000, 2),
            "calls_per_core": round(call_seconds / cpu) if cpu else None,
            "rtt_p50_ms": pct(rtt, 0.5), "rtt_p99_ms": pct(rtt, 0.99),
            "relay_p50_ms": pct(relay, 0.5), "relay_p99_ms": pct(relay, 0.99),
            "frames_sent": sum(len(c.sent_at) for c in callers), "frames_back": sum(c.frames_back for c in callers),
            "frames_lost": sum(c.lost() for c in callers),
            "clears": f"{len(clears)}/{calls}", "bargein_clear_p50_ms": pct(clears, 0.5),
            "bargein_clear_p99_ms": pct(clears, 0.99), "bridge_signal_to_clear_p99_ms": pct(clear_internal, 0.99)}


def run(quick: bool = False) -> list[dict]:
    plan = [(20, 4, "mulaw-8k", False), (20, 4, "mulaw-8k", True), (10, 4, "pcm16-16k", False)] if quick else \
        [(50, 10, "mulaw-8k", False), (50, 10, "mulaw-8k", True), (100, 10, "mulaw-8k", False),
         (50, 10, "pcm16-16k", False)]
    with tempfile.TemporaryDirectory() as tmp:
        return [run_one(calls, seconds, fmt, Path(tmp), record) for calls, seconds, fmt, record in plan]


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
